"""Issue 11, item 9, on real processes: Stack.stop ends RQ's work-horses (each in a process group of
its own), gunicorn runs without a control socket, and Docker's health check passes Basic auth."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from rq import Queue
import redis as redis_lib

from backend.stack import Stack

from tests.backend.test_server import AUTH, ROOT, serve


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def children(pid: int) -> list[int]:
    out = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
        except OSError:
            pass
    return out


def group(pid: int) -> int | None:
    """pid's process group, or None once it has exited (a short-lived child listed a moment ago)."""
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_stop_ends_a_work_horse_in_its_own_process_group(redis_url, tmp_path):
    queue_name = "subdisc-horse-test"
    client = redis_lib.Redis.from_url(redis_url)
    job = Queue(queue_name, connection=client).enqueue(time.sleep, 300, job_timeout=600)
    stack = Stack(tmp_path / "logs")
    horse = None
    try:
        (worker,) = stack.start_workers(1, redis_url, queue_name)
        for _ in range(600):
            job.refresh()
            horses = [p for p in children(worker.proc.pid) if group(p) not in (None, worker.proc.pid)]
            if job.get_status() == "started" and horses:
                horse = horses[0]
                break
            stack.check_alive()
            time.sleep(0.1)
        assert horse is not None, "the job never started in a work-horse"
        assert os.getpgid(horse) == horse        # RQ's own group: a killpg of the worker misses it
        stack.stop(grace=2)
        for _ in range(50):
            if not alive(horse):
                break
            time.sleep(0.1)
        assert not alive(horse), "the work-horse outlived Stack.stop"
    finally:
        stack.stop(grace=1)
        if horse is not None and alive(horse):
            os.kill(horse, signal.SIGKILL)       # the horse this test started, left by a failure
        client.close()


def test_two_backends_on_one_host_create_no_control_socket(redis_url, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "XDG_RUNTIME_DIR": ""}
    with serve(redis_url, **env) as one, serve(redis_url, **env) as two:
        assert one.get("/health").status_code == 200 and two.get("/health").status_code == 200
        assert not (home / ".gunicorn").exists()
        for backend in (one, two):
            assert "control socket" not in backend.log.read_text().lower()


def test_the_compose_health_check_passes_basic_auth(redis_url):
    compose = yaml.safe_load((ROOT / "docker" / "docker-compose.yml").read_text())
    check = compose["services"]["backend"]["healthcheck"]["test"]
    assert check[0] == "CMD"
    with serve(redis_url) as backend:                    # serve() sets BASIC_AUTH_USER / _PASS
        host_port = backend.url.split("//")[1]
        argv = [sys.executable if a == "python" else a.replace("127.0.0.1:9090", host_port)
                for a in check[1:]]
        base = {k: v for k, v in os.environ.items() if not k.startswith("BASIC_AUTH_")}
        base["PYTHONPATH"] = str(ROOT)
        with_auth = dict(base, BASIC_AUTH_USER=AUTH[0], BASIC_AUTH_PASS=AUTH[1])
        assert subprocess.run(argv, env=with_auth, cwd=ROOT, timeout=60).returncode == 0
        # Wrong or missing credentials: unhealthy, as the server refuses them.
        wrong = dict(base, BASIC_AUTH_USER=AUTH[0], BASIC_AUTH_PASS="nope")
        assert subprocess.run(argv, env=wrong, cwd=ROOT, timeout=60).returncode != 0
        assert subprocess.run(argv, env=base, cwd=ROOT, timeout=60).returncode != 0

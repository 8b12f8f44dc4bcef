"""Shared fixtures: a real redis-server on a free port, real `rq worker` processes, packaged faces.

Nothing here is mocked: integration tests talk to the same Redis and RQ that production uses.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import redis as redis_lib

from tests.support import DEV_FACES, ROOT, free_port


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """URL of a redis-server started for this test session (a real one, on a free port)."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed: run scripts/test (it installs it)")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis_lib.Redis.from_url(url)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis_lib.ConnectionError:
            time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("redis-server did not start")
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def redis_conn(redis_url):
    """A client on an emptied database: each test starts from a clean Redis."""
    client = redis_lib.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()


class WorkerPool:
    """Real `rq worker` processes (the standard command), stopped at the end of the test."""

    def __init__(self, redis_url: str, queue: str, env: dict):
        self.redis_url, self.queue, self.env = redis_url, queue, env
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    def start(self, n: int = 1, burst: bool = False) -> list[subprocess.Popen]:
        started = []
        for _ in range(n):
            log = Path(tempfile.mkstemp(prefix="rq-worker-", suffix=".log")[1])
            cmd = [sys.executable, "-m", "workers.worker", "--url", self.redis_url, self.queue]
            if burst:
                cmd.insert(-1, "--burst")
            proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=log.open("w"),
                                    stderr=subprocess.STDOUT, start_new_session=True)
            self.procs.append(proc)
            self.logs.append(log)
            started.append(proc)
        return started

    def output(self) -> str:
        return "\n".join(p.read_text() for p in self.logs if p.exists())

    def stop(self):
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture
def rq_workers(redis_url, redis_conn):
    """Factory for real RQ workers on queue "subdisc-test": `rq_workers.start(2)`."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), SUBDISC_REDIS_URL=redis_url)
    pool = WorkerPool(redis_url, "subdisc-test", env)
    yield pool
    pool.stop()


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    """scikit-image's astronaut photo (512x512 RGB): Eileen Collins' face near (175..266, 76..167)."""
    from skimage import data

    return data.astronaut()


@pytest.fixture(scope="session")
def astronaut_face(astronaut) -> np.ndarray:
    """A crop of the astronaut photo holding exactly one face (HOG finds it at upsample 1)."""
    return np.ascontiguousarray(astronaut[20:260, 110:340])


@pytest.fixture(scope="session")
def dev_faces() -> Path:
    """The labelled dev photos (../shared/faces/dev); tests using it skip when it is absent."""
    if not (DEV_FACES / "labels.csv").exists():
        pytest.skip(f"labelled face photos not found at {DEV_FACES} (set SUBDISC_DEV_FACES)")
    return DEV_FACES

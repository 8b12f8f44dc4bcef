"""backend/stack.py without Label Studio: ports checked before anything starts, and stop() ends every
process a child started (its whole group), and only those."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import redis as redis_lib

from backend import stack as stack_mod
from backend.cli import main
from tests.support import free_port


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_port_in_use_is_a_clear_error_before_anything_starts(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(stack_mod.StackError, match=f"backend port {port} already in use"):
            stack_mod.check_ports({"Label Studio": free_port(), "backend": port})
        # Through the command: exit code 2 and one line, no traceback, nothing started.
        code = main(["up", "--images", str(tmp_path), "--redis-port", str(port),
                     "--data-dir", str(tmp_path / "data"), "--ls-venv", str(tmp_path / "no-venv")])
    assert code == 2
    err = capsys.readouterr().err
    assert f"Redis port {port} already in use" in err and "Traceback" not in err
    assert not (tmp_path / "data").exists() and not (tmp_path / "no-venv").exists()


def test_the_same_port_twice_is_refused():
    port = free_port()
    with pytest.raises(stack_mod.StackError, match="same port"):
        stack_mod.check_ports({"backend": port, "Redis": port})


def test_stop_ends_children_and_what_they_forked_and_nothing_else(tmp_path):
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with stack_mod.Stack(tmp_path / "logs") as stack:
            # A child that forks a grandchild and ignores SIGTERM: only the group's SIGKILL ends it.
            child = stack.start("stubborn", [
                "bash", "-c", "trap '' TERM; sleep 300 & echo $! > grandchild; wait"], cwd=tmp_path)
            deadline = time.monotonic() + 10
            while not (tmp_path / "grandchild").exists() or not (tmp_path / "grandchild").read_text():
                assert time.monotonic() < deadline
                time.sleep(0.05)
            grandchild = int((tmp_path / "grandchild").read_text())
            assert os.getpgid(child.proc.pid) == child.proc.pid != os.getpgrp()
            stack.stop(grace=1)
        assert not alive(child.proc.pid) and not alive(grandchild)
        assert alive(bystander.pid)
    finally:
        bystander.kill()
        bystander.wait()


def test_redis_is_append_only_and_a_dead_child_is_reported(tmp_path):
    with stack_mod.Stack(tmp_path / "logs") as stack:
        url = stack.start_redis(free_port(), tmp_path / "redis")
        client = redis_lib.Redis.from_url(url)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("dir")["dir"] == str(tmp_path / "redis")
        stack.start("short-lived", ["bash", "-c", "echo going away; exit 3"])
        time.sleep(0.5)
        with pytest.raises(stack_mod.StackError, match=r"short-lived stopped \(exit code 3\)"):
            stack.check_alive()


def test_sigterm_to_a_stack_owner_stops_its_children(tmp_path):
    """A bench or `subdisc up` killed with SIGTERM must not leave its Redis and workers behind."""
    owner = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
sys.path.insert(0, {str(stack_mod.ROOT)!r})
from backend.stack import Stack, stop_on_sigterm
stop_on_sigterm()
with Stack({str(tmp_path / 'logs')!r}) as stack:
    child = stack.start("sleeper", ["sleep", "300"])
    print(child.proc.pid, flush=True)
    time.sleep(300)
"""], stdout=subprocess.PIPE, text=True)
    try:
        child_pid = int(owner.stdout.readline())
        assert alive(child_pid)
        owner.send_signal(signal.SIGTERM)
        owner.wait(30)
        deadline = time.monotonic() + 10
        while alive(child_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(child_pid)
    finally:
        owner.kill()
        owner.wait()

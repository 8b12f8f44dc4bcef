"""The fault-injection suite's fixtures: a Redis that can be SIGKILLed and restarted on its port with
its append-only files, real workers and a real backend on it, and a tally of what was injected.

    python -m pytest -m faults            # this folder alone

Everything is real (redis-server, `rq worker` processes, gunicorn, HTTP); Label Studio is the
stand-in of tests/backend/standin.py, or the real one in the test that says so. Each test records
its counts with `tally.add(...)`; they are printed at the end of the run ("fault injection" section)
so they can be quoted.
"""
from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
import redis as redis_lib

from backend.stack import Stack
from tests.conftest import WorkerPool
from tests.support import free_port

QUEUE = "subdisc-test"      # the queue tests/backend/test_server.py's serve() points the backend at
_TALLIES: dict[str, Counter] = {}


def pytest_collection_modifyitems(items):
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).parent == here:
            item.add_marker(pytest.mark.faults)


def pytest_terminal_summary(terminalreporter):
    if not _TALLIES:
        return
    terminalreporter.section("fault injection: injected and survived")
    for test, counts in _TALLIES.items():
        terminalreporter.write_line(f"{test}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))


class Tally(Counter):
    def add(self, **counts):
        for key, value in counts.items():
            self[key] += value


@pytest.fixture
def tally(request) -> Tally:
    counts = Tally()
    yield counts
    _TALLIES[request.node.name] = counts
    print(f"\n{request.node.name}: {dict(counts)}")


class RestartableRedis:
    """redis-server started as `subdisc up` starts it (append-only), killable and restartable."""

    def __init__(self, workdir: Path):
        self.port, self.data = free_port(), workdir / "data"
        self.stack = Stack(workdir / "logs")
        self.url = self.stack.start_redis(self.port, self.data)
        self.kills = 0

    def client(self) -> redis_lib.Redis:
        return redis_lib.Redis.from_url(self.url)

    def kill(self) -> None:
        """SIGKILL, as the OOM killer or a crash would: no shutdown save, clients cut off."""
        (child,) = [c for c in self.stack.children if c.name == "redis"]
        os.kill(child.proc.pid, signal.SIGKILL)
        child.proc.wait(10)
        self.stack.children.remove(child)
        self.kills += 1

    def restart(self) -> None:
        """On the same port with the same append-only files (what a supervisor does)."""
        deadline = time.monotonic() + 20
        while True:
            try:
                self.stack.start_redis(self.port, self.data)
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                for child in [c for c in self.stack.children if c.name == "redis"]:
                    self.stack.children.remove(child)
                time.sleep(0.5)

    def stop(self) -> None:
        self.stack.stop()


@pytest.fixture
def restartable_redis(tmp_path):
    r = RestartableRedis(tmp_path / "redis")
    yield r
    r.stop()


@pytest.fixture
def fault_workers(restartable_redis, tmp_path):
    """Real `rq worker` processes on the restartable Redis (queue "subdisc-test")."""
    pool = WorkerPool(restartable_redis.url, QUEUE, tmp_path / "worker-logs")
    yield pool
    pool.stop()

"""Shared fixtures: a real redis-server on a free port, real `rq worker` processes, packaged faces.

Nothing here is mocked: integration tests talk to the same Redis and RQ that production uses.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import redis as redis_lib

from backend.stack import Stack
from tests.support import DEV_FACES, free_port


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """URL of a redis-server started for this test session (a real one, on a free port), started
    the way `subdisc up` starts it."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: run scripts/test (it installs it)")
    workdir = tmp_path_factory.mktemp("redis")
    with Stack(workdir / "logs") as stack:
        yield stack.start_redis(free_port(), workdir / "data")


@pytest.fixture
def redis_conn(redis_url):
    """A client on an emptied database: each test starts from a clean Redis."""
    client = redis_lib.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()


class WorkerPool:
    """Real `rq worker` processes, started as `subdisc up` starts them, stopped after the test."""

    def __init__(self, redis_url: str, queue: str, log_dir: Path):
        self.redis_url, self.queue = redis_url, queue
        self.stack = Stack(log_dir)
        self.logs: list[Path] = []

    def start(self, n: int = 1, env: dict | None = None) -> list[subprocess.Popen]:
        children = self.stack.start_workers(n, self.redis_url, self.queue, env=env)
        self.logs += [c.log for c in children]
        return [c.proc for c in children]

    def output(self) -> str:
        return "\n".join(p.read_text() for p in self.logs if p.exists())

    def stop(self):
        self.stack.stop()


@pytest.fixture
def rq_workers(redis_url, redis_conn, tmp_path):
    """Factory for real RQ workers on queue "subdisc-test": `rq_workers.start(2)`."""
    pool = WorkerPool(redis_url, "subdisc-test", tmp_path / "worker-logs")
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


@pytest.fixture(scope="session", autouse=True)
def _temp_dirs_are_a_local_files_root(tmp_path_factory):
    """The backend reads task input only under configured roots (SUBDISC_LOCAL_FILES_ROOT,
    SUBDISC_EXTRA_ROOTS): tests give it their photos under pytest's temp dirs, so that is a root,
    as a deployment names its photo folder. Servers and workers the tests start inherit it; tests
    of the policy itself set their own."""
    import os

    name = "SUBDISC_EXTRA_ROOTS"
    previous = os.environ.get(name)
    os.environ[name] = str(tmp_path_factory.getbasetemp())
    yield
    if previous is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = previous

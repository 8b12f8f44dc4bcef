"""ResilientWorker's idle timer (its periodic look for projects due a reconciliation), in this
process on a real Redis: it still waits in Redis between looks, and keeps rq's own idle limit.
Its looks queueing real reconciliations run in tests/faults/test_lost_webhooks.py."""
from __future__ import annotations

import time

from rq import Queue

from backend.state import ProjectState
from tests.backend.helpers import TWO_ATTRIBUTES
from workers.worker import ResilientWorker


def test_an_idle_worker_looks_without_burning_cpu_and_keeps_its_idle_limit(redis_conn, monkeypatch):
    monkeypatch.setenv("SUBDISC_RECONCILE_SECONDS", "2")     # a look every second
    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    ProjectState(redis_conn, "4").save_settings(TWO_ATTRIBUTES)   # known, but no Label Studio
    queue = Queue("subdisc-idle-test", connection=redis_conn)
    worker = ResilientWorker([queue], connection=redis_conn)
    wall, cpu = time.monotonic(), time.process_time()
    assert worker.work(max_idle_time=4) is False
    wall, cpu = time.monotonic() - wall, time.process_time() - cpu
    assert 4 <= wall < 9, wall                  # cut into 1 s waits, but rq's limit still holds
    assert cpu < 0.1 * wall, (cpu, wall)        # blocked in Redis, not spinning (~0.02 s)
    assert queue.count == 0 and not redis_conn.exists(ProjectState(redis_conn, "4").key("reconcile_claim"))

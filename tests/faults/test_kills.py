"""Work-horses SIGKILLed in the middle of a refit and of prediction posting, against the real
backend, real RQ workers and a stand-in Label Studio.

A refit killed while it holds the project's refit lock left the lock for an hour (TTL 3600 s): the
retried refit, and every refit after it, waited inside the lock. Now the lock lapses within its TTL.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter

import pytest

from backend.state import ProjectState
from tests.backend.helpers import TWO_ATTRIBUTES, ls_annotation, webhook
from tests.backend.standin import StandInLabelStudio
from tests.backend.test_server import BOX, ls_task, serve
from tests.faults.test_redis_outage import TOKEN, cached_tasks, real_photos, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

LOCK = "subdisc:v1:project:1:lock:refit"


def horses(worker_pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(worker_pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_a_refit_killed_holding_the_lock_is_retried_at_once(restartable_redis, fault_workers,
                                                           tmp_path, tally, monkeypatch):
    ttl = 5
    monkeypatch.setenv("SUBDISC_REFIT_LOCK_TTL", str(ttl))
    client = restartable_redis.client()
    tasks = cached_tasks(tmp_path / "cached", client, 400)
    with serve(restartable_redis.url, SUBDISC_LOCAL_FILES_ROOT=str(tmp_path),
               SUBDISC_REFIT_LOCK_TTL=str(ttl)) as backend:
        (worker,) = fault_workers.start(1)
        assert backend.setup(TWO_ATTRIBUTES).status_code == 200
        assert backend.predict(tasks, TWO_ATTRIBUTES).status_code == 200
        refits = len(ProjectState(client, "1").history())
        killed = 0
        for aid in (1, 2):
            task = tasks[aid * 10]
            ann = ls_annotation(aid, task["id"], [(BOX, {"gender": "male"})])
            r = backend.post("/webhook", webhook("ANNOTATION_CREATED", ann, task, label_config=TWO_ATTRIBUTES))
            assert r.status_code == 200 and r.json()["refit"]
            # The refit's work-horse takes the lock: kill it there, as the OOM killer would.
            wait_until("the refit holding its lock", lambda: client.exists(LOCK), 60, every=0.005,
                       log=fault_workers.output)
            for horse in horses(worker.pid):
                os.kill(horse, signal.SIGKILL)
                killed += 1
            started = time.monotonic()
            # RQ retries the job at once; the retried refit gets the dead horse's lock within its TTL.
            wait_until("the retried refit", lambda: len(ProjectState(client, "1").history()) > refits,
                       ttl + 60, log=fault_workers.output)
            refits = len(ProjectState(client, "1").history())
            waited = time.monotonic() - started
        assert worker.poll() is None
    assert killed >= 2
    tally.add(work_horses_killed=killed, refits_done_after=2, last_retry_seconds=round(waited, 1),
              lock_ttl_seconds=ttl)


def test_killed_work_horses_post_every_prediction_once(restartable_redis, fault_workers, tmp_path,
                                                       astronaut_face, tally):
    real = [ls_task(700 + i, p) for i, p in enumerate(real_photos(tmp_path / "real", astronaut_face, 12))]
    with StandInLabelStudio(token=TOKEN) as ls, \
            serve(restartable_redis.url, SUBDISC_LOCAL_FILES_ROOT=str(tmp_path), SUBDISC_BATCH_SIZE="4") as backend:
        (worker,) = fault_workers.start(1)
        assert backend.setup(TWO_ATTRIBUTES, hostname=ls.url, token=TOKEN).status_code == 200
        assert backend.predict(real, TWO_ATTRIBUTES).status_code == 200
        killed = 0
        deadline = time.monotonic() + 120
        while killed < 2 and time.monotonic() < deadline:    # kill the first two horses seen
            for horse in horses(worker.pid):
                time.sleep(0.3)
                try:
                    os.kill(horse, signal.SIGKILL)
                    killed += 1
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        wait_until("every prediction posted", lambda: {p["task"] for p in ls.predictions}
                   >= {t["id"] for t in real}, 240, log=fault_workers.output)
        time.sleep(2)
        posts = Counter(p["task"] for p in ls.predictions)
        assert max(posts.values()) == 1, posts
        assert worker.poll() is None
    tally.add(work_horses_killed=killed, tasks_posted=len(posts),
              posted_twice=sum(v > 1 for v in posts.values()))

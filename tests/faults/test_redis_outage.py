"""Redis SIGKILLed and restarted on its port with its append-only files, while webhooks and
predictions flow through the real backend (gunicorn), real RQ workers and a stand-in Label Studio.

Before the fix every RQ worker exited, webhooks answered 503 were lost for good, and a refit lock
restored from the append-only file (TTL 3600 s) held every refit of its project for an hour.
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import numpy as np
import pytest
import requests
from PIL import Image

from backend.state import ProjectState
from tests.backend.helpers import TWO_ATTRIBUTES, CachedPhotos, group_vectors, ls_annotation, webhook
from tests.backend.standin import StandInLabelStudio
from tests.backend.test_server import BOX, ROOT, ls_task, serve

pytestmark = [pytest.mark.faults, pytest.mark.timeout(400)]

TOKEN = "fault-token"
#: Seconds Redis stays down: longer than redis-py's own retries (~6 s), so every client feels it.
OUTAGE = 8.0


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")


def real_photos(folder, face, n):
    """Distinct one-face photos the workers must embed (nothing cached): astronaut crops."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = face[i % 7: 230 - (i % 5), (i % 3) * 4:]
        img = np.clip(img.astype(int) + (i // 7) * 5, 0, 255).astype(np.uint8)
        path = folder / f"real{i:02d}.jpg"
        Image.fromarray(np.ascontiguousarray(img)).save(path, quality=92)
        paths.append(str(path))
    return paths


def cached_tasks(folder, client, n, first_id=1):
    """n tasks whose photos are in the embedding cache: two groups of faces ('male' / 'female')."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(11)
    base = rng.normal(0, 0.05, 128)
    axis = np.zeros(128)
    axis[0] = 0.4
    photos = CachedPhotos(folder, client)
    vectors = np.concatenate([group_vectors(rng, base + axis, n // 2), group_vectors(rng, base - axis, n - n // 2)])
    return [ls_task(first_id + i, photos.photo(v)) for i, v in enumerate(vectors)]


def wait_until(what, predicate, timeout, every=0.25, log=lambda: ""):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{log()}")
        time.sleep(every)


def stored_annotation_ids(client, project="1") -> set[int]:
    return {int(e["annotation_id"]) for e in ProjectState(client, project).annotations()}


def test_a_redis_sigkill_and_restart_loses_nothing(restartable_redis, fault_workers, tmp_path,
                                                   astronaut_face, tally, monkeypatch):
    redis = restartable_redis
    client = redis.client()
    tasks = cached_tasks(tmp_path / "cached", client, 60)
    by_id = {t["id"]: t for t in tasks}
    real = [ls_task(500 + i, p) for i, p in enumerate(real_photos(tmp_path / "real", astronaut_face, 16))]
    n_webhooks = 240
    statuses: dict[int, object] = {}

    with StandInLabelStudio(token=TOKEN) as ls, \
            serve(redis.url, SUBDISC_RECONCILE_SECONDS="3600", SUBDISC_LOCAL_FILES_ROOT=str(tmp_path)) as backend:
        procs = fault_workers.start(2)
        assert backend.setup(TWO_ATTRIBUTES, hostname=ls.url, token=TOKEN).status_code == 200
        assert backend.predict(tasks, TWO_ATTRIBUTES).status_code == 200   # cached: model fitted inline

        def send(aid):
            task = by_id[1 + aid % len(tasks)]
            gender = "male" if task["id"] <= len(tasks) // 2 else "female"
            ann = ls_annotation(aid, task["id"], [(BOX, {"gender": gender})], updated_at=iso(time.time()))
            ls.annotate(task, ann)      # Label Studio stores the annotation, then sends the webhook
            try:
                r = backend.post("/webhook", webhook("ANNOTATION_CREATED", ann, task,
                                                     label_config=TWO_ATTRIBUTES))
                statuses[aid] = r.status_code
            except requests.RequestException as exc:
                statuses[aid] = type(exc).__name__

        def predictions_and_the_fault():
            assert backend.predict(real[:8], TWO_ATTRIBUTES).status_code == 200   # queued on workers
            time.sleep(1.0)
            redis.kill()
            time.sleep(OUTAGE)
            redis.restart()
            wait_until("/predict after the restart",
                       lambda: backend.predict(real[8:], TWO_ATTRIBUTES).status_code == 200, 30)

        fault = threading.Thread(target=predictions_and_the_fault)
        with ThreadPoolExecutor(4) as pool:
            for i in range(n_webhooks):
                if i == 40:
                    fault.start()
                pool.submit(send, 1000 + i)
                time.sleep(1 / 30)          # ~30 webhooks per second, as in the report
            fault.join()
            for i in range(n_webhooks, n_webhooks + 20):   # traffic after the outage is over
                pool.submit(send, 1000 + i)
                time.sleep(1 / 30)
        sent = set(statuses)
        acknowledged = {a for a, s in statuses.items() if s == 200}
        missed = sent - acknowledged
        assert redis.kills == 1 and missed, f"the outage was not felt: {Counter(statuses.values())}"
        assert {s for s in statuses.values() if s != 200} <= {503, "ReadTimeout", "ConnectionError"}

        # Every acknowledged confirmation is kept; the missed ones come back through reconciliation.
        assert acknowledged <= stored_annotation_ids(client)
        wait_until("every annotation stored (reconciliation)",
                   lambda: stored_annotation_ids(client) == sent, 120, log=fault_workers.output)
        # Every task posted, once.
        wait_until("a prediction for every real task", lambda: {p["task"] for p in ls.predictions}
                   >= {t["id"] for t in real}, 180, log=fault_workers.output)
        time.sleep(2)
        posts = Counter(p["task"] for p in ls.predictions)
        assert max(posts.values()) == 1, posts
        # The workers rode it out, and still work: a refit after the outage runs to its end.
        assert [p.poll() for p in procs] == [None, None], fault_workers.output()
        ls.remove_annotation(1 + 1000 % len(tasks), 1000)
        sent.discard(1000)
        r = backend.post("/webhook", {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 1000}],
                                      "project": {"id": 1}})
        assert r.status_code == 200 and r.json()["changed"] == 1
        from rq.job import Job

        job_id = r.json()["refit"] or ProjectState(client, "1").queued_refit()
        wait_until("a refit after the outage, run to its end",
                   lambda: Job.fetch(job_id, connection=client).get_status() == "finished", 150,
                   log=fault_workers.output)
        reconnections = fault_workers.output().count("Redis is back")

    tally.add(redis_sigkills=redis.kills, outage_seconds=int(OUTAGE), webhooks_sent=len(sent),
              webhooks_acknowledged=len(acknowledged), webhooks_missed=len(missed),
              annotations_kept=len(sent), recovered_by_reconciliation=len(missed),
              tasks_posted=len(posts), posted_twice=sum(v > 1 for v in posts.values()),
              workers_alive_after=2, worker_reconnections=reconnections)


HOLD_AND_DIE = """
import sys, time
import redis
from backend.state import ProjectState
st = ProjectState(redis.Redis.from_url(sys.argv[1]), "1")
try:
    lock = st.refit_lock()          # the lock as a refit takes it
except TypeError:                   # before the fix: refit_lock(REFIT_TIMEOUT), 3600 s
    lock = st.refit_lock(3600)
with lock:
    print("held", flush=True)
    time.sleep(3600)
"""


def test_a_dead_holders_refit_lock_frees_itself_after_a_restart(restartable_redis, fault_workers,
                                                                tmp_path, tally, monkeypatch):
    """A refit killed while it holds the lock, then Redis killed and restarted from its append-only
    file: the lock comes back, and must lapse within its TTL (it was 3600 s: refits stalled)."""
    ttl = 5
    monkeypatch.setenv("SUBDISC_REFIT_LOCK_TTL", str(ttl))
    redis = restartable_redis
    client = redis.client()
    tasks = cached_tasks(tmp_path / "cached", client, 20)
    with serve(redis.url, SUBDISC_LOCAL_FILES_ROOT=str(tmp_path), SUBDISC_REFIT_LOCK_TTL=str(ttl)) as backend:
        fault_workers.start(1)
        assert backend.setup(TWO_ATTRIBUTES).status_code == 200
        assert backend.predict(tasks, TWO_ATTRIBUTES).status_code == 200
        refits = len(ProjectState(client, "1").history())

        holder = subprocess.Popen([sys.executable, "-c", HOLD_AND_DIE, redis.url], cwd=ROOT,
                                  stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "held"
        time.sleep(1.5)                      # the append-only file has it (appendfsync everysec)
        holder.kill()
        holder.wait(10)
        redis.kill()
        redis.restart()
        assert client.exists("subdisc:v1:project:1:lock:refit"), "the AOF did not bring the lock back"
        killed_at = time.monotonic()
        ann = ls_annotation(1, 1, [(BOX, {"gender": "male"})])
        assert backend.post("/webhook", webhook("ANNOTATION_CREATED", ann, tasks[0],
                                                label_config=TWO_ATTRIBUTES)).json()["refit"]
        wait_until("the refit, once the dead holder's lock lapsed",     # it adds a history entry
                   lambda: len(ProjectState(client, "1").history()) > refits, ttl + 40,
                   log=fault_workers.output)
        waited = time.monotonic() - killed_at
    tally.add(refit_holders_killed=1, redis_sigkills=redis.kills, lock_ttl_seconds=ttl,
              refit_done_after_seconds=round(waited, 1))

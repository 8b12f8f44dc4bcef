"""Webhooks lost, and then silence: labelers confirm faces in Label Studio while none of its webhooks
reach the backend (it was down, or answered 503), then stop. No webhook, no refit, no /predict comes
to trigger a reconciliation, so only the workers' periodic one (workers/worker.py) can read the
confirmations back. Real Redis, real workers, the real backend, the stand-in Label Studio.

Before the periodic reconciliation, nothing ever recorded these confirmations.
"""
from __future__ import annotations

import time

import pytest
from rq import Queue
from rq.registry import StartedJobRegistry

from backend.state import ProjectState
from tests.backend.helpers import TWO_ATTRIBUTES, ls_annotation
from tests.backend.standin import StandInLabelStudio
from tests.backend.test_server import BOX, serve
from tests.faults.conftest import QUEUE
from tests.faults.test_redis_outage import TOKEN, cached_tasks, iso, stored_annotation_ids, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]
INTERVAL = 2.0      # SUBDISC_RECONCILE_SECONDS, for the backend and the workers


def test_confirmations_whose_webhooks_were_all_lost_are_read_back_and_refitted(
        restartable_redis, fault_workers, tmp_path, tally):
    client = restartable_redis.client()
    tasks = cached_tasks(tmp_path / "cached", client, 40)
    settings = {"SUBDISC_RECONCILE_SECONDS": str(INTERVAL)}
    with StandInLabelStudio(token=TOKEN) as ls, \
            serve(restartable_redis.url, SUBDISC_LOCAL_FILES_ROOT=str(tmp_path), **settings) as backend:
        ls.add_tasks(tasks)
        fault_workers.start(2, env=settings)
        assert backend.setup(TWO_ATTRIBUTES, hostname=ls.url, token=TOKEN).status_code == 200
        # Project 2 names no Label Studio (and the workers have no LABEL_STUDIO_URL): never read.
        assert backend.post("/setup", {"project": 2, "schema": TWO_ATTRIBUTES}).status_code == 200
        assert backend.predict(tasks, TWO_ATTRIBUTES).status_code == 200   # cached: fitted inline
        st = ProjectState(client, "1")
        queue = Queue(QUEUE, connection=client)
        started = StartedJobRegistry(QUEUE, connection=client)
        wait_until("the queue to be quiet", lambda: queue.count == 0 and started.count == 0
                   and st.queued_refit() is None, 60, log=fault_workers.output)
        assert st.annotations() == []

        truth = set()
        for aid, task in enumerate(tasks[::2], start=1):         # 20 confirmations, no webhook
            gender = "male" if task["id"] <= len(tasks) // 2 else "female"
            ls.annotate(task, ls_annotation(aid, task["id"], [(BOX, {"gender": gender})],
                                            updated_at=iso(time.time())))
            truth.add(aid)
        lost_at = time.monotonic()
        # Within about the interval (2 s, plus a look every second and the job): 15 s of slack for
        # a loaded machine, far below anything but a periodic reconciliation.
        wait_until("the lost confirmations recorded", lambda: stored_annotation_ids(client) == truth,
                   15, log=fault_workers.output)
        recorded_after = time.monotonic() - lost_at

        def refitted_on_them():
            stored = st.load_model()
            return stored is not None and stored[1]["label_stats"]["annotations"] == len(truth)
        wait_until("a refit on the recovered confirmations", refitted_on_them, 60, log=fault_workers.output)
        assert st.history()[-1]["attributes"]["gender"]["confirmations"] > 0

        # The workers went on reconciling project 1, never project 2. Project 1's claim lapses after
        # each interval until a worker's next look takes it again, so it is awaited, not sampled.
        wait_until("project 1 claimed again", lambda: client.exists(st.key("reconcile_claim")),
                   15, every=0.05, log=fault_workers.output)
        assert not client.exists(ProjectState(client, "2").key("reconcile_claim"))
        assert "reconcile project 2" not in fault_workers.output()
    reconciliations = fault_workers.output().count("reconcile project 1")
    assert reconciliations >= 2
    tally.add(webhooks_lost=len(truth), recovered_by_periodic_reconciliation=len(truth),
              seconds_to_recover=round(recorded_after, 1), periodic_reconciliations=reconciliations)

"""When reconciliations with Label Studio run: the claim, its early release when Label Studio
could not be read, and the workers' periodic look for due projects. Real Redis, the stand-in Label
Studio over HTTP (stopped and restarted on its port); the end-to-end paths with real workers are in
tests/faults/test_label_studio_down.py and tests/faults/test_lost_webhooks.py."""
from __future__ import annotations

import time

import pytest
from rq import Queue

from backend import reconcile as reconciliation
from backend.model import SubdiscModel
from backend.reconcile import reconcile, reconcile_if_due, schedule_due_reconciliations, schedule_reconcile
from backend.state import ProjectState
from tests.backend.helpers import TWO_ATTRIBUTES, ls_annotation
from tests.backend.standin import StandInLabelStudio

QUEUE = "subdisc-reconcile-test"
TOKEN = "reconcile-token"


@pytest.fixture
def ls():
    with StandInLabelStudio(token=TOKEN) as server:
        yield server


@pytest.fixture(autouse=True)
def _settings(monkeypatch):
    for name in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SUBDISC_RECONCILE_SECONDS", "60")


def project_on(redis, ls, project="1") -> ProjectState:
    st = ProjectState(redis, project)
    st.save_settings(TWO_ATTRIBUTES, hostname=ls.url, access_token=TOKEN)
    task = {"id": 7, "data": {"image": "/data/upload/1/a.jpg"}, "project": int(project)}
    ls.annotate(task, ls_annotation(70, 7, [((20, 40, 120, 160), {"gender": "male"})]))
    return st


def claim_ms(st: ProjectState) -> int:
    return st.redis.pttl(st.key("reconcile_claim"))


def test_an_incomplete_reconciliation_lets_the_next_trigger_retry_soon(redis_conn, ls, monkeypatch):
    monkeypatch.setattr(reconciliation, "RETRY_FIRST", 0.4)   # seconds, to keep the test short
    st = project_on(redis_conn, ls)
    model = SubdiscModel(redis_conn, queue_name=QUEUE)
    ls.stop()
    # A refit reconciles while Label Studio is down: the claim (60 s) is taken, and given back early.
    failed = reconcile_if_due(model, "1")
    assert failed["status"].startswith("incomplete")
    assert 0 < claim_ms(st) <= 400 and failed["retry_in"] == pytest.approx(0.4)
    assert reconcile_if_due(model, "1") is None              # not at once again: no hot loop
    time.sleep(0.5)
    assert reconcile_if_due(model, "1")["retry_in"] == pytest.approx(0.8)   # backing off
    ls.restart()
    # Label Studio is back and a webhook comes within the interval: once the backoff has passed,
    # it queues the reconciliation (before, the claim held for the whole 60 s and nothing came).
    assert schedule_reconcile(redis_conn, QUEUE, "1") is None
    time.sleep(0.9)
    assert schedule_reconcile(redis_conn, QUEUE, "1") is not None
    done = reconcile(model, "1")                              # what that job runs
    assert done["status"] == "ok" and done["recorded"] == 1
    assert redis_conn.get(st.key("reconcile_failures")) is None   # the next failure starts at 0.4 s
    assert claim_ms(st) > 50_000                              # and the next one is due in 60 s


def test_the_backoff_never_exceeds_the_interval(redis_conn, ls, monkeypatch):
    monkeypatch.setenv("SUBDISC_RECONCILE_SECONDS", "12")
    st = project_on(redis_conn, ls)
    model = SubdiscModel(redis_conn, queue_name=QUEUE)
    ls.stop()
    delays = [reconcile(model, "1")["retry_in"] for _ in range(4)]
    assert delays == [5.0, 10.0, 12.0, 12.0]
    assert 0 < claim_ms(st) <= 12_000
    assert st.annotations() == []                             # and an incomplete one deletes nothing


def test_due_projects_are_queued_once_and_only_with_a_label_studio(redis_conn, ls, monkeypatch):
    project_on(redis_conn, ls, "1")
    ProjectState(redis_conn, "2").save_settings(TWO_ATTRIBUTES)   # no host, no LABEL_STUDIO_URL
    queue = Queue(QUEUE, connection=redis_conn)
    queue.empty()
    other = queue.enqueue("builtins.print", "photos already queued")
    # Two workers look at once: one reconciliation is queued, at the front, for project 1 only.
    (job_id,) = schedule_due_reconciliations(redis_conn, QUEUE)
    assert schedule_due_reconciliations(redis_conn, QUEUE) == []
    assert queue.job_ids == [job_id, other.id]
    assert queue.fetch_job(job_id).args[0] == "1"
    assert not redis_conn.exists(ProjectState(redis_conn, "2").key("reconcile_claim"))
    # With LABEL_STUDIO_URL set, project 2 has a Label Studio to read too.
    monkeypatch.setenv("LABEL_STUDIO_URL", ls.url)
    (second,) = schedule_due_reconciliations(redis_conn, QUEUE)
    assert queue.fetch_job(second).args[0] == "2"
    queue.empty()


def test_workers_look_every_tenth_of_the_interval_within_bounds(monkeypatch):
    for seconds, every in (("2", 1.0), ("120", 12.0), ("300", 30.0), ("3600", 30.0)):
        monkeypatch.setenv("SUBDISC_RECONCILE_SECONDS", seconds)
        assert reconciliation.look_every() == every

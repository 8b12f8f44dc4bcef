"""Label Studio is the source of truth for confirmations: read them back and mend what webhooks missed.

    reconcile(model, "12")        # -> {"tasks": 640, "annotations": 212, "recorded": 3, "deleted": 1, ...}
    reconcile_if_due(model, "12") # the same at most once per SUBDISC_RECONCILE_SECONDS (or when forced)
    schedule_reconcile(redis, queue_name, "12", force=True)   # as an RQ job (from the webhook route)
    schedule_due_reconciliations(redis, queue_name)           # every due project (from the workers)

Webhooks are the fast path, and they can be lost: Label Studio does not resend a webhook answered
503 (Redis restarting) or not answered at all (backend down). So the backend pages through the
project's annotated tasks with their annotations (GET /api/tasks?project=ID&fields=all&page=N&
page_size=100, filtered on total_annotations or cancelled_annotations > 0: Label Studio ignores
page_size=-1) and, idempotently with what webhooks stored:
  * records every annotation we do not hold, or hold older (state.record_annotation compares
    updated_at: a replay changes nothing, a missed update wins);
  * forgets every annotation we hold that Label Studio no longer has (deleted while we did not
    hear), but only after a complete listing, and only those recorded before it began (one created
    meanwhile cannot be on a page already read).

When: a project is due once SUBDISC_RECONCILE_SECONDS (default 300) have passed since its last
reconciliation; a claim in Redis (ProjectState.claim_reconcile) makes each turn run once, whichever
process takes it. Then it runs
  * at the start of a refit job;
  * as its own job, queued by a webhook (at the front of the queue, as all reconciliations);
  * as its own job queued by a worker, which looks for due projects between jobs and every tenth
    of the interval when idle (1-30 s; workers/worker.py): so it comes even when no webhook and no
    refit does (webhooks lost while the backend was down, then the labelers stopped). Only projects
    with a Label Studio URL (LABEL_STUDIO_URL or /setup's hostname) are read;
  * and at once, due or not, after the backend answered a webhook 503 (backend/server.py).
A reconciliation that could not read Label Studio completely gives its claim back early: due again
after 5 s, doubling with each such one in a row, never later than the interval. One that changed
something queues a refit.
"""
from __future__ import annotations

import logging
import os
import time

import redis as redis_lib
from rq import Retry, get_current_job

from backend import runtime
from backend.annotations import AnnotationError
from backend.labelstudio import LabelStudio, LabelStudioError
from backend.state import ProjectState

log = logging.getLogger(__name__)

PAGE_SIZE = 100
#: Default seconds between two reconciliations of a project (SUBDISC_RECONCILE_SECONDS).
RECONCILE_SECONDS = 300.0
#: Seconds before an incomplete reconciliation may be retried; doubling with each one in a row,
#: never beyond the interval.
RETRY_FIRST = 5.0


class ReconcileError(Exception):
    """Label Studio could not be read completely; nothing was deleted."""


def interval() -> float:
    return float(os.environ.get("SUBDISC_RECONCILE_SECONDS") or RECONCILE_SECONDS)


def list_tasks(url: str, token: str | None, project: str, redis=None,
               page_size: int = PAGE_SIZE) -> list[dict]:
    """Every task of a project that holds an annotation (skipped ones included), with its
    annotations; ReconcileError if the listing is incomplete.

    A task not listed holds none, so what we hold of it was deleted: nothing is missed. Listing
    only these matters: whole tasks come with their predictions, and all 72 pages of a
    7,000-photo project cost Label Studio about a minute of CPU at each reconciliation, while its
    annotated tasks are the few a team has labelled so far.
    """
    annotated = [{"filter": f"filter:tasks:{column}", "operator": "greater", "type": "Number",
                  "value": 0} for column in ("total_annotations", "cancelled_annotations")]
    try:
        return LabelStudio(url, token, redis=redis).list_tasks(
            project, page_size=page_size, filters=annotated, conjunction="or", include=None,
            fields="all")
    except LabelStudioError as exc:
        raise ReconcileError(str(exc)) from None


def reconcile(model, project) -> dict:
    """Mend the project's stored confirmations from Label Studio's (see the module docstring).

    model: a backend.model.SubdiscModel (its config cache and annotation recording are reused).
    """
    st = ProjectState(model.redis, project)
    settings = st.settings()
    summary = {"project": st.id, "tasks": 0, "annotations": 0, "recorded": 0, "deleted": 0,
               "unreadable": 0, "status": "ok"}
    if not settings or not settings.get("label_config"):
        return summary | {"status": "not set up"}
    url, token = runtime.label_studio_target(settings)
    if url is None:
        return summary | {"status": "no Label Studio URL (set LABEL_STUDIO_URL)"}
    config = model.config(settings["label_config"])
    started = time.time()
    live: set[str] = set()
    try:
        for task in list_tasks(url, token, st.id, model.redis):
            summary["tasks"] += 1
            for annotation in task.get("annotations") or []:
                if not isinstance(annotation, dict) or annotation.get("id") is None:
                    continue
                summary["annotations"] += 1
                live.add(str(annotation["id"]))
                try:
                    if model._record_annotation(st, config, annotation, task):
                        summary["recorded"] += 1
                except AnnotationError as exc:
                    summary["unreadable"] += 1
                    log.warning("project %s: annotation %s unreadable: %s", st.id, annotation["id"], exc)
    except ReconcileError as exc:
        # Give the claim back early: the next trigger retries within seconds, not a whole interval
        # after Label Studio is back (a refit that failed here must not hold off the next webhook).
        retry_in = st.reconcile_incomplete(RETRY_FIRST, interval())
        log.warning("project %s: reconciliation stopped, nothing deleted (next try in %.0f s): %s",
                    st.id, retry_in, exc)
        return summary | {"status": f"incomplete: {exc}", "retry_in": retry_in}
    st.reconcile_complete()
    for entry in st.annotations():
        if str(entry["annotation_id"]) not in live and entry.get("recorded", started) < started:
            summary["deleted"] += int(st.delete_annotation(entry["annotation_id"]))
    if summary["recorded"] or summary["deleted"]:
        log.info("project %s: reconciliation with Label Studio recorded %d and deleted %d annotations "
                 "the webhooks missed", st.id, summary["recorded"], summary["deleted"])
    return summary


def reconcile_if_due(model, project, force: bool = False) -> dict | None:
    """reconcile() unless one ran less than SUBDISC_RECONCILE_SECONDS ago; never raises for Label
    Studio (a refit goes on without it). None when not due."""
    st = ProjectState(model.redis, project)
    if not (st.claim_reconcile(interval()) or force):
        return None
    try:
        return reconcile(model, st.id)
    except (LabelStudioError, ReconcileError) as exc:
        return {"project": st.id, "status": f"failed: {exc}",
                "retry_in": st.reconcile_incomplete(RETRY_FIRST, interval())}


def reconcile_project(project_id: str, pipeline_fingerprint: str | None = None) -> dict:
    """RQ job: reconcile one project, and queue a refit if that changed its confirmations."""
    from backend.model import SubdiscModel
    from workers.connection import job_redis

    model = SubdiscModel.from_env(job_redis(), pipeline_fingerprint)
    job = get_current_job()
    if job is not None:
        model.queue_name = job.origin    # the refit goes where this job came from
    # An incomplete one returns (it does not raise): an RQ retry would come at once, while the
    # shortened claim lets the next trigger retry with a backoff.
    summary = reconcile(model, project_id)
    if summary["recorded"] or summary["deleted"]:
        summary["refit"] = model.schedule_refit(ProjectState(model.redis, project_id))
    return summary


def schedule_reconcile(redis: redis_lib.Redis, queue_name: str, project,
                       pipeline_fingerprint: str | None = None, force: bool = False) -> str | None:
    """Queue reconcile_project when due (or forced); returns the job id, or None."""
    from workers.client import queue_for

    st = ProjectState(redis, project)
    if not st.claim_reconcile(interval()) and not force:
        return None
    # At the front: a few GETs that recover lost confirmations should not wait behind hundreds of
    # photos; and one that waited past the interval would be queued again by the next trigger.
    job = queue_for(redis, queue_name).enqueue(
        reconcile_project, st.id, pipeline_fingerprint, job_timeout=1800, retry=Retry(max=2),
        result_ttl=24 * 3600, failure_ttl=7 * 24 * 3600, description=f"reconcile project {st.id}",
        at_front=True)
    log.info("project %s: reconciliation with Label Studio queued (%s)", st.id, job.id)
    return job.id


def schedule_due_reconciliations(redis: redis_lib.Redis, queue_name: str) -> list[str]:
    """Queue reconcile_project for every known project that has a Label Studio to read and is due
    (its claim lapsed: SUBDISC_RECONCILE_SECONDS since the last one, or the backoff after an
    incomplete one); returns the job ids. The claim is taken in Redis, so of N workers looking at
    once, one queues it. The workers call this between jobs and when idle (workers/worker.py)."""
    jobs = []
    for project in ProjectState.projects(redis):
        settings = ProjectState(redis, project).settings() or {}
        if not settings.get("label_config") or runtime.label_studio_target(settings)[0] is None:
            continue     # nothing to read back from: no claim taken, no job queued
        job_id = schedule_reconcile(redis, queue_name, project)
        if job_id:
            jobs.append(job_id)
    return jobs


def look_every() -> float:
    """Seconds between two looks of a worker for due projects: a tenth of the interval, within
    1-30 s. A look is a few Redis commands; an idle worker wakes for nothing more often than that."""
    return min(30.0, max(1.0, interval() / 10))

"""The refit RQ job: a plain function of a project id, queued at most once at a time per project.

    schedule_refit(redis, queue_name, "12")      # from a webhook: returns the job id, or None if
                                                 # a refit is queued already (it will see this event)
    refit_project("12")                          # what the worker runs

A refit first reconciles the project with Label Studio when one is due (backend/reconcile.py), then
fits under the project's refit lock (ProjectState.refit_lock: 60 s TTL, renewed while it runs). A
refit that cannot get the lock in time (another one is running) does not wait on: it leaves a note,
and the running refit queues a new one when it ends, so no confirmation waits for a refit that never
comes and no worker waits an hour.
"""
from __future__ import annotations

import logging

import redis as redis_lib
from rq import Retry, get_current_job
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from backend.model import SubdiscModel
from backend.state import LockBusy, ProjectState
from workers.connection import job_redis

log = logging.getLogger(__name__)

#: Seconds a refit may run (clustering a big project with all candidates takes a while).
REFIT_TIMEOUT = 3600
#: A queued refit whose job is in none of these states is gone: a new one may be queued.
_ALIVE = (JobStatus.QUEUED, JobStatus.STARTED, JobStatus.DEFERRED, JobStatus.SCHEDULED)


def refit_project(project_id: str, pipeline_fingerprint: str | None = None) -> dict:
    """RQ job: reconcile with Label Studio if due, then refit one project's model (SubdiscModel.refit).

    pipeline_fingerprint: the scheduler's, so the job reads the same cache entries it does.
    """
    from backend.reconcile import reconcile_if_due

    redis = job_redis()
    st = ProjectState(redis, project_id)
    # From now on a new confirmation needs another refit: let the next webhook queue it.
    st.refit_started()
    model = SubdiscModel.from_env(redis, pipeline_fingerprint)
    job = get_current_job()
    if job is not None:
        model.queue_name = job.origin    # a refit queued from here goes where this one came from
    reconciled = reconcile_if_due(model, st.id)
    try:
        summary = model.refit(project_id)
    except LockBusy as exc:
        st.want_refit()
        log.info("%s: the running refit will queue another when done", exc)
        return {"project": st.id, "status": "busy", "reconcile": reconciled}
    if st.take_refit_wanted():
        schedule_refit(redis, model.queue_name, st.id, pipeline_fingerprint)
    return summary | {"reconcile": reconciled}


def schedule_refit(redis: redis_lib.Redis, queue_name: str, project_id: str,
                   pipeline_fingerprint: str | None = None) -> str | None:
    """Queue a refit unless one is queued and not started yet; returns the new job's id."""
    from workers.client import queue_for

    st = ProjectState(redis, project_id)
    if not st.claim_refit() and not _queued_refit_is_gone(redis, st):
        return None
    try:
        job = queue_for(redis, queue_name).enqueue(
            # No retry interval: interval retries need a worker started --with-scheduler.
            refit_project, st.id, pipeline_fingerprint, job_timeout=REFIT_TIMEOUT, retry=Retry(max=2),
            result_ttl=24 * 3600, failure_ttl=7 * 24 * 3600, description=f"refit project {st.id}")
    except Exception:
        st.refit_started()   # nothing queued after all: do not block the next attempt
        raise
    st.set_queued_refit(job.id)
    log.info("project %s: refit queued (%s)", st.id, job.id)
    return job.id


def _queued_refit_is_gone(redis: redis_lib.Redis, st: ProjectState) -> bool:
    """The claim names a job that failed, finished or vanished (a Redis restart, retries used
    up): drop the claim and take a new one, rather than wait for it to lapse."""
    job_id = st.queued_refit()
    if job_id is None:
        return st.claim_refit()
    if job_id.startswith("claim:"):      # being queued right now by another process
        return False
    try:
        status = Job.fetch(job_id, connection=redis).get_status()
    except NoSuchJobError:
        status = None
    if status in _ALIVE:
        return False
    st.refit_started()
    return st.claim_refit()

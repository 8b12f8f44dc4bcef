"""The refit RQ job: a plain function of a project id, queued at most once at a time per project.

    schedule_refit(redis, queue_name, "12")      # from a webhook: returns the job id, or None if
                                                 # a refit is queued already (it will see this event)
    refit_project("12")                          # what the worker runs
"""
from __future__ import annotations

import logging

import redis as redis_lib
from rq import Retry

from backend.model import SubdiscModel
from backend.state import ProjectState
from workers.connection import job_redis

log = logging.getLogger(__name__)

#: Seconds a refit may run (clustering a big project with all candidates takes a while).
REFIT_TIMEOUT = 3600


def refit_project(project_id: str, pipeline_fingerprint: str | None = None) -> dict:
    """RQ job: refit one project's model (see SubdiscModel.refit).

    pipeline_fingerprint: the scheduler's, so the job reads the same cache entries it does.
    """
    redis = job_redis()
    st = ProjectState(redis, project_id)
    # From now on a new confirmation needs another refit: let the next webhook queue it.
    st.refit_started()
    return SubdiscModel.from_env(redis, pipeline_fingerprint).refit(project_id)


def schedule_refit(redis: redis_lib.Redis, queue_name: str, project_id: str,
                   pipeline_fingerprint: str | None = None) -> str | None:
    """Queue a refit unless one is queued and not started yet; returns the new job's id."""
    from workers.client import queue_for

    st = ProjectState(redis, project_id)
    if not st.claim_refit():
        return None
    try:
        job = queue_for(redis, queue_name).enqueue(
            # No retry interval: interval retries need a worker started --with-scheduler.
            refit_project, st.id, pipeline_fingerprint, job_timeout=REFIT_TIMEOUT, retry=Retry(max=2),
            result_ttl=24 * 3600, failure_ttl=7 * 24 * 3600, description=f"refit project {st.id}")
    except Exception:
        st.refit_started()   # nothing queued after all: do not block the next attempt
        raise
    log.info("project %s: refit queued (%s)", st.id, job.id)
    return job.id

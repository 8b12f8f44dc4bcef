"""Where the shared state is: the Redis URL and the RQ queue name, from the environment.

    SUBDISC_REDIS_URL   Redis holding the embedding cache, the project state and the RQ queue
                        (default redis://127.0.0.1:6379/0)
    SUBDISC_QUEUE       the workers' RQ queue (default "subdisc")

Read at call time, not import time, so a process that sets them before use is obeyed.
"""
from __future__ import annotations

import os

import redis as redis_lib

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_QUEUE = "subdisc"


def redis_url() -> str:
    return os.environ.get("SUBDISC_REDIS_URL") or DEFAULT_REDIS_URL


def redis_from_env() -> redis_lib.Redis:
    return redis_lib.Redis.from_url(redis_url())


def queue_name() -> str:
    return os.environ.get("SUBDISC_QUEUE") or DEFAULT_QUEUE


def job_redis() -> redis_lib.Redis:
    """In an RQ job, the connection of the job running this code; elsewhere one from the env."""
    from rq import get_current_job

    job = get_current_job()
    return job.connection if job is not None else redis_from_env()

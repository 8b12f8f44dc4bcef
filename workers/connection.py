"""Where the shared state is: the Redis URL and the RQ queue name, from the environment.

    SUBDISC_REDIS_URL   Redis holding the embedding cache, the project state and the RQ queue
                        (default redis://127.0.0.1:6379/0)
    SUBDISC_QUEUE       the workers' RQ queue (default "subdisc")

Read at call time, not import time, so a process that sets them before use is obeyed.

redis_from_env's clients give up on an unreachable Redis within about a second and a half (a few
retries with a short backoff), so a web request answers 503 while Redis restarts instead of holding
a thread for redis-py's default ~6 s; the next command reconnects by itself. RQ workers ride out
longer outages on their own (workers/worker.py).
"""
from __future__ import annotations

import os

import redis as redis_lib
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_QUEUE = "subdisc"


def redis_url() -> str:
    return os.environ.get("SUBDISC_REDIS_URL") or DEFAULT_REDIS_URL


def redis_from_env() -> redis_lib.Redis:
    return redis_lib.Redis.from_url(redis_url(), socket_connect_timeout=2, socket_keepalive=True,
                                    retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 4),
                                    health_check_interval=30)


def queue_name() -> str:
    return os.environ.get("SUBDISC_QUEUE") or DEFAULT_QUEUE


def job_redis() -> redis_lib.Redis:
    """In an RQ job, the connection of the job running this code; elsewhere one from the env."""
    from rq import get_current_job

    job = get_current_job()
    return job.connection if job is not None else redis_from_env()

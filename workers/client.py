"""Embedding many images: answer from the cache, queue the rest on RQ workers, wait, collect.

    results = embed(paths, redis=redis.Redis())            # {source: ImageResult}
    results.summary                                        # images, faces, hits, errors by kind, ...

With inline=True the same job function runs in this process (still caching in Redis): a quick try
without workers. The queue is a detail: everything durable is in the cache, so a worker killed
mid-batch loses nothing (RQ retries the job, and images done before the kill are cache hits).
"""
from __future__ import annotations

import time
from collections import Counter

import redis as redis_lib
from rq import Queue, Retry
from rq.job import Job, JobStatus
from tqdm import tqdm

from workers.cache import EmbeddingCache
from workers.connection import queue_name as default_queue_name
from workers.images import FetchSettings, ImageError, source_identity
from workers.jobs import embed_batch, embed_source
from workers.pipeline import PipelineOptions, fingerprint
from workers.results import ImageResult

#: Seconds a batch may run per image before RQ stops it (the CNN detector on a big photo is slow).
SECONDS_PER_IMAGE = 60
#: How often a job is retried when its worker dies or Redis fails under it.
JOB_RETRIES = 2
#: Photos per job by default (SUBDISC_BATCH_SIZE). Every job costs a work-horse fork and its
#: bookkeeping, ~0.1 CPU-s (measured, bench/embed.py, 1 worker, 300 LFW photos: 31 photos per
#: CPU-second in jobs of 8, 36 of 16, 45 of 32; 47 in one process with no jobs at all). Smaller
#: jobs show their first predictions sooner; a job of 32 takes about a second of one core.
BATCH_SIZE = 32


class Embeddings(dict):
    """{source: ImageResult} in the order asked, with a `summary` of the run."""

    summary: dict


def queue_for(redis: redis_lib.Redis, name: str | None = None) -> Queue:
    """The workers' queue: `name`, else $SUBDISC_QUEUE, else "subdisc"."""
    return Queue(name or default_queue_name(), connection=redis)


def job_settings(n_images: int, extra_seconds: float = 120) -> dict:
    """RQ enqueue options of a job over `n_images` photos: its timeout, retries and TTLs."""
    return dict(job_timeout=SECONDS_PER_IMAGE * n_images + extra_seconds,
                # No retry interval: delayed retries need a scheduler process; an immediate
                # requeue does not.
                retry=Retry(max=JOB_RETRIES),
                result_ttl=3600, failure_ttl=7 * 24 * 3600)


def enqueue_embedding(queue: Queue, sources: list[str], options: PipelineOptions,
                      fetch: FetchSettings | None = None, retry_errors: bool = False,
                      batch_size: int = BATCH_SIZE) -> list[Job]:
    """Queue `embed_batch` jobs over `sources` in batches; returns the jobs."""
    fetch_dict = fetch.to_dict() if fetch is not None else None
    jobs = []
    for start in range(0, len(sources), batch_size):
        batch = sources[start:start + batch_size]
        jobs.append(queue.enqueue(
            embed_batch, batch, options.to_dict(), fetch_dict, retry_errors,
            **job_settings(len(batch)), description=f"embed {len(batch)} images ({batch[0]} ...)"))
    return jobs


def embed(sources: list[str], *, redis: redis_lib.Redis,
          options: PipelineOptions = PipelineOptions(), inline: bool = False,
          progress: bool = True, fetch: FetchSettings | None = None, retry_errors: bool = False,
          queue_name: str | None = None, batch_size: int = BATCH_SIZE,
          timeout: float | None = None) -> Embeddings:
    """Faces for every source (cached, computed inline, or by RQ workers), in the order given.

    Sources that cannot be read get a failed ImageResult with the reason; nothing is left out.
    timeout: seconds to wait for the workers (None: as long as jobs are alive).
    """
    started = time.perf_counter()
    fetch = fetch or FetchSettings.from_env()
    cache = EmbeddingCache(redis, fingerprint(options))
    sources = list(dict.fromkeys(sources))
    results: dict[str, ImageResult] = {}
    how: Counter = Counter()

    identities = {}
    for source in sources:
        try:
            identities[source] = source_identity(source, fetch)
        except ImageError as exc:
            results[source] = ImageResult.failed(exc.kind, exc.message)
    known = dict(zip(identities, cache.lookup_many(list(identities.values()))))
    todo = []
    for source, cached in known.items():
        if cached is not None and (cached.ok or not retry_errors):
            results[source] = cached
            how["hit"] += cached.ok
        else:
            todo.append(source)

    bar = tqdm(total=len(sources), initial=len(results), unit="img", disable=not progress,
               desc="embedding", smoothing=0.1)
    if inline:
        for source in todo:
            results[source], kind = embed_source(source, options, fetch, cache, retry_errors)
            how[kind] += 1  # "hit", "computed" or "error"
            bar.update(1)
    elif todo:
        jobs = enqueue_embedding(queue_for(redis, queue_name), todo, options, fetch, retry_errors,
                                 batch_size)
        failures = _wait(jobs, bar, timeout)
        for job in jobs:
            if job.get_status() == JobStatus.FINISHED:
                how["computed"] += job.return_value()["computed"]
                how["hit"] += job.return_value()["hits"]
        fresh = cache.lookup_many([identities[s] for s in todo])
        for source, result in zip(todo, fresh):
            if result is None:  # its job failed for good: say why, never drop the image
                reason = failures.get(source, "the job did not finish")
                result = ImageResult.failed("job_failed", reason)
            results[source] = result
    bar.close()

    ordered = Embeddings((s, results[s]) for s in sources)
    seconds = time.perf_counter() - started
    ordered.summary = {
        "images": len(sources),
        "faces": sum(len(r.faces) for r in ordered.values()),
        "hits": how["hit"],
        "computed": how["computed"],
        "errors": dict(Counter(r.error for r in ordered.values() if not r.ok)),
        "seconds": round(seconds, 3),
        "images_per_second": round(len(sources) / seconds, 2) if seconds > 0 else None,
    }
    return ordered


# A job that failed and has retries left is queued again by RQ, so FAILED here is final.
_DONE = (JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED)


def _wait(jobs: list[Job], bar: tqdm, timeout: float | None) -> dict[str, str]:
    """Wait until every job finished or failed for good; returns {source: reason} of failures."""
    deadline = None if timeout is None else time.monotonic() + timeout
    pending = {job.id: job for job in jobs}
    failures: dict[str, str] = {}
    queue = Queue(jobs[0].origin, connection=jobs[0].connection)
    last_cleanup = time.monotonic()
    while pending:
        statuses = Job.fetch_many(list(pending), connection=queue.connection)
        for job in statuses:
            if job is None:
                continue
            status = job.get_status(refresh=False)
            if status in _DONE:
                del pending[job.id]
                bar.update(len(job.args[0]))
                if status != JobStatus.FINISHED:
                    reason = _failure_reason(job)
                    failures.update({source: reason for source in job.args[0]})
        if time.monotonic() - last_cleanup > 5:
            # A worker killed outright leaves its job "started" until its heartbeat expires; the
            # registry cleanup then retries it (RQ workers also do this, but only every few minutes).
            queue.started_job_registry.cleanup()
            last_cleanup = time.monotonic()
        if deadline is not None and time.monotonic() > deadline:
            for job in pending.values():
                failures.update({s: "timed out waiting for a worker" for s in job.args[0]})
            break
        if pending:
            time.sleep(0.2)
    return failures


def _failure_reason(job: Job) -> str:
    result = job.latest_result()
    text = (result.exc_string if result is not None else None) or "the job failed"
    return text.strip().splitlines()[-1]

"""The async half of /predict: embed uncached photos on the workers, then POST their predictions.

    enqueue_predictions(redis, queue_name, project_id, [(task_id, source), ...], options, fetch)

One RQ job per batch of photos (`predict_batch`) embeds the batch into the cache (the workers'
`embed_batch`, called in-process) and then POSTs the batch's predictions to Label Studio's
/api/predictions, so predictions appear batch by batch while the rest is still embedding.

Why one job and not an embedding job plus a dependent posting job: RQ 3.0 moves a finished job's
dependents through a shared "ready" registry, and when two workers drain it at once one of them can
skip a dependent, which then waits for RQ's maintenance pass (every 10 minutes). On "Retrieve
predictions" over 1,000 tasks with 2 workers that left a few batches unposted. A single job has
nothing to link; a retry (Redis trouble, an unreachable Label Studio) redoes nothing that was
cached or posted.

When the last batch of a request is posted, a refit is queued so the model covers all new faces.
"""
from __future__ import annotations

import logging
import uuid

import redis as redis_lib
from rq import get_current_job

from backend.model import SubdiscModel
from backend.state import ProjectState
from workers.client import job_settings, queue_for
from workers.connection import job_redis
from workers.images import FetchSettings
from workers.jobs import embed_batch
from workers.pipeline import PipelineOptions

log = logging.getLogger(__name__)

#: Seconds the remaining-batches counter of one request lives.
RUN_TTL = 7 * 24 * 3600
#: Seconds a batch may spend posting its predictions (post_predictions backs off per POST).
POST_SECONDS = 600


def _run_key(redis: redis_lib.Redis, project_id: str, run: str) -> str:
    """The counter of a request's batches still to post."""
    return ProjectState(redis, project_id).key(f"run:{run}")


def enqueue_predictions(redis: redis_lib.Redis, queue_name: str, project_id: str,
                        items: list[tuple[str, str]], options: PipelineOptions,
                        fetch: FetchSettings, batch_size: int = 8,
                        pipeline_fingerprint: str | None = None) -> list:
    """Queue one `predict_batch` job per `batch_size` (task id, source) pairs; returns the jobs."""
    queue = queue_for(redis, queue_name)
    batches = [items[start:start + batch_size] for start in range(0, len(items), batch_size)]
    run = uuid.uuid4().hex[:12]
    redis.set(_run_key(redis, project_id, run), len(batches), ex=RUN_TTL)
    jobs = []
    for batch in batches:
        jobs.append(queue.enqueue(
            predict_batch, project_id, [tid for tid, _ in batch], [src for _, src in batch],
            options.to_dict(), fetch.to_dict(), run, pipeline_fingerprint,
            # post_predictions backs off between tries at one POST; RQ's retries are immediate.
            **job_settings(len(batch), extra_seconds=POST_SECONDS),
            description=f"predict {len(batch)} tasks (project {project_id})"))
    log.info("project %s: %d tasks queued in %d batches (run %s)", project_id, len(items),
             len(batches), run)
    return jobs


def predict_batch(project_id: str, task_ids: list[str], sources: list[str], options: dict,
                  fetch: dict, run: str | None = None,
                  pipeline_fingerprint: str | None = None) -> dict:
    """RQ job: embed a batch of tasks' photos into the cache, then POST their predictions.

    Only Redis errors and a transient Label Studio failure escape (RQ then retries the job, at
    most twice; on the last attempt a POST that still fails is recorded as the task's error).
    A photo that cannot be read or has no face is posted as an empty result with its reason.
    """
    redis = job_redis()
    embedded = embed_batch(sources, options, fetch, redis=redis)
    model = SubdiscModel.from_env(redis, pipeline_fingerprint)
    job = get_current_job()
    # On the last attempt, a POST still failing is recorded per task instead of raised, so the
    # request's refit still comes and the report says which tasks have no prediction and why.
    last_attempt = job is None or not job.retries_left
    summary = model.post_predictions(project_id, task_ids, last_attempt=last_attempt)
    summary["embedding"] = embedded
    if summary["retry"]:
        # Raise so RQ retries; tasks already posted with this version are skipped next time.
        raise RuntimeError(f"{summary['retry']} predictions not posted yet: {summary['failures'][0]}")
    if run is not None:
        if redis.decr(_run_key(redis, project_id, run)) == 0:
            redis.delete(_run_key(redis, project_id, run))
            summary["refit"] = model.schedule_refit(ProjectState(redis, project_id))
    return summary

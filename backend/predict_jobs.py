"""The async half of /predict: embed uncached photos on the workers, then POST their predictions.

    enqueue_predictions(redis, queue_name, project_id, [(task_id, source), ...], options, fetch)

For each batch of photos: an embedding job (workers.client.enqueue_embedding) and a dependent job
that, once the faces are cached, builds the batch's predictions and POSTs them to Label Studio's
/api/predictions. The dependent job runs even if the embedding failed for good (it then posts an
empty result and records why), and goes to the front of the queue so predictions appear while the
rest is still embedding. When the last batch of a request is posted, a refit is queued so the model
covers all the new faces.
"""
from __future__ import annotations

import logging
import uuid

import redis as redis_lib
from rq import Retry
from rq.job import Dependency

from workers.client import enqueue_embedding, queue_for
from workers.connection import job_redis
from workers.images import FetchSettings
from workers.pipeline import PipelineOptions

log = logging.getLogger(__name__)

#: Seconds the remaining-batches counter of one request lives.
RUN_TTL = 7 * 24 * 3600


def _run_key(project_id: str, run: str) -> str:
    return f"subdisc:v1:project:{project_id}:run:{run}"


def enqueue_predictions(redis: redis_lib.Redis, queue_name: str, project_id: str,
                        items: list[tuple[str, str]], options: PipelineOptions,
                        fetch: FetchSettings, batch_size: int = 8,
                        pipeline_fingerprint: str | None = None) -> list:
    """Queue embedding + posting for (task id, source) pairs; returns the posting jobs."""
    queue = queue_for(redis, queue_name)
    embed_jobs = enqueue_embedding(queue, [source for _, source in items], options, fetch,
                                   batch_size=batch_size)
    run = uuid.uuid4().hex[:12]
    redis.set(_run_key(project_id, run), len(embed_jobs), ex=RUN_TTL)
    post_jobs = []
    for n, job in enumerate(embed_jobs):
        task_ids = [tid for tid, _ in items[n * batch_size:(n + 1) * batch_size]]
        post_jobs.append(queue.enqueue(
            post_batch, project_id, task_ids, run, pipeline_fingerprint,
            depends_on=Dependency(jobs=[job], allow_failure=True, enqueue_at_front=True),
            # Immediate retries: interval retries would need workers started --with-scheduler,
            # and post_predictions already backs off between attempts at one POST.
            job_timeout=600, retry=Retry(max=2),
            result_ttl=3600, failure_ttl=7 * 24 * 3600,
            description=f"post predictions of {len(task_ids)} tasks (project {project_id})"))
    log.info("project %s: %d tasks queued in %d batches (run %s)", project_id, len(items),
             len(embed_jobs), run)
    return post_jobs


def post_batch(project_id: str, task_ids: list[str], run: str | None = None,
               pipeline_fingerprint: str | None = None) -> dict:
    """RQ job: predict a batch whose faces are cached and POST it to Label Studio."""
    from backend.model import SubdiscModel
    from backend.refit import schedule_refit

    model = SubdiscModel.from_env(job_redis(), pipeline_fingerprint)
    summary = model.post_predictions(project_id, task_ids)
    if summary["retry"]:
        # Raise so RQ retries; tasks already posted with this version are skipped next time.
        raise RuntimeError(f"{summary['retry']} predictions not posted yet: {summary['failures'][0]}")
    if run is not None:
        if model.redis.decr(_run_key(project_id, run)) == 0:
            model.redis.delete(_run_key(project_id, run))
            summary["refit"] = schedule_refit(model.redis, model.queue_name, project_id)
    return summary

"""The async half of predictions: embed uncached photos on the workers, then import their predictions.

    enqueue_predictions(redis, queue_name, project_id, [(task_id, source), ...], options, fetch)
    queue_tasks(model, project_id, {task_id: source})     # `subdisc up`: no "Retrieve predictions"

One RQ job per batch of photos (`predict_batch`) embeds the batch into the cache (the workers'
`embed_batch`, called in-process) and then imports the batch's predictions into Label Studio in one
request (backend/posting.py), so predictions appear batch by batch while the rest is still embedding.
Photos already cached need no worker time: `queue_tasks` gives them `post_batch` jobs, which only
predict and post.

Why one job and not an embedding job plus a dependent posting job: RQ 3.0 moves a finished job's
dependents through a shared "ready" registry, and when two workers drain it at once one of them can
skip a dependent, which then waits for RQ's maintenance pass (every 10 minutes). On "Retrieve
predictions" over 1,000 tasks with 2 workers that left a few batches unposted. A single job has
nothing to link; a retry (Redis trouble, an unreachable Label Studio) redoes nothing that was
cached or posted.

Placeholders: what /predict answered for uncached tasks ("+pending", empty) is stored by Label Studio
at its own pace, possibly after the real prediction. While /predict has handed out placeholders lately
(ProjectState.placeholders_out), each batch deletes those it finds next to a real prediction, and
when the last batch of a run is posted, `settle_placeholders` keeps doing so until Label Studio has
stopped storing predictions for the project (`queue_tasks` hands out none: no such look). Then a refit is queued so the
model covers all new faces.
"""
from __future__ import annotations

import logging
import time
import uuid

import redis as redis_lib
from rq import get_current_job

from backend.model import SubdiscModel
from backend.state import ProjectState
from workers.client import BATCH_SIZE, job_settings, queue_for
from workers.connection import job_redis
from workers.images import FetchSettings, ImageError, source_identity
from workers.jobs import embed_batch
from workers.pipeline import PipelineOptions

log = logging.getLogger(__name__)

#: Seconds the remaining-batches counter of one request lives.
RUN_TTL = 7 * 24 * 3600
#: Seconds a batch may spend posting its predictions (posting backs off per request).
POST_SECONDS = 600
#: A big request is cut into at most this many jobs (import requests): enough to keep a few
#: workers busy to the end; no job holds more than MAX_BATCH photos (~6 s of one core).
MAX_IMPORTS = 64
MAX_BATCH = 256
#: Seconds past a quiet spell that settle_placeholders still waits for placeholders handed out and
#: not yet stored (a client may never store them; this job holds a worker meanwhile).
LANDING_WAIT = 60.0
#: settle_placeholders stops once Label Studio's prediction count has not moved for this long...
SETTLE_QUIET = 20.0
#: ... or after this long in all (seconds), and looks every SETTLE_EVERY seconds.
SETTLE_LIMIT = 3600.0
SETTLE_EVERY = 2.0


def _run_key(redis: redis_lib.Redis, project_id: str, run: str) -> str:
    """The counter of a request's batches still to post."""
    return ProjectState(redis, project_id).key(f"run:{run}")


def import_size(n_items: int, batch_size: int = BATCH_SIZE) -> int:
    """Tasks per job (and so per import request) for a request of n_items: batch_size, or more
    when that would take more than MAX_IMPORTS requests, up to MAX_BATCH.

    Label Studio 1.23 (SQLite) started without its fast-import flag (backend.stack.
    FAST_PREDICTION_IMPORT, which subdisc up sets) recounts the whole project at each import
    request: ~5 s for 1, 32 or 256 predictions into a project of 7,199 tasks of which 5,200 held
    one. 7,199 photos in jobs of 32 made 225 such requests. With the flag it costs 0.05 s.

    >>> import_size(1000, 32), import_size(7199, 32), import_size(100_000, 32)
    (32, 113, 256)
    """
    return max(batch_size, min(MAX_BATCH, -(-n_items // MAX_IMPORTS)))


def _batches(items: list, size: int) -> list[list]:
    return [items[start:start + size] for start in range(0, len(items), size)]


def _new_run(redis: redis_lib.Redis, project_id: str, n_batches: int) -> str:
    run = uuid.uuid4().hex[:12]
    redis.set(_run_key(redis, project_id, run), n_batches, ex=RUN_TTL)
    return run


def enqueue_predictions(redis: redis_lib.Redis, queue_name: str, project_id: str,
                        items: list[tuple[str, str]], options: PipelineOptions,
                        fetch: FetchSettings, batch_size: int = BATCH_SIZE,
                        pipeline_fingerprint: str | None = None, cached: set | None = None) -> list:
    """Queue one job per `batch_size` (task id, source) pairs, or per more in a big request (at most
    MAX_IMPORTS jobs of at most MAX_BATCH: each job is one import request); returns the jobs.

    Tasks in `cached` (photos whose vectors are in the cache) get `post_batch` jobs, the others
    `predict_batch` jobs; all count in one run (its last batch settles placeholders and refits).
    """
    queue = queue_for(redis, queue_name)
    cached = cached or set()
    uncached = [i for i in items if i[0] not in cached]
    todo = _batches(uncached, import_size(len(uncached), batch_size))
    ready = _batches([i for i in items if i[0] in cached], max(batch_size, 200))
    if not todo and not ready:
        return []
    run = _new_run(redis, project_id, len(todo) + len(ready))
    jobs = []
    for batch in ready:
        jobs.append(queue.enqueue(
            post_batch, project_id, [tid for tid, _ in batch], run, pipeline_fingerprint,
            **job_settings(1, extra_seconds=POST_SECONDS),
            description=f"post {len(batch)} cached tasks (project {project_id})"))
    for batch in todo:
        jobs.append(queue.enqueue(
            predict_batch, project_id, [tid for tid, _ in batch], [src for _, src in batch],
            options.to_dict(), fetch.to_dict(), run, pipeline_fingerprint,
            # posting backs off between tries at one request; RQ's retries are immediate.
            **job_settings(len(batch), extra_seconds=POST_SECONDS),
            description=f"predict {len(batch)} tasks (project {project_id})"))
    log.info("project %s: %d tasks queued in %d batches, %d of them cached (run %s)", project_id,
             len(items), len(todo) + len(ready), len(cached), run)
    return jobs


def queue_tasks(model: SubdiscModel, project_id, tasks: dict, label_config: str | None = None) -> dict:
    """Predict a project's tasks without Label Studio's "Retrieve predictions" (`subdisc up`).

    tasks: {task id: image source} as Label Studio lists them; label_config: used if the project
    was never set up (Label Studio calls /setup when the backend is connected). Tasks already posted with the
    current model version are skipped, cached photos are posted without worker embedding, the
    others are embedded first; a task whose image cannot be read gets its error recorded (and an
    empty prediction, like /predict would give). Returns counts, and `waiting`: {task id: the
    model version it was posted with before (None: never)} of the tasks to post, so a caller can
    tell when each one is done (its version changed) even where it held an older prediction.
    """
    from backend import posting, runtime
    from backend.model import PENDING_TTL
    from backend.predictions import empty

    st = ProjectState(model.redis, project_id)
    # `label_config` only where /setup has not told us the project's own (it may be edited).
    config = model.project_config(st, None if (st.settings() or {}).get("label_config")
                                  else label_config)
    fetch = runtime.fetch_settings(st.settings())
    version = model.model_version(st.id, config)
    registry, errors = {}, {}
    for tid, source in tasks.items():
        tid = str(tid)
        try:
            registry[tid] = {"source": source, "identity": source_identity(source, fetch)}
        except ImageError as exc:
            errors[tid] = (exc.kind, exc.message)
    st.register_tasks(registry)
    st.record_errors(errors)
    posted = st.posted_versions(list(registry) + list(errors))
    # Unreadable photos get an empty prediction now, as /predict gives them: the task is done.
    broken = [(tid, empty(version)) for tid in errors if posted.get(tid) != version]
    ls = _label_studio(st)
    if broken and ls is not None:
        posting.send(ls, st, broken, last_attempt=True)
    wanted = [tid for tid in registry if posted.get(tid) != version]
    fresh = set(st.claim_pending(wanted, PENDING_TTL))
    items = [(tid, registry[tid]["source"]) for tid in wanted if tid in fresh]
    hits = model.cache.lookup_many([registry[tid]["identity"] for tid, _ in items])
    cached = {tid for (tid, _), hit in zip(items, hits) if hit is not None}
    jobs = enqueue_predictions(model.redis, model.queue_name, st.id, items, model.options, fetch,
                               model.batch_size, model.fingerprint, cached=cached)
    return {"tasks": len(tasks), "queued": len(items), "cached": len(cached),
            "already_posted": len(registry) - len(wanted), "unreadable": len(errors),
            "jobs": len(jobs), "version": version, "waiting": {tid: posted.get(tid) for tid in wanted}}


def predict_batch(project_id: str, task_ids: list[str], sources: list[str], options: dict,
                  fetch: dict, run: str | None = None,
                  pipeline_fingerprint: str | None = None) -> dict:
    """RQ job: embed a batch of tasks' photos into the cache, then post their predictions.

    Only Redis errors and a transient Label Studio failure escape (RQ then retries the job, at
    most twice; on the last attempt a post that still fails is recorded as the task's error).
    A photo that cannot be read or has no face is posted as an empty result with its reason.
    """
    redis = job_redis()
    embedded = embed_batch(sources, options, fetch, redis=redis)
    summary = _post(redis, project_id, task_ids, run, pipeline_fingerprint)
    summary["embedding"] = embedded
    return summary


def post_batch(project_id: str, task_ids: list[str], run: str | None = None,
               pipeline_fingerprint: str | None = None) -> dict:
    """RQ job: post the predictions of tasks whose photos are cached (nothing to embed)."""
    return _post(job_redis(), project_id, task_ids, run, pipeline_fingerprint)


def _post(redis, project_id, task_ids, run, pipeline_fingerprint) -> dict:
    model = SubdiscModel.from_env(redis, pipeline_fingerprint)
    job = get_current_job()
    if job is not None:
        model.queue_name = job.origin    # follow-up jobs go where this one came from
    # On the last attempt, a post still failing is recorded per task instead of raised, so the
    # request's refit still comes and the report says which tasks have no prediction and why.
    last_attempt = job is None or not job.retries_left
    summary = model.post_predictions(project_id, task_ids, last_attempt=last_attempt)
    if summary["retry"]:
        # Raise so RQ retries; tasks already posted with this version are skipped next time.
        raise RuntimeError(f"{summary['retry']} predictions not posted yet: {summary['failures'][0]}")
    st = ProjectState(redis, project_id)
    # Only while placeholders may be stored: each look is a filtered listing of the whole
    # project, which Label Studio (SQLite) answers in ~1 s at 7,000 tasks; `subdisc up` hands
    # out none, and looking after each of its batches made its imports wait on Label Studio.
    placeholders = st.placeholders_out()
    summary["placeholders_removed"] = _repair(st) if placeholders else 0
    if run is not None:
        if redis.decr(_run_key(redis, project_id, run)) == 0:
            redis.delete(_run_key(redis, project_id, run))
            summary["refit"] = model.schedule_refit(st)
            if placeholders:
                queue_for(redis, model.queue_name).enqueue(
                    settle_placeholders, st.id, job_timeout=int(SETTLE_LIMIT + 300),
                    result_ttl=3600, failure_ttl=7 * 24 * 3600,
                    description=f"settle placeholders (project {st.id})")
    return summary


def _label_studio(st: ProjectState):
    from backend import runtime
    from backend.labelstudio import LabelStudio

    url, token = runtime.label_studio_target(st.settings())
    return LabelStudio(url, token, redis=st.redis) if url else None


def _repair(st: ProjectState, ls=None) -> int:
    """Delete the project's placeholders that sit next to a real prediction (never raises: a
    failed repair is retried by the next batch and by settle_placeholders)."""
    from backend.labelstudio import LabelStudioError
    from backend.posting import repair_placeholders

    ls = ls or _label_studio(st)
    if ls is None:
        return 0
    try:
        removed = repair_placeholders(ls, st.id)
    except LabelStudioError as exc:
        log.warning("project %s: placeholders not checked: %s", st.id, exc)
        return 0
    st.placeholders_removed(removed)
    return removed


def _standing(st: ProjectState, ls) -> int | None:
    """Tasks holding a placeholder of ours alone, their real prediction not posted yet (None: not
    known now, or a placeholder already sits next to a real prediction and wants repairing first:
    it may have landed after the last repair, and counting it as standing would end settling one
    placeholder early)."""
    from backend.labelstudio import LabelStudioError
    from backend.posting import PENDING_SUFFIX

    try:
        held = ls.tasks_with_predictions(st.id, PENDING_SUFFIX, more_than=0)
        beside_real = ls.tasks_with_predictions(st.id, PENDING_SUFFIX, more_than=1) if held else []
    except LabelStudioError as exc:
        log.warning("project %s: %s", st.id, exc)
        return None
    return None if beside_real else len(held)


def settle_placeholders(project_id: str, quiet: float = SETTLE_QUIET, limit: float = SETTLE_LIMIT,
                        every: float = SETTLE_EVERY) -> dict:
    """RQ job: repair placeholders until every placeholder handed out has landed in Label Studio
    and its prediction count has stayed put for `quiet` s (waiting at most LANDING_WAIT s more for
    the landing, at most `limit` s in all).

    Label Studio stores a /predict answer long after the backend gave it (~12 items a second, and
    slower under load: a pause longer than `quiet` was seen), so a placeholder can land minutes
    after its task's real prediction. Quiet alone is not enough: the placeholders counted as
    handed out (ProjectState.placeholders) must all have been seen, deleted or still standing
    alone on a task whose real prediction is not posted yet.
    """
    from backend.labelstudio import LabelStudioError

    st = ProjectState(job_redis(), project_id)
    ls = _label_studio(st)
    if ls is None:
        return {"project": st.id, "removed": 0, "status": "no Label Studio URL"}
    started = moved = time.monotonic()
    removed, last, landed = 0, None, False
    while time.monotonic() - started < limit:
        got = _repair(st, ls)
        removed += got
        try:
            total = ls.total_predictions(st.id)
        except LabelStudioError as exc:
            log.warning("project %s: %s", st.id, exc)
            total = last
        if got or total != last:
            last, moved = total, time.monotonic()
        elif time.monotonic() - moved >= quiet:
            counts, standing = st.placeholders(), _standing(st, ls)
            landed = standing is not None and (
                counts.get("removed", 0) + standing >= counts.get("given", 0))
            # Not forever: a client may never store what /predict answered, and this job holds
            # a worker while it waits.
            if landed or time.monotonic() - moved >= quiet + LANDING_WAIT:
                break
        time.sleep(every)
    return {"project": st.id, "removed": removed, "landed": landed,
            "seconds": round(time.monotonic() - started, 1)}

"""RQ job functions: plain, importable functions that take image sources and fill the cache.

    embed_batch(["a.jpg", "b.jpg"], options={"fallback": True})

A job takes a batch so that model loading (once per worker process), Redis round trips and the
descriptor run are amortised: faces are found image by image, then one descriptor run covers the
chips of all of them. Each image is handled on its own: a bad photo becomes a typed error stored
for that photo and the batch goes on. Only failures that may pass (Redis down) escape the job, so RQ's retry
re-runs it; the images finished before the failure are then cache hits, so nothing is done twice.
"""
from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from dataclasses import dataclass

import redis as redis_lib

from workers.cache import EmbeddingCache
from workers.connection import job_redis
from workers.images import FetchSettings, ImageError, decode, read_bytes, source_identity
from workers.pipeline import MAX_CHIPS_PER_RUN, Found, PipelineOptions, fingerprint, get_pipeline
from workers.results import ImageResult

log = logging.getLogger(__name__)

#: Attempts for a network read that failed in a way that may pass, before it is recorded as an error.
NETWORK_ATTEMPTS = 3
#: Transient errors are cached only this long (seconds), so a host that was down is tried again later.
TRANSIENT_ERROR_TTL = 600


@dataclass(eq=False)
class _Found:
    """A read and decoded image whose faces are found, waiting for the batch's descriptor run."""

    source: str
    identity: str
    sha256: str
    width: int
    height: int
    found: Found


def _find(source: str, options: PipelineOptions, fetch: FetchSettings, cache: EmbeddingCache,
          retry_errors: bool) -> tuple[ImageResult, str] | _Found:
    """A cached or failed (result, how), or the image's faces found and waiting for descriptors."""
    try:
        identity = source_identity(source, fetch)
    except ImageError as exc:
        return ImageResult.failed(exc.kind, exc.message), "error"

    cached = cache.lookup(identity)
    if cached is not None and (cached.ok or not retry_errors):
        return cached, "hit" if cached.ok else "error"

    try:
        data = _read_with_retries(source, fetch)
    except ImageError as exc:
        failed = ImageResult.failed(exc.kind, exc.message)
        cache.put_source_error(identity, failed, ttl=TRANSIENT_ERROR_TTL if exc.transient else None)
        return failed, "error"

    sha256 = hashlib.sha256(data).hexdigest()
    cached = cache.get(sha256)
    if cached is not None and (cached.ok or not retry_errors):
        cache.remember_source(identity, sha256)  # same bytes under another name: no recompute
        return cached, "hit" if cached.ok else "error"

    try:
        rgb = decode(data, fetch)
    except ImageError as exc:
        result = ImageResult.failed(exc.kind, exc.message, sha256)
        cache.put(result, identity)
        return result, "error"
    return _Found(source, identity, sha256, rgb.shape[1], rgb.shape[0],
                  get_pipeline(options).find(rgb))


def _describe(found: list[_Found], options: PipelineOptions, cache: EmbeddingCache) -> list[ImageResult]:
    """One descriptor run over the chips of all `found` images; their results are cached."""
    faces = get_pipeline(options).describe([f.found for f in found])
    results = [ImageResult(f.sha256, f.width, f.height, image_faces)
               for f, image_faces in zip(found, faces)]
    cache.put_many([(result, f.identity) for result, f in zip(results, found)])
    return results


def embed_source(source: str, options: PipelineOptions, fetch: FetchSettings,
                 cache: EmbeddingCache, retry_errors: bool = False) -> tuple[ImageResult, str]:
    """Faces of one image, from the cache or computed (and cached).

    Returns (result, how): how is "hit" (cached), "computed", or "error" (result.error says which).
    Raises only redis errors; everything wrong with the image itself is in the result.
    """
    outcome = _find(source, options, fetch, cache, retry_errors)
    if isinstance(outcome, _Found):
        return _describe([outcome], options, cache)[0], "computed"
    return outcome


def _read_with_retries(source: str, fetch: FetchSettings) -> bytes:
    for attempt in range(1, NETWORK_ATTEMPTS + 1):
        try:
            return read_bytes(source, fetch)
        except ImageError as exc:
            if not exc.transient or attempt == NETWORK_ATTEMPTS:
                raise
            log.info("retrying %s after %s (attempt %d)", source, exc.message, attempt)
            time.sleep(0.5 * 2 ** attempt)
    raise AssertionError("unreachable")


def _pipeline_error(source: str, exc: Exception) -> ImageResult:
    log.error("%s: the face pipeline failed", source, exc_info=exc)
    return ImageResult.failed("pipeline_error", f"{type(exc).__name__}: {exc}")


def embed_batch(sources: list[str], options: dict | None = None, fetch: dict | None = None,
                retry_errors: bool = False, *, redis: redis_lib.Redis | None = None) -> dict:
    """RQ job: embed a batch of image sources into the cache. Returns a summary dict.

    sources: paths, file:// or http(s) URLs, or Label Studio /data/... URLs.
    options: PipelineOptions fields (defaults for the rest); fetch: FetchSettings fields, over the
    worker's environment (so a Label Studio token can come with the job).
    Each image is read, decoded and its faces found (detection, landmarks, chips) on its own; then
    one descriptor run covers the chips of the batch's images (up to MAX_CHIPS_PER_RUN faces a run),
    and their results are cached together.
    """
    started = time.perf_counter()
    pipeline_options = PipelineOptions.from_dict(options)
    fetch_settings = FetchSettings.from_env(**(fetch or {}))
    cache = EmbeddingCache(redis or job_redis(), fingerprint(pipeline_options))
    how_counts: Counter = Counter()
    errors: Counter = Counter()
    faces = 0
    waiting: list[_Found] = []

    def record(source: str, result: ImageResult, how: str) -> None:
        nonlocal faces
        how_counts[how] += 1
        faces += len(result.faces)
        if not result.ok:
            errors[result.error] += 1
            log.warning("%s: %s (%s)", source, result.error, result.message)

    def describe_waiting() -> None:
        try:
            results = _describe(waiting, pipeline_options, cache)
        except redis_lib.RedisError:
            raise
        except Exception:  # noqa: BLE001 -- one image's faces broke the run: redo them one by one
            results = []
            for item in waiting:
                try:
                    results += _describe([item], pipeline_options, cache)
                except redis_lib.RedisError:
                    raise
                except Exception as exc:  # noqa: BLE001
                    results.append(_pipeline_error(item.source, exc))
        for item, result in zip(waiting, results):
            record(item.source, result, "computed" if result.ok else "error")
        waiting.clear()

    for source in sources:
        try:
            outcome = _find(source, pipeline_options, fetch_settings, cache, retry_errors)
        except redis_lib.RedisError:
            raise  # may pass: RQ retries the job, and what was cached is not redone
        except Exception as exc:  # a bug or a dlib failure on one photo must not sink the batch
            outcome = _pipeline_error(source, exc), "error"
        if isinstance(outcome, _Found):
            waiting.append(outcome)
            if sum(len(item.found) for item in waiting) >= MAX_CHIPS_PER_RUN:
                describe_waiting()
        else:
            record(source, *outcome)
    if waiting:
        describe_waiting()
    return {
        "images": len(sources),
        "computed": how_counts["computed"],
        "hits": how_counts["hit"],
        "faces": faces,
        "errors": dict(errors),
        "seconds": round(time.perf_counter() - started, 3),
    }

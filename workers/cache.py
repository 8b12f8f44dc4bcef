"""The embedding cache in Redis: a photo's faces are computed once per pipeline fingerprint.

Two kinds of keys, both carrying the schema version and the pipeline fingerprint, so a changed option
or model never serves stale vectors:

    subdisc:v1:emb:<fingerprint>:<sha256 of the bytes>   -> ImageResult (binary), faces or decode error
    subdisc:v1:src:<fingerprint>:<source identity>       -> sha256, or a JSON error record

The first makes a renamed copy of a photo a cache hit (same bytes); the second lets a known source be
answered without reading it again, and remembers sources that could not be read at all (no bytes, no
hash), so a bad photo is not retried forever; jobs retry them when asked (`retry_errors`).
"""
from __future__ import annotations

import json

import redis as redis_lib

from workers.results import ImageResult

SCHEMA = "subdisc:v1"


class EmbeddingCache:
    """Get and put ImageResults for one pipeline fingerprint."""

    def __init__(self, redis: redis_lib.Redis, fingerprint: str):
        self.redis = redis
        self.fingerprint = fingerprint

    def _emb(self, sha256: str) -> str:
        return f"{SCHEMA}:emb:{self.fingerprint}:{sha256}"

    def _src(self, identity: str) -> str:
        return f"{SCHEMA}:src:{self.fingerprint}:{identity}"

    # --- by content --------------------------------------------------------------------------
    def get(self, sha256: str) -> ImageResult | None:
        data = self.redis.get(self._emb(sha256))
        return ImageResult.from_bytes(data) if data is not None else None

    def put(self, result: ImageResult, identity: str | None = None) -> None:
        """Store a result with bytes (faces or a decode error) and, if given, its source identity."""
        self.put_many([(result, identity)])

    def put_many(self, items: list[tuple[ImageResult, str | None]]) -> None:
        """`put` for several (result, identity) pairs in one Redis round trip."""
        if any(not result.sha256 for result, _ in items):
            raise ValueError("a result without a content hash is stored with put_source_error")
        with self.redis.pipeline() as pipe:
            for result, identity in items:
                pipe.set(self._emb(result.sha256), result.to_bytes())
                if identity is not None:
                    pipe.set(self._src(identity), result.sha256)
            pipe.execute()

    # --- by source ---------------------------------------------------------------------------
    def remember_source(self, identity: str, sha256: str) -> None:
        self.redis.set(self._src(identity), sha256)

    def put_source_error(self, identity: str, result: ImageResult, ttl: int | None = None) -> None:
        """Remember that a source could not be read (no bytes, so no content key).

        ttl (seconds) for errors that may pass, such as a host that did not answer.
        """
        record = {"error": result.error, "message": result.message}
        self.redis.set(self._src(identity), json.dumps(record), ex=ttl)

    def lookup(self, identity: str) -> ImageResult | None:
        """The cached result for a source identity, or None if it was never seen."""
        return self.lookup_many([identity])[0]

    def lookup_many(self, identities: list[str]) -> list[ImageResult | None]:
        """Batched `lookup`: two Redis round trips whatever the number of sources."""
        if not identities:
            return []
        records = self.redis.mget([self._src(i) for i in identities])
        shas = [r.decode() for r in records if r is not None and not r.startswith(b"{")]
        by_sha = {}
        if shas:
            for sha, data in zip(shas, self.redis.mget([self._emb(s) for s in shas])):
                if data is not None:
                    by_sha[sha] = ImageResult.from_bytes(data)
        results = []
        for record in records:
            if record is None:
                results.append(None)
            elif record.startswith(b"{"):
                error = json.loads(record)
                results.append(ImageResult.failed(error["error"], error["message"]))
            else:
                results.append(by_sha.get(record.decode()))
        return results

"""Everything the backend must not lose, per Label Studio project, in Redis.

Keys are `subdisc:v1:project:<id>:<what>`; processes keep nothing they cannot rebuild from here, so a
restarted server or worker carries on where it was:

    settings          JSON   label config, Label Studio host and token from /setup (and the host
                             the token came with)
    tasks             hash   task id -> {source, identity}: the photos the project showed us
    shown             hash   task id -> what we last pre-annotated (to count "accepted as is")
    annotations       hash   annotation id -> confirmed values (AnnotationRecord + what was shown)
    annotation_times  hash   annotation id -> its updated_at: a replay or an older update is ignored
    deleted           hash   annotation id -> when deleted: a late replay cannot bring it back
    model, model_meta        the fitted project model (bytes) and its JSON description
    model_version     str    what /setup answers; bumped by a refit that changes the model
    clusterings, clusterings_meta   candidate clusterings of the project's faces, reused by refits
    history           list   one JSON entry per refit that changed something
    errors            hash   task id -> why its photo gave no prediction
    pending, posted   hash   tasks queued for the async path / model version last POSTed per task
    placeholders      hash   "+pending" placeholders /predict handed out lately ("given") and how many
                             of them were deleted next to a real prediction ("removed"): Label
                             Studio may still store some, after the real one (backend/predict_jobs.py)
    lock:refit        str    held by the running refit: a 60 s TTL renewed while it runs, so a
                             holder killed (or a lock restored from the append-only file) frees it
                             within a minute
    refit_queued, refit_wanted   a refit is queued (its job id) / one was skipped while another ran
    reconcile_claim   str    a reconciliation with Label Studio was queued or ran recently; its TTL
                             is the interval, or the backoff after an incomplete one (backend/reconcile.py)
    reconcile_failures  int  incomplete reconciliations in a row (Label Studio down): the backoff
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time

import redis as redis_lib
from redis.exceptions import LockError

from backend.annotations import AnnotationRecord

SCHEMA = "subdisc:v1"
PROJECTS = f"{SCHEMA}:projects"
HISTORY_LIMIT = 1000
#: Seconds the refit lock lives unless renewed (SUBDISC_REFIT_LOCK_TTL); renewed every third of it.
REFIT_LOCK_TTL = 60.0
#: Seconds a refit waits for another one's lock before giving up (SUBDISC_REFIT_LOCK_WAIT): longer
#: than the TTL, so a dead holder's lock always expires within the wait.
REFIT_LOCK_WAIT = 90.0

log = logging.getLogger(__name__)


class LockBusy(Exception):
    """Another process holds the project's refit lock (or this one lost it): try again later."""


def lock_settings() -> tuple[float, float]:
    """(TTL, wait) of the refit lock in seconds, from the environment."""
    ttl = float(os.environ.get("SUBDISC_REFIT_LOCK_TTL") or REFIT_LOCK_TTL)
    wait = float(os.environ.get("SUBDISC_REFIT_LOCK_WAIT") or max(REFIT_LOCK_WAIT, 1.5 * ttl))
    return ttl, wait

# Compare-and-set of one annotation, atomic across server processes: store it only if it was not
# deleted and is newer than what we hold. A replayed or out-of-order webhook then changes nothing.
_RECORD = """
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then return 0 end
local held = redis.call('HGET', KEYS[2], ARGV[1])
if held and tonumber(held) >= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
"""


def project_id(value) -> str:
    """Label Studio's project reference -> our id: 12, "12", "12.1700000000" or {"id": 12} -> "12"."""
    if isinstance(value, dict):
        value = value.get("id")
    text = str(value if value is not None else "").strip()
    head = text.split(".", 1)[0]
    if not head.isdigit():
        raise ValueError(f"not a Label Studio project id: {value!r}")
    return str(int(head))


def _json(data):
    return None if data is None else json.loads(data)


class ProjectState:
    """Typed access to one project's keys."""

    def __init__(self, redis: redis_lib.Redis, project):
        self.redis = redis
        self.id = project_id(project)
        self.prefix = f"{SCHEMA}:project:{self.id}:"

    def key(self, name: str) -> str:
        return self.prefix + name

    @staticmethod
    def projects(redis: redis_lib.Redis) -> list[str]:
        return sorted((p.decode() for p in redis.smembers(PROJECTS)), key=int)

    # --- settings ----------------------------------------------------------------------------
    def save_settings(self, label_config: str, hostname: str | None = None,
                      access_token: str | None = None) -> None:
        old = self.settings() or {}
        settings = {"label_config": label_config,
                    # Keep what an earlier /setup told us when a later call leaves it out.
                    "hostname": hostname or old.get("hostname"),
                    "access_token": access_token or old.get("access_token"),
                    # The host the token came with: it is sent nowhere else, even when a later
                    # /setup names another host without a token (runtime.label_studio_target).
                    "token_hostname": ((hostname or old.get("hostname")) if access_token
                                       else old.get("token_hostname", old.get("hostname"))),
                    "updated": time.time()}
        with self.redis.pipeline() as pipe:
            pipe.set(self.key("settings"), json.dumps(settings))
            pipe.sadd(PROJECTS, self.id)
            pipe.execute()

    def settings(self) -> dict | None:
        return _json(self.redis.get(self.key("settings")))

    # --- tasks -------------------------------------------------------------------------------
    def register_tasks(self, entries: dict) -> None:
        """entries: {task id: {"source": ..., "identity": ...}}."""
        if entries:
            self.redis.hset(self.key("tasks"), mapping={str(t): json.dumps(e) for t, e in entries.items()})

    def tasks(self, task_ids=None) -> dict[str, dict]:
        if task_ids is None:
            raw = self.redis.hgetall(self.key("tasks"))
            return {k.decode(): json.loads(v) for k, v in raw.items()}
        ids = [str(t) for t in task_ids]
        if not ids:
            return {}
        values = self.redis.hmget(self.key("tasks"), ids)
        return {t: json.loads(v) for t, v in zip(ids, values) if v is not None}

    # --- what we showed ----------------------------------------------------------------------
    def remember_shown(self, shown: dict) -> None:
        if shown:
            self.redis.hset(self.key("shown"), mapping={str(t): json.dumps(s) for t, s in shown.items()})

    def shown(self, task_id) -> dict | None:
        return _json(self.redis.hget(self.key("shown"), str(task_id)))

    # --- confirmations -----------------------------------------------------------------------
    def record_annotation(self, record: AnnotationRecord, shown: dict | None = None) -> bool:
        """Store an annotation unless a newer (or equal) one, or its deletion, is already known.

        Returns True when something changed. `shown`: what we had pre-annotated on that task.
        """
        entry = record.to_dict() | {"shown": shown, "recorded": time.time()}
        changed = self.redis.eval(_RECORD, 3, self.key("annotations"), self.key("annotation_times"),
                                  self.key("deleted"), str(record.annotation_id),
                                  repr(float(record.updated_at)), json.dumps(entry))
        return bool(changed)

    def delete_annotation(self, annotation_id) -> bool:
        """Forget an annotation for good; True if we held it."""
        aid = str(int(annotation_id))
        with self.redis.pipeline() as pipe:
            pipe.hset(self.key("deleted"), aid, repr(time.time()))
            pipe.hdel(self.key("annotations"), aid)
            pipe.hdel(self.key("annotation_times"), aid)
            removed = pipe.execute()[1]
        return bool(removed)

    def annotations(self) -> list[dict]:
        """Every live annotation entry (AnnotationRecord dict + "shown"), oldest update first."""
        raw = self.redis.hvals(self.key("annotations"))
        return sorted((json.loads(v) for v in raw), key=lambda e: (e["updated_at"], e["annotation_id"]))

    # --- model -------------------------------------------------------------------------------
    def model_version(self) -> str | None:
        v = self.redis.get(self.key("model_version"))
        return v.decode() if v is not None else None

    def load_model(self) -> tuple[bytes, dict] | None:
        return self._load_blob("model")

    def save_model(self, blob: bytes, meta: dict) -> None:
        """Model, description and version together (readers never see a mix)."""
        self._save_blob("model", blob, meta, version=meta["version"])

    def load_clusterings(self) -> tuple[bytes, dict] | None:
        return self._load_blob("clusterings")

    def save_clusterings(self, blob: bytes, meta: dict) -> None:
        self._save_blob("clusterings", blob, meta)

    def _load_blob(self, name: str) -> tuple[bytes, dict] | None:
        """(bytes, JSON description) stored under `name` and `name`_meta, or None."""
        blob, meta = self.redis.mget([self.key(name), self.key(f"{name}_meta")])
        if blob is None or meta is None:
            return None
        return blob, json.loads(meta)

    def _save_blob(self, name: str, blob: bytes, meta: dict, version: str | None = None) -> None:
        with self.redis.pipeline() as pipe:   # MULTI/EXEC: both (and the version) or neither
            pipe.set(self.key(name), blob)
            pipe.set(self.key(f"{name}_meta"), json.dumps(meta))
            if version is not None:
                pipe.set(self.key(f"{name}_version"), version)
            pipe.execute()

    @contextlib.contextmanager
    def refit_lock(self, ttl: float | None = None, wait: float | None = None):
        """Hold the project's refit lock: one refit at a time, whichever process runs it.

        The lock expires `ttl` s after its last renewal; a thread renews it every ttl/3 while the
        body runs, so only a dead holder (SIGKILL, a lost host, a lock brought back by Redis' append-
        only file) lets it lapse, and then within `ttl`. Waits at most `wait` s for another holder,
        then raises LockBusy. Yields the redis Lock: `lock.owned()` tells whether it is still ours
        (a Redis outage longer than the TTL can cost it).
        """
        default_ttl, default_wait = lock_settings()
        ttl = default_ttl if ttl is None else ttl
        wait = default_wait if wait is None else wait
        # thread_local=False: the renewing thread must see the token the acquiring thread got.
        lock = self.redis.lock(self.key("lock:refit"), timeout=ttl, blocking_timeout=wait,
                               sleep=0.2, thread_local=False)
        if not lock.acquire():
            raise LockBusy(f"project {self.id}: another refit held the lock for {wait:.0f} s")
        stop = threading.Event()

        def renew():
            while not stop.wait(ttl / 3):
                try:
                    lock.reacquire()          # TTL back to `ttl`, only if the token is still ours
                except LockError:
                    log.warning("project %s: the refit lock expired under this refit", self.id)
                    return
                except redis_lib.RedisError as exc:   # Redis away: try again at the next tick
                    log.warning("project %s: cannot renew the refit lock: %s", self.id, exc)

        renewer = threading.Thread(target=renew, name=f"refit-lock-{self.id}", daemon=True)
        renewer.start()
        try:
            yield lock
        finally:
            stop.set()
            renewer.join()
            try:
                lock.release()
            except (LockError, redis_lib.RedisError):
                pass   # expired already, or Redis is away: it frees itself within `ttl`

    # --- history -----------------------------------------------------------------------------
    def append_history(self, entry: dict) -> None:
        with self.redis.pipeline() as pipe:
            pipe.rpush(self.key("history"), json.dumps(entry))
            pipe.ltrim(self.key("history"), -HISTORY_LIMIT, -1)
            pipe.execute()

    def history(self) -> list[dict]:
        return [json.loads(v) for v in self.redis.lrange(self.key("history"), 0, -1)]

    # --- errors ------------------------------------------------------------------------------
    def record_errors(self, errors: dict) -> None:
        """errors: {task id: (kind, message)}."""
        if errors:
            now = time.time()
            self.redis.hset(self.key("errors"), mapping={
                str(t): json.dumps({"error": k, "message": m, "at": now}) for t, (k, m) in errors.items()})

    def clear_errors(self, task_ids) -> None:
        ids = [str(t) for t in task_ids]
        if ids:
            self.redis.hdel(self.key("errors"), *ids)

    def errors(self) -> dict[str, dict]:
        return {k.decode(): json.loads(v) for k, v in self.redis.hgetall(self.key("errors")).items()}

    # --- async path bookkeeping --------------------------------------------------------------
    def claim_pending(self, task_ids, ttl: float) -> list[str]:
        """Mark tasks as queued for the async path; returns those not already queued (or expired).

        A task whose embedding is still in flight is not queued twice when Label Studio asks again.
        """
        ids = [str(t) for t in task_ids]
        if not ids:
            return []
        now = time.time()
        held = self.redis.hmget(self.key("pending"), ids)
        fresh = [t for t, h in zip(ids, held) if h is None or float(h) < now]
        if fresh:
            self.redis.hset(self.key("pending"), mapping={t: repr(now + ttl) for t in fresh})
        return fresh

    def placeholders_given(self, n: int, ttl: float) -> None:
        """/predict just answered with n placeholders: Label Studio may store them for a while (the
        count lives `ttl` s after the latest answer)."""
        with self.redis.pipeline() as pipe:
            pipe.hincrby(self.key("placeholders"), "given", int(n))
            pipe.pexpire(self.key("placeholders"), max(1, int(ttl * 1000)))
            pipe.execute()

    def placeholders_removed(self, n: int) -> None:
        """n placeholders of ours, stored next to a real prediction, were deleted."""
        if n and self.redis.exists(self.key("placeholders")):
            self.redis.hincrby(self.key("placeholders"), "removed", int(n))

    def placeholders(self) -> dict[str, int]:
        """{"given": placeholders handed out lately, "removed": of those, deleted since}; empty
        when none were handed out within the count's life."""
        return {k.decode(): int(v) for k, v in self.redis.hgetall(self.key("placeholders")).items()}

    def placeholders_out(self) -> bool:
        """Whether Label Studio may yet store a placeholder of ours (see placeholders_given)."""
        return bool(self.redis.exists(self.key("placeholders")))

    def release_pending(self, task_ids) -> None:
        ids = [str(t) for t in task_ids]
        if ids:
            self.redis.hdel(self.key("pending"), *ids)

    def posted_versions(self, task_ids) -> dict[str, str | None]:
        ids = [str(t) for t in task_ids]
        if not ids:
            return {}
        return {t: (v.decode() if v is not None else None)
                for t, v in zip(ids, self.redis.hmget(self.key("posted"), ids))}

    def mark_posted(self, task_id, version: str) -> None:
        self.redis.hset(self.key("posted"), str(task_id), version)

    # --- refit scheduling --------------------------------------------------------------------
    def claim_refit(self, ttl: int = 600, job_id: str = "") -> bool:
        """True if no refit is queued yet (the caller then queues one, and names it with
        set_queued_refit). A claim whose job is gone lapses after `ttl` s at the latest."""
        return bool(self.redis.set(self.key("refit_queued"), job_id or f"claim:{time.time()!r}",
                                   nx=True, ex=ttl))

    def set_queued_refit(self, job_id: str) -> None:
        self.redis.set(self.key("refit_queued"), job_id, xx=True, keepttl=True)

    def queued_refit(self) -> str | None:
        value = self.redis.get(self.key("refit_queued"))
        return value.decode() if value is not None else None

    def refit_started(self) -> None:
        # From here on, a new confirmation needs a new refit: let the next event queue one.
        self.redis.delete(self.key("refit_queued"))

    def refit_queued(self) -> bool:
        return bool(self.redis.exists(self.key("refit_queued")))

    def refit_running(self) -> bool:
        """A refit holds the lock (or its killed holder's lock has not lapsed yet). A refit job
        that is still reconciling with Label Studio before it takes the lock (backend/refit.py) is
        neither queued nor running by these two: its confirmations are not read yet."""
        return bool(self.redis.exists(self.key("lock:refit")))

    def want_refit(self) -> None:
        """A refit gave up waiting for the lock: the holder queues another when it is done."""
        self.redis.set(self.key("refit_wanted"), repr(time.time()), ex=24 * 3600)

    def take_refit_wanted(self) -> bool:
        return bool(self.redis.delete(self.key("refit_wanted")))

    # --- reconciliation with Label Studio ----------------------------------------------------
    def claim_reconcile(self, interval: float) -> bool:
        """True at most once per `interval` s: the caller then reconciles (backend/reconcile.py)."""
        return bool(self.redis.set(self.key("reconcile_claim"), repr(time.time()), nx=True,
                                   px=max(1, int(interval * 1000))))

    def reconcile_incomplete(self, first: float, cap: float) -> float:
        """Label Studio could not be read completely: the claim now lapses in `first` s, doubling
        with each incomplete reconciliation in a row up to `cap`, so the next trigger retries soon
        (not after a whole interval) without polling a Label Studio that is down. Returns the delay."""
        with self.redis.pipeline() as pipe:
            pipe.incr(self.key("reconcile_failures"))
            pipe.expire(self.key("reconcile_failures"), 24 * 3600)
            failures = pipe.execute()[0]
        delay = min(cap, first * 2 ** min(failures - 1, 20))
        self.redis.set(self.key("reconcile_claim"), repr(time.time()), px=max(1, int(delay * 1000)))
        return delay

    def reconcile_complete(self) -> None:
        """Label Studio was read completely: the next failure backs off from the start again."""
        self.redis.delete(self.key("reconcile_failures"))

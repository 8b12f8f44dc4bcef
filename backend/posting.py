"""Putting a batch's predictions into Label Studio: in one request, each task once, placeholders gone.

    outcome = send(ls, st, [(task_id, prediction), ...], last_attempt=False)
    outcome.posted, outcome.errors, outcome.retry, outcome.failures
    removed = repair_placeholders(ls, project_id)     # placeholders next to a real prediction

`send` imports the whole batch with `POST /api/projects/{id}/import/predictions`. Where Label Studio
refuses the bulk import (403/404/405: remembered for the project an hour) or rejects the list (400:
the import stores none of it), it posts task by task, so one bad item costs that item only.

Every task once, retries redo nothing: a task is marked posted (ProjectState.mark_posted) as soon as
Label Studio confirmed it, and skipped by any later attempt. A request whose answer was lost (a
timeout after Label Studio stored it) would be redone blindly, so before sending, the batch is noted
as "in flight"; a later attempt first asks Label Studio which of those tasks already hold a
prediction of that version, and sends only the others.

Placeholders: /predict answers uncached tasks with an empty "<version>+pending" prediction, which
Label Studio stores in the background (~12 a second), possibly after the real prediction was posted
(issue 11, item 8): the labeler would then see the empty one. `repair_placeholders` deletes every
placeholder of a task that also holds a real prediction, whatever order they were stored in; the
jobs run it after posting and, once a run is posted, until Label Studio has stored everything
(backend/predict_jobs.py).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from backend.labelstudio import BULK_REFUSED, LabelStudio, LabelStudioError
from backend.state import ProjectState

log = logging.getLogger(__name__)

PENDING_SUFFIX = "+pending"
#: Seconds a refused bulk import is remembered (then tried again: Label Studio may be upgraded).
BULK_REFUSED_TTL = 3600
#: Seconds the "in flight" note of a batch lives (longer than all attempts of one job).
IN_FLIGHT_TTL = 24 * 3600


@dataclass
class Outcome:
    posted: list[str] = field(default_factory=list)          # stored now, or found stored
    errors: dict[str, str] = field(default_factory=dict)     # task id -> why it is not posted
    retry: int = 0                                           # transient failures left to retry
    failures: list[str] = field(default_factory=list)
    requests: int = 0                                        # requests that created predictions


def send(ls: LabelStudio, st: ProjectState, items: list[tuple[str, dict]],
         last_attempt: bool = False, attempts: int = 3, first_wait: float = 1.0) -> Outcome:
    """Post predictions [(task id, prediction)] of one project; marks each posted task.

    A transient failure is tried again after 1 s, 2 s (`attempts` in all), each time first asking
    Label Studio which of the tasks the unanswered request did store.
    """
    out = Outcome()
    if not st.redis.exists(st.key("ls:bulk_refused")):
        try:
            _tries(ls, st, items, out, lambda batch: ls.import_predictions(st.id, batch),
                   attempts, first_wait)
        except LabelStudioError as exc:
            if exc.status in BULK_REFUSED:
                st.redis.set(st.key("ls:bulk_refused"), str(exc.status), ex=BULK_REFUSED_TTL)
                log.warning("project %s: Label Studio refused the bulk import (%s): posting task "
                            "by task", st.id, exc)
            elif exc.transient:
                _failed(out, [tid for tid, _ in items if tid not in out.posted], exc, last_attempt)
                return out
            # else (a 400): the list was refused as a whole; one by one tells which item is bad.
        else:
            return out
    for item in items:
        if item[0] in out.posted:
            continue
        try:
            _tries(ls, st, [item], out, lambda batch: ls.post_prediction(*batch[0]),
                   attempts, first_wait)
        except LabelStudioError as exc:
            _failed(out, [item[0]], exc, last_attempt)
    return out


def _tries(ls, st, items, out: Outcome, call, attempts: int, first_wait: float) -> None:
    """call(items not stored yet), again after 1 s, 2 s... while it fails in a way that may pass;
    marks what got stored. Raises the last LabelStudioError."""
    for attempt in range(attempts):
        left = _not_yet_stored(ls, st, items, out)
        if not left:
            return
        _note_in_flight(st, left)
        try:
            call(left)
        except LabelStudioError as exc:
            if not exc.transient or attempt == attempts - 1:
                raise
            time.sleep(first_wait * 2 ** attempt)
            continue
        out.requests += 1
        _mark(st, [tid for tid, _ in left], left, out)
        return


def _failed(out: Outcome, tids: list[str], exc: LabelStudioError, last_attempt: bool) -> None:
    out.failures.append(str(exc))
    if exc.transient and not last_attempt:
        out.retry += len(tids)
    else:
        out.errors.update({tid: str(exc) for tid in tids})


def _mark(st: ProjectState, tids: list[str], items: list[tuple[str, dict]], out: Outcome) -> None:
    versions = dict((tid, p["model_version"]) for tid, p in items)
    for tid in tids:
        st.mark_posted(tid, versions[tid])
    st.redis.hdel(st.key("in_flight"), *tids)
    out.posted += tids


def _note_in_flight(st: ProjectState, items: list[tuple[str, dict]]) -> None:
    with st.redis.pipeline() as pipe:
        pipe.hset(st.key("in_flight"), mapping={tid: p["model_version"] for tid, p in items})
        pipe.expire(st.key("in_flight"), IN_FLIGHT_TTL)
        pipe.execute()


def _not_yet_stored(ls: LabelStudio, st: ProjectState, items, out: Outcome):
    """Items minus those an earlier, unanswered attempt already stored (asked of Label Studio)."""
    tids = [tid for tid, _ in items]
    flying = dict(zip(tids, st.redis.hmget(st.key("in_flight"), tids))) if tids else {}
    left = []
    for tid, prediction in items:
        noted = flying.get(tid)
        if noted is not None and noted.decode() == prediction["model_version"]:
            try:
                stored = any(p.get("model_version") == prediction["model_version"]
                             for p in ls.task_predictions(tid))
            except LabelStudioError:
                stored = False      # cannot tell: send it (the import is all or nothing anyway)
            if stored:
                _mark(st, [tid], items, out)
                continue
        left.append((tid, prediction))
    return left


def repair_placeholders(ls: LabelStudio, project, suffix: str = PENDING_SUFFIX) -> int:
    """Delete each placeholder stored next to a real prediction of the same task; how many."""
    removed = 0
    for tid in ls.tasks_with_predictions(project, suffix, more_than=1):
        predictions = ls.task_predictions(tid)
        if not any(suffix not in (p.get("model_version") or "") for p in predictions):
            continue     # two placeholders (asked twice) and no real prediction yet
        for p in predictions:
            if suffix in (p.get("model_version") or ""):
                removed += ls.delete_prediction(p["id"])
    if removed:
        log.info("project %s: %d placeholder(s) stored after the real prediction, deleted",
                 project, removed)
    return removed

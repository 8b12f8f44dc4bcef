"""Label Studio annotations -> confirmed attribute values per face box.

    record = parse_annotation(annotation, config)   # regions (box in %, {attribute: value}), whole
    pairs = match_boxes(boxes_a, boxes_b)           # [(i, j)] one-to-one by box overlap

A labeler's region is tied to one of our faces by box overlap (IoU), never by position in a list or
by id: a labeler may redraw, add or delete boxes. Values outside the config's classes are dropped
(the config may have changed since the annotation was made).
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime

import numpy as np

from backend.labeling_config import LabelingConfig

#: Boxes overlapping less than this (intersection over union) are different faces.
MIN_IOU = 0.3
#: Times before this (2000-01-01) or more than a day past our clock are refused: an update stamped
#: 1e308 would otherwise hold its annotation against every later real update.
EARLIEST_TIME = 946_684_800.0
CLOCK_SLACK = 86_400.0
#: Label Studio's ids are database keys: ints, or digit strings, below 2**63.
_ID_DIGITS = re.compile(r"[0-9]{1,19}")


@dataclass
class Region:
    box: tuple[float, float, float, float]          # x, y, width, height in % of the image
    values: dict[str, str] = field(default_factory=dict)


@dataclass
class AnnotationRecord:
    """What one Label Studio annotation confirms. updated_at: seconds since the epoch."""

    annotation_id: int
    task_id: int
    updated_at: float
    regions: list[Region] = field(default_factory=list)
    whole: dict[str, str] = field(default_factory=dict)
    cancelled: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AnnotationRecord":
        regions = [Region(tuple(r["box"]), dict(r["values"])) for r in d.get("regions", [])]
        return cls(int(d["annotation_id"]), int(d["task_id"]), float(d["updated_at"]), regions,
                   dict(d.get("whole", {})), bool(d.get("cancelled", False)))


class AnnotationError(ValueError):
    """The payload is not an annotation we can read (missing id or task)."""


def timestamp(value, what: str = "updated_at") -> float:
    """Label Studio's ISO 8601 time (e.g. 2024-05-01T12:00:00.123456Z) -> epoch seconds; 0 if absent.

    AnnotationError for anything else, or a time before 2000 or over a day in our future.
    """
    if value in (None, ""):
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise AnnotationError(f"{what} must be an ISO 8601 time, not {_short(value)}")
    if isinstance(value, str):
        try:
            seconds = datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except (ValueError, OverflowError, OSError):
            raise AnnotationError(f"{what}: unreadable time {_short(value)}") from None
    else:
        seconds = float(value)
    if not math.isfinite(seconds) or not EARLIEST_TIME <= seconds <= time.time() + CLOCK_SLACK:
        raise AnnotationError(f"{what}: {_short(value)} is not a plausible time (before 2000 or "
                              "in the future)")
    return seconds


def label_studio_id(value, what: str) -> int:
    """A Label Studio object id (an int, or a digit string, below 2**63); AnnotationError if not."""
    if isinstance(value, dict):
        value = value.get("id")
    if isinstance(value, str) and _ID_DIGITS.fullmatch(value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise AnnotationError(f"no valid {what} id ({_short(value)})")
    return value


def _int(value, what: str) -> int:
    try:
        return label_studio_id(value, what)
    except AnnotationError:
        raise AnnotationError(f"the annotation has no valid {what} id ({_short(value)})") from None


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _box(value: dict) -> tuple[float, float, float, float] | None:
    try:
        box = tuple(float(value[k]) for k in ("x", "y", "width", "height"))
    except (KeyError, TypeError, ValueError, OverflowError):
        return None
    # In % of the image: NaN, infinities or absurd sizes are no box (they would poison the IoU).
    return box if all(math.isfinite(v) and -1e4 <= v <= 1e4 for v in box) else None


def parse_annotation(annotation: dict, config: LabelingConfig, task_id=None) -> AnnotationRecord:
    """Read one annotation dict (Label Studio's serializer output, as webhooks send it).

    AnnotationError, naming the field, for a shape Label Studio never sends (a result that is not a
    list, a value that is not an object, choices that are not a list of strings...).
    """
    if not isinstance(annotation, dict):
        raise AnnotationError("the annotation is not a JSON object")
    record = AnnotationRecord(
        _int(annotation.get("id"), "annotation"),
        _int(annotation.get("task", task_id), "task"),
        timestamp(annotation.get("updated_at") or annotation.get("created_at")),
        cancelled=bool(annotation.get("was_cancelled")))
    where = f"annotation {record.annotation_id}"
    items = annotation.get("result") or []
    if not isinstance(items, list):
        raise AnnotationError(f"{where}: 'result' must be a list, not {type(items).__name__}")
    attributes = {a.name: a for a in config.attributes}
    regions: dict[str, Region] = {}
    choices: list[tuple[str, dict, str, str]] = []
    for n, item in enumerate(items):
        if not isinstance(item, dict) or item.get("to_name") != config.image_name:
            continue
        value = item.get("value") or {}
        if not isinstance(value, dict):
            raise AnnotationError(f"{where}: result[{n}].value must be an object, "
                                  f"not {type(value).__name__}")
        kind, source = item.get("type"), item.get("from_name")
        if kind == "rectanglelabels" and source == config.face_name:
            labels = _strings(value.get("rectanglelabels"), f"{where}: result[{n}].value.rectanglelabels")
            box = _box(value)
            if box is not None and (not labels or config.face_label in labels):
                regions[str(item.get("id"))] = Region(box)
        elif kind == "choices" and isinstance(source, str) and source in attributes:
            given = _strings(value.get("choices"), f"{where}: result[{n}].value.choices")
            picked = [c for c in given if c in attributes[source].values]
            if picked:
                # A multiple-choice attribute is still one class per face for clustering: the first.
                choices.append((str(item.get("id")), value, picked[0], source))
    for entry in choices:
        region_id, value, picked, name = entry
        if attributes[name].per_region:
            region = regions.get(region_id)
            if region is None and _box(value) is not None:
                # Label Studio repeats the box in per-region choices: enough to place the face.
                region = regions.setdefault(region_id, Region(_box(value)))
            if region is not None:
                region.values[name] = picked
        else:
            record.whole[name] = picked
    record.regions = list(regions.values())
    return record


def _strings(value, what: str) -> list[str]:
    """A list of strings (absent: empty); a bare string would be read character by character."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AnnotationError(f"{what} must be a list of strings, not {_short(value)}")
    return value


def iou_matrix(a, b) -> np.ndarray:
    """(n, m) intersection over union of boxes given as (x, y, width, height)."""
    a = np.asarray(a, float).reshape(-1, 4)
    b = np.asarray(b, float).reshape(-1, 4)
    ax2, ay2 = a[:, 0] + a[:, 2], a[:, 1] + a[:, 3]
    bx2, by2 = b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    iw = np.clip(np.minimum(ax2[:, None], bx2[None]) - np.maximum(a[:, 0][:, None], b[:, 0][None]), 0, None)
    ih = np.clip(np.minimum(ay2[:, None], by2[None]) - np.maximum(a[:, 1][:, None], b[:, 1][None]), 0, None)
    inter = iw * ih
    union = (a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def match_boxes(a, b, min_iou: float = MIN_IOU) -> list[tuple[int, int]]:
    """One-to-one pairs (i, j) of boxes a[i] ~ b[j] maximising total overlap, each with IoU >= min_iou."""
    if len(a) == 0 or len(b) == 0:
        return []
    from scipy.optimize import linear_sum_assignment

    iou = iou_matrix(a, b)
    rows, cols = linear_sum_assignment(iou, maximize=True)
    return [(int(i), int(j)) for i, j in zip(rows, cols) if iou[i, j] >= min_iou]

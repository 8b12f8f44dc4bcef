"""From stored annotations to confirmed values per face, and how often our pre-annotation was kept.

    labels, stats = confirmed_labels(entries, faces, config)   # {attribute: (n,) value or None}
    counts = acceptance(entries, config)                       # {attribute: {"shown", "accepted"}}

Several annotations of one task: the most recently updated (not skipped) one is the task's truth.
A labeler's box is tied to a detected face by overlap (backend.annotations.match_boxes); boxes drawn
where the detector found no face have no vector and are counted as `unmatched`. Whole-image
choices belong to the photo's largest face, the one the backend answers them from.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from backend.annotations import AnnotationRecord, match_boxes
from backend.labeling_config import LabelingConfig


def latest_per_task(entries: list[dict]) -> dict[str, dict]:
    """{task id: the latest non-cancelled annotation entry}."""
    latest: dict[str, dict] = {}
    for e in entries:
        if e.get("cancelled"):
            continue
        t = str(e["task_id"])
        if t not in latest or (e["updated_at"], e["annotation_id"]) > \
                (latest[t]["updated_at"], latest[t]["annotation_id"]):
            latest[t] = e
    return latest


def confirmed_labels(entries: list[dict], faces, config: LabelingConfig) -> tuple[dict, dict]:
    """Per attribute, (n,) confirmed values of faces.X's rows (None = not confirmed).

    faces: backend.model.ProjectFaces (rows, per-task row indices, boxes in %, areas).
    """
    n = len(faces.rows)
    labels = {a.name: np.full(n, None, dtype=object) for a in config.attributes}
    stats = {"annotations": 0, "regions": 0, "unmatched": 0, "tasks_without_faces": 0}
    for task_id, entry in latest_per_task(entries).items():
        record = AnnotationRecord.from_dict(entry)
        stats["annotations"] += 1
        stats["regions"] += len(record.regions)
        rows = faces.by_task.get(task_id, [])
        if not rows:
            stats["tasks_without_faces"] += 1
            stats["unmatched"] += len(record.regions)
            continue
        pairs = match_boxes([r.box for r in record.regions], [faces.boxes[i] for i in rows])
        stats["unmatched"] += len(record.regions) - len(pairs)
        for i, j in pairs:
            for name, value in record.regions[i].values.items():
                if name in labels:
                    labels[name][rows[j]] = value
        if record.whole:
            largest = max(rows, key=lambda r: faces.areas[r])
            for name, value in record.whole.items():
                if name in labels:
                    labels[name][largest] = value
    return labels, stats


def acceptance(entries: list[dict], config: LabelingConfig) -> dict[str, dict[str, int]]:
    """Per attribute: how many pre-annotated values a labeler saw (shown) and kept as is (accepted).

    Every live annotation counts (each labeler's decision is one), compared with what we had shown
    on its task when the annotation arrived. A shown value whose face the labeler deleted, or whose
    value was removed or changed, is shown but not accepted.
    """
    counts = defaultdict(lambda: {"shown": 0, "accepted": 0})
    for name in config.names:
        counts[name]
    for entry in entries:
        shown = entry.get("shown")
        if not shown or entry.get("cancelled"):
            continue
        record = AnnotationRecord.from_dict(entry)
        shown_faces = shown.get("faces", [])
        pairs = dict((j, i) for i, j in match_boxes([r.box for r in record.regions],
                                                    [f["box"] for f in shown_faces]))
        for j, face in enumerate(shown_faces):
            region = record.regions[pairs[j]] if j in pairs else None
            for name, value in face.get("values", {}).items():
                if name in counts:
                    counts[name]["shown"] += 1
                    counts[name]["accepted"] += int(region is not None and region.values.get(name) == value)
        for name, value in shown.get("whole", {}).items():
            if name in counts:
                counts[name]["shown"] += 1
                counts[name]["accepted"] += int(record.whole.get(name) == value)
    return dict(counts)

"""Label Studio prediction JSON, built from an image's faces and what the model says about them.

    prediction, shown = build(result, face_predictions, config, model_version)

One face = one rectangle (percent coordinates of the original image, plus original_width/height)
and, per per-region attribute, one choices result repeating the rectangle's id and geometry (that is
how Label Studio ties a per-region choice to its box). Whole-image attributes are answered from the
largest face. A photo without faces gets an empty result list; so does a photo that could not be
read (the caller records why). `shown` is the compact record of what we showed, kept to count later
how often a labeler accepted it as is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from backend.labeling_config import LabelingConfig
from workers.results import Face, ImageResult


@dataclass
class FacePrediction:
    """The model's answer for one face.

    values: {attribute: (value or None when not yet named, score 0..1)}.
    rank: how good a face this is to label first (0..1); see backend.attributes.project_model for how.
    """

    values: dict[str, tuple[str | None, float]] = field(default_factory=dict)
    rank: float | None = None


def box_percent(box, width: int, height: int) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) pixels -> Label Studio's (x, y, width, height) in % of the image."""
    left, top, right, bottom = box
    return (100.0 * left / width, 100.0 * top / height,
            100.0 * (right - left) / width, 100.0 * (bottom - top) / height)


def detector_confidence(face: Face) -> float:
    """The detector's score squashed to 0..1 (HOG margins run ~0..3; a fallback box scores 0)."""
    if face.found_by == "fallback":
        return 0.0
    return 1.0 - math.exp(-max(float(face.score), 0.0))


def empty(model_version: str) -> dict:
    return {"result": [], "score": 0.0, "model_version": model_version}


def pending(model_version: str) -> dict:
    """The placeholder for a task whose faces are still being computed (see backend.model).

    No score (null): the Data Manager's prediction score is an average over a task's predictions,
    and a placeholder must not pull down the real prediction that follows it.
    """
    return {"result": [], "score": None, "model_version": model_version}


def _round(v: float) -> float:
    return round(float(v), 4)


def build(result: ImageResult, faces: list[FacePrediction] | None, config: LabelingConfig,
          model_version: str) -> tuple[dict, dict]:
    """(Label Studio prediction, shown record) for one image; `faces` parallels result.faces."""
    shown = {"version": model_version, "faces": [], "whole": {}}
    if not result.ok or not result.faces or not result.width or not result.height:
        return empty(model_version), shown
    faces = faces if faces is not None else [FacePrediction() for _ in result.faces]
    items: list[dict] = []
    ranks: list[float] = []
    geometry = {"original_width": int(result.width), "original_height": int(result.height),
                "image_rotation": 0}
    for i, (face, pred) in enumerate(zip(result.faces, faces)):
        x, y, w, h = (_round(v) for v in box_percent(face.box, result.width, result.height))
        box = {"x": x, "y": y, "width": w, "height": h, "rotation": 0}
        region = f"face{i + 1}"
        confidence = detector_confidence(face)
        ranks.append(pred.rank if pred.rank is not None else confidence)
        record = {"box": [x, y, w, h], "values": {}}
        if config.face_name is not None:
            items.append({"id": region, "from_name": config.face_name, "to_name": config.image_name,
                          "type": "rectanglelabels", **geometry,
                          "value": {**box, "rectanglelabels": [config.face_label]},
                          "score": _round(confidence)})
        for attribute in config.attributes:
            if not attribute.per_region or config.face_name is None:
                continue
            value, score = pred.values.get(attribute.name, (None, 0.0))
            if value is None:
                continue   # not named yet: the box alone, the labeler picks the value
            record["values"][attribute.name] = value
            items.append({"id": region, "from_name": attribute.name, "to_name": config.image_name,
                          "type": "choices", **geometry, "value": {**box, "choices": [value]},
                          "score": _round(score)})
        shown["faces"].append(record)

    largest = max(range(len(result.faces)),
                  key=lambda i: result.faces[i].width * result.faces[i].height)
    for attribute in config.attributes:
        if attribute.per_region:
            continue
        value, score = faces[largest].values.get(attribute.name, (None, 0.0))
        if value is None:
            continue
        shown["whole"][attribute.name] = value
        items.append({"id": f"image-{attribute.name}", "from_name": attribute.name,
                      "to_name": config.image_name, "type": "choices",
                      "value": {"choices": [value]}, "score": _round(score)})
    prediction = {"result": items, "score": _round(max(ranks)), "model_version": model_version}
    return prediction, shown

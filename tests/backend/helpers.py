"""Helpers for the backend tests: projects whose photos are already in the real embedding cache.

The vectors are synthetic with a known structure (groups around known centres), stored in the same
Redis cache the workers fill, under the identity of real files on disk: the backend cannot tell them
from computed ones, and the tests know the right answers.
"""
from __future__ import annotations

import hashlib
import itertools

import numpy as np

from workers.cache import EmbeddingCache
from workers.images import FetchSettings, source_identity
from workers.pipeline import PipelineOptions, fingerprint
from workers.results import Face, ImageResult

TWO_ATTRIBUTES = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="face" toName="image"><Label value="Face"/></RectangleLabels>
  <Choices name="gender" toName="image" perRegion="true">
    <Choice value="male"/><Choice value="female"/></Choices>
  <Choices name="glasses" toName="image" perRegion="true">
    <Choice value="yes"/><Choice value="no"/></Choices>
</View>"""

_counter = itertools.count()


def group_vectors(rng, centre: np.ndarray, n: int, spread: float = 0.02) -> np.ndarray:
    return (centre[None, :] + rng.normal(0, spread, (n, centre.size))).astype(np.float32)


class CachedPhotos:
    """Writes small distinct files and caches ImageResults with chosen face vectors for them."""

    def __init__(self, tmp_path, redis):
        self.dir = tmp_path
        self.cache = EmbeddingCache(redis, fingerprint(PipelineOptions()))
        self.fetch = FetchSettings()

    def photo(self, vectors, boxes=None, size=(400, 300), name=None) -> str:
        """A photo with one face per vector; boxes (left, top, right, bottom) default side by side."""
        n = next(_counter)
        path = self.dir / (name or f"photo{n:05d}.jpg")
        path.write_bytes(f"photo {n}".encode() * 8)   # distinct bytes; never decoded
        width, height = size
        vectors = np.asarray(vectors, np.float32).reshape(-1, 128)
        if boxes is None:
            boxes = [(20 + 120 * i, 40, 120 + 120 * i, 160) for i in range(len(vectors))]
        faces = [Face(tuple(b), np.zeros((68, 2), np.float32), v, 1.5, "hog")
                 for b, v in zip(boxes, vectors)]
        result = ImageResult(hashlib.sha256(path.read_bytes()).hexdigest(), width, height, faces)
        self.cache.put(result, source_identity(str(path), self.fetch))
        return str(path)


def ls_annotation(annotation_id, task_id, faces, updated_at="2024-05-01T10:00:00.000000Z",
                  whole=None, size=(400, 300), cancelled=False):
    """An annotation dict shaped like Label Studio's webhook payload.

    faces: [(box (left, top, right, bottom) px, {attribute: value})].
    """
    width, height = size
    result = []
    for i, (box, values) in enumerate(faces):
        left, top, right, bottom = box
        geom = {"x": 100 * left / width, "y": 100 * top / height,
                "width": 100 * (right - left) / width, "height": 100 * (bottom - top) / height,
                "rotation": 0}
        rid = f"r{annotation_id}x{i}"
        result.append({"id": rid, "from_name": "face", "to_name": "image", "type": "rectanglelabels",
                       "origin": "manual", "original_width": width, "original_height": height,
                       "image_rotation": 0, "value": {**geom, "rectanglelabels": ["Face"]}})
        for name, value in values.items():
            result.append({"id": rid, "from_name": name, "to_name": "image", "type": "choices",
                           "origin": "manual", "original_width": width, "original_height": height,
                           "image_rotation": 0, "value": {**geom, "choices": [value]}})
    for name, value in (whole or {}).items():
        result.append({"id": f"w{name}", "from_name": name, "to_name": "image", "type": "choices",
                       "origin": "manual", "value": {"choices": [value]}})
    return {"id": annotation_id, "result": result, "task": task_id, "project": 1,
            "created_at": "2024-05-01T09:00:00.000000Z", "updated_at": updated_at,
            "was_cancelled": cancelled, "completed_by": 1, "lead_time": 3.2, "ground_truth": False,
            "parent_prediction": None, "result_count": len(result)}


def webhook(action, annotation, task, project_id=1, label_config=None):
    """A Label Studio webhook body (ANNOTATION_CREATED / UPDATED)."""
    return {"action": action, "annotation": annotation, "task": task,
            "project": {"id": project_id, "title": "faces", "label_config": label_config}}

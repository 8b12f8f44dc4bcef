"""Views of a face: the feature sets an attribute may be learned from, computed from what is cached.

    V = face_views(face)              # {"vector": (128,), "smile": (3,), "geometry": (10,), ...}
    views = stack_views(faces)        # {view: (n, d)}, only the views every face has

"vector" is dlib's 128-D identity descriptor. "smile" and "geometry" come from the 68 landmarks
(eye-aligned: inter-ocular distance 1, y down): the mouth shape a smile changes, and the mouth, eye
and brow geometry an expression changes. Appearance views computed by the workers' descriptor graph
and cached with the vector (Face.views: "pooled" (256,), "eyes", "mouth", "lower" (192,): feature
maps averaged over a band of the aligned chip) are passed through as they are; faces cached before
they existed have none, and a view missing on any face of a set is left out of that set.
Which view serves which attribute is chosen per attribute by cross-validation (backend.attributes.candidates).
"""
from __future__ import annotations

import numpy as np

LANDMARK_VIEWS = ("smile", "geometry")

#: dlib's 68-point layout: eyes 36-41 / 42-47, outer lip 48-59 (corners 48, 54; top 51, bottom 57),
#: inner lip 60-67 (top 62, bottom 66), jaw 0-16.
MOUTH_FEATURES = ("mouth_width", "outer_opening", "inner_opening", "corner_lift",
                  "mouth_drop", "width_to_jaw")


def align_landmarks(landmarks: np.ndarray) -> np.ndarray:
    """(n, 68, 2) -> (n, 68, 2): eyes level, inter-ocular distance 1, origin between the eyes.

    Removes the photo's scale, in-plane rotation and position, so the geometry compares across photos.
    """
    P = np.asarray(landmarks, np.float64)
    left, right = P[:, 36:42].mean(1), P[:, 42:48].mean(1)
    mid = (left + right) / 2
    axis = right - left
    iod = np.maximum(np.linalg.norm(axis, axis=1), 1e-9)
    cos, sin = axis[:, 0] / iod, axis[:, 1] / iod
    Q = P - mid[:, None, :]
    x = (Q[..., 0] * cos[:, None] + Q[..., 1] * sin[:, None]) / iod[:, None]
    y = (-Q[..., 0] * sin[:, None] + Q[..., 1] * cos[:, None]) / iod[:, None]
    return np.stack([x, y], axis=-1)


def mouth_features(landmarks: np.ndarray) -> np.ndarray:
    """(n, 68, 2) landmarks -> (n, 6) normalised mouth geometry (see MOUTH_FEATURES).

    In eye-aligned units (inter-ocular distance 1, y down): mouth width (corner to corner); outer and
    inner lip opening; corner lift (lip centre height minus mouth-corner height: positive when the
    corners rise, as in a smile); mouth drop (lip centre below the eyes, grows as the jaw opens);
    mouth width over jaw width (less sensitive to head turn than over the eye distance).
    """
    A = align_landmarks(landmarks)
    width = np.linalg.norm(A[:, 54] - A[:, 48], axis=1)
    outer = np.linalg.norm(A[:, 57] - A[:, 51], axis=1)
    inner = np.linalg.norm(A[:, 66] - A[:, 62], axis=1)
    centre_y = (A[:, 62, 1] + A[:, 66, 1]) / 2
    corners_y = (A[:, 48, 1] + A[:, 54, 1]) / 2
    lift = centre_y - corners_y
    drop = centre_y
    jaw = np.maximum(np.linalg.norm(A[:, 16] - A[:, 0], axis=1), 1e-9)
    return np.stack([width, outer, inner, lift, drop, width / jaw], axis=1)


def mouth_shape(landmarks: np.ndarray) -> np.ndarray:
    """(n, 68, 2) -> (n, 40): the 20 eye-aligned mouth landmarks, centred on the mouth."""
    A = align_landmarks(landmarks)[:, 48:68]
    return (A - A.mean(axis=1, keepdims=True)).reshape(len(A), -1)



#: The smile view: the mouth features a smile changes and speech does not (width, corner lift).
SMILE = (0, 5, 3)   # mouth_width, width_to_jaw, corner_lift


def eye_features(landmarks: np.ndarray) -> np.ndarray:
    """(n, 68, 2) -> (n, 4): eye opening (height over width) of each eye, brow height above each eye."""
    A = align_landmarks(landmarks)
    out = []
    for eye, brow in ((slice(36, 42), slice(17, 22)), (slice(42, 48), slice(22, 27))):
        E = A[:, eye]
        width = np.maximum(np.linalg.norm(E[:, 3] - E[:, 0], axis=1), 1e-9)
        height = (np.linalg.norm(E[:, 1] - E[:, 5], axis=1) + np.linalg.norm(E[:, 2] - E[:, 4], axis=1)) / 2
        out += [height / width, E[:, :, 1].mean(1) - A[:, brow, 1].mean(1)]
    return np.stack(out, axis=1)


def landmark_views(landmarks: np.ndarray) -> dict[str, np.ndarray]:
    """(n, 68, 2) -> {"smile": (n, 3), "geometry": (n, 10)}; {} for other landmark layouts."""
    L = np.asarray(landmarks, np.float64)
    if L.ndim != 3 or L.shape[1] != 68 or not np.isfinite(L).all():
        return {}
    mouth = mouth_features(L)
    return {"smile": mouth[:, list(SMILE)], "geometry": np.concatenate([mouth, eye_features(L)], 1)}


def face_views(face) -> dict[str, np.ndarray]:
    """Every view of one workers.results.Face: the vector, landmark views, cached appearance views."""
    out = {"vector": np.asarray(face.vector, np.float64).reshape(-1)}
    for name, v in landmark_views(np.asarray(face.landmarks)[None]).items():
        out[name] = v[0]
    for name, v in (getattr(face, "views", None) or {}).items():
        out[str(name)] = np.asarray(v, np.float64).reshape(-1)
    return out


def stack_views(per_face: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """[{view: (d,)}] -> {view: (n, d)}, keeping only the views every face has (with one shape)."""
    if not per_face:
        return {}
    names = set(per_face[0])
    for v in per_face[1:]:
        names &= set(v)
    out = {}
    for name in sorted(names):
        shapes = {v[name].shape for v in per_face}
        if len(shapes) == 1:
            out[name] = np.stack([v[name] for v in per_face]).astype(np.float64)
    return out

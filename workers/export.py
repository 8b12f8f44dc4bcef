"""Export what the pipeline found, so the vectors can be used elsewhere.

.npz (one row per face; numpy):
    vectors (N, 128) float32, source (N,) str, face_index (N,) int32 (faces sorted left to right),
    boxes (N, 4) int32 (left, top, right, bottom; original pixels), landmarks (N, L, 2) float32,
    scores (N,) float32, found_by (N,) str, width / height (N,) int32 (image size);
    views_<name> (N, d) float32 for each view of workers.results.VIEW_DIMS (NaN rows for faces cached
    without views); failed images: error_source (M,) str, error_kind (M,) str, error_message (M,) str.
.jsonl (one line per image): {"source", "sha256", "width", "height", "faces": [{"box", "landmarks",
    "vector", "score", "found_by"}], "error", "message"} (no views: they are 832 floats a face).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import numpy as np

from workers.results import VECTOR_DIM, VIEW_DIMS, ImageResult


def save(results: Mapping[str, ImageResult], path: str | Path) -> Path:
    """Write results ({source: ImageResult}) as .npz or .jsonl, chosen by the file name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npz":
        _save_npz(results, path)
    elif path.suffix == ".jsonl":
        _save_jsonl(results, path)
    else:
        raise ValueError(f"export to .npz or .jsonl, not {path.suffix or 'no extension'!r}")
    return path


def _save_npz(results: Mapping[str, ImageResult], path: Path) -> None:
    rows = [(source, i, face, r) for source, r in results.items() for i, face in enumerate(r.faces)]
    n_landmarks = max((len(face.landmarks) for _, _, face, _ in rows), default=68)
    landmarks = np.full((len(rows), n_landmarks, 2), np.nan, np.float32)
    for row, (_, _, face, _) in enumerate(rows):
        landmarks[row, : len(face.landmarks)] = face.landmarks
    failed = [(source, r) for source, r in results.items() if not r.ok]
    views = {f"views_{name}": np.full((len(rows), dim), np.nan, np.float32)
             for name, dim in VIEW_DIMS.items()}
    for row, (_, _, face, _) in enumerate(rows):
        for name, view in face.views.items():
            if f"views_{name}" in views:
                views[f"views_{name}"][row] = view
    np.savez_compressed(
        path,
        vectors=np.array([f.vector for _, _, f, _ in rows], np.float32).reshape(-1, VECTOR_DIM),
        source=np.array([s for s, _, _, _ in rows], dtype=str),
        face_index=np.array([i for _, i, _, _ in rows], np.int32),
        boxes=np.array([f.box for _, _, f, _ in rows], np.int32).reshape(-1, 4),
        landmarks=landmarks,
        scores=np.array([f.score for _, _, f, _ in rows], np.float32),
        found_by=np.array([f.found_by for _, _, f, _ in rows], dtype=str),
        width=np.array([r.width for _, _, _, r in rows], np.int32),
        height=np.array([r.height for _, _, _, r in rows], np.int32),
        error_source=np.array([s for s, _ in failed], dtype=str),
        error_kind=np.array([r.error for _, r in failed], dtype=str),
        error_message=np.array([r.message for _, r in failed], dtype=str),
        **views,
    )


def _save_jsonl(results: Mapping[str, ImageResult], path: Path) -> None:
    with path.open("w") as out:
        for source, r in results.items():
            out.write(json.dumps({
                "source": source, "sha256": r.sha256, "width": r.width, "height": r.height,
                "faces": [{"box": list(f.box), "landmarks": np.round(f.landmarks, 2).tolist(),
                           "vector": [float(v) for v in f.vector], "score": round(f.score, 4),
                           "found_by": f.found_by} for f in r.faces],
                "error": r.error, "message": r.message,
            }) + "\n")

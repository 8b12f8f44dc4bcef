"""What the embedding pipeline produces: faces, per-image results, and their compact binary form.

These are the objects the rest of subdisc passes around (image -> faces -> vectors). The binary form
is what the Redis cache stores: a small JSON header followed by the raw float32 arrays, so a cached
image costs ~1 KB per face and decodes without parsing floats from text.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import numpy as np

VECTOR_DIM = 128

@dataclass(frozen=True, eq=False)
class Face:
    """One face in one image.

    box: (left, top, right, bottom) in original-image pixels (right/bottom exclusive).
    landmarks: (n, 2) float32, x/y in original-image pixels; n = 68 or 5.
    vector: (128,) float32, the dlib ResNet v1 descriptor.
    score: the detector's confidence (HOG margin or MMOD confidence; 0.0 for the fallback).
    found_by: "hog", "cnn" or "fallback".
    """

    box: tuple[int, int, int, int]
    landmarks: np.ndarray
    vector: np.ndarray
    score: float
    found_by: str

    @property
    def width(self) -> int:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> int:
        return self.box[3] - self.box[1]


@dataclass(eq=False)
class ImageResult:
    """The outcome for one image: its faces (possibly none), or a typed error.

    sha256 is the hash of the image bytes ("" when the bytes could not be read at all).
    error is an ImageError kind (see workers.images.ERROR_KINDS) and message says why, for people.
    """

    sha256: str
    width: int = 0
    height: int = 0
    faces: list[Face] = field(default_factory=list)
    error: str | None = None
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def failed(cls, kind: str, message: str, sha256: str = "") -> "ImageResult":
        return cls(sha256=sha256, error=kind, message=message)

    def vectors(self) -> np.ndarray:
        """(n_faces, 128) float32."""
        if not self.faces:
            return np.zeros((0, VECTOR_DIM), np.float32)
        return np.stack([f.vector for f in self.faces]).astype(np.float32, copy=False)

    # --- binary form ---------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        header = {
            "sha256": self.sha256,
            "width": self.width,
            "height": self.height,
            "error": self.error,
            "message": self.message,
            "faces": [
                {"box": list(f.box), "score": float(f.score), "found_by": f.found_by,
                 "n_landmarks": int(len(f.landmarks))}
                for f in self.faces
            ],
        }
        head = json.dumps(header, separators=(",", ":")).encode()
        arrays = b"".join(
            np.asarray(f.vector, "<f4").tobytes() + np.asarray(f.landmarks, "<f4").tobytes()
            for f in self.faces
        )
        return struct.pack("<I", len(head)) + head + arrays

    @classmethod
    def from_bytes(cls, data: bytes) -> "ImageResult":
        (n,) = struct.unpack_from("<I", data, 0)
        header = json.loads(data[4 : 4 + n])
        offset = 4 + n
        faces = []
        for meta in header["faces"]:
            vector = np.frombuffer(data, "<f4", VECTOR_DIM, offset).copy()
            offset += VECTOR_DIM * 4
            k = meta["n_landmarks"]
            landmarks = np.frombuffer(data, "<f4", 2 * k, offset).reshape(k, 2).copy()
            offset += 2 * k * 4
            faces.append(Face(tuple(meta["box"]), landmarks, vector, meta["score"], meta["found_by"]))
        return cls(header["sha256"], header["width"], header["height"], faces,
                   header["error"], header["message"])

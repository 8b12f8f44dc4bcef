"""What the embedding pipeline produces: faces, per-image results, and their compact binary form.

These are the objects the rest of subdisc passes around (image -> faces -> vectors). The binary form
is what the Redis cache stores: a small JSON header followed by the raw float32 arrays, so a cached
image costs ~4.4 KB per face (0.8 KB without views) and decodes without parsing floats from text.
Every face's vector and landmarks come first, then the views of every face: entries written before
views existed decode (with empty views), and older readers still read the vectors of newer entries.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import numpy as np

VECTOR_DIM = 128
#: The views the pipeline stores with each face, and their lengths (see Face).
VIEW_DIMS = {"pooled": 256, "eyes": 192, "mouth": 192, "lower": 192}

@dataclass(frozen=True, eq=False)
class Face:
    """One face in one image.

    box: (left, top, right, bottom) in original-image pixels (right/bottom exclusive).
    landmarks: (n, 2) float32, x/y in original-image pixels; n = 68 or 5.
    vector: (128,) float32, the dlib ResNet v1 descriptor.
    score: the detector's confidence (HOG margin or MMOD confidence; 0.0 for the fallback).
    found_by: "hog", "cnn" or "fallback".
    views: {name: float32 vector}, other views of the face from the same forward pass of the
        descriptor network (on the 150x150 chip, padding 0.25, that gives the vector); empty for
        results cached before views existed. The pipeline gives exactly these (VIEW_DIMS):
        "pooled" (256,)  the global-average-pooled vector before the fc layer (vector = pooled @ W);
        "eyes"   (192,)  the level-3 maps (64 channels, 17x17) then the level-2 maps (128 channels,
                         8x8), each averaged over the eye band, chip rows 28-62 of 150 (map rows
                         floor(28 h / 150) to ceil(62 h / 150), all columns), concatenated [64, 128];
        "mouth"  (192,)  the same over the mouth band, chip rows 92-124;
        "lower"  (192,)  the same over the lower face, chip rows 95-150 (for beard).
        Maps are taken at the output of each level (after its last residual block's relu).
    """

    box: tuple[int, int, int, int]
    landmarks: np.ndarray
    vector: np.ndarray
    score: float
    found_by: str
    views: dict[str, np.ndarray] = field(default_factory=dict)

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
                 "n_landmarks": int(len(f.landmarks)),
                 **({"views": [[name, int(np.size(v))] for name, v in f.views.items()]}
                    if f.views else {})}
                for f in self.faces
            ],
        }
        head = json.dumps(header, separators=(",", ":")).encode()
        arrays = b"".join(
            np.asarray(f.vector, "<f4").tobytes() + np.asarray(f.landmarks, "<f4").tobytes()
            for f in self.faces
        )
        # Views after every face's vector and landmarks: a reader that knows no views stops early.
        views = b"".join(np.asarray(v, "<f4").tobytes() for f in self.faces for v in f.views.values())
        return struct.pack("<I", len(head)) + head + arrays + views

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
        for face, meta in zip(faces, header["faces"]):
            for name, size in meta.get("views", []):   # entries cached before views have none
                face.views[name] = np.frombuffer(data, "<f4", size, offset).copy()
                offset += 4 * size
        return cls(header["sha256"], header["width"], header["height"], faces,
                   header["error"], header["message"])

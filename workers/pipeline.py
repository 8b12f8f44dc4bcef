"""The seed study's face pipeline (section 3.2): detector -> landmarks -> dlib ResNet v1 descriptor.

    >>> pipeline = get_pipeline(PipelineOptions())
    >>> faces = pipeline.faces(rgb)          # rgb: (H, W, 3) uint8

Models come from the installed `face-recognition-models` package and are loaded once per process
(`get_pipeline` caches one pipeline per option set), so an RQ worker pays for loading only once.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
from dataclasses import asdict, dataclass, fields

import numpy as np

from workers.results import Face

log = logging.getLogger(__name__)

#: Bump when the pipeline's code changes what it computes: every cached vector is then recomputed.
PIPELINE_VERSION = 1


@dataclass(frozen=True)
class PipelineOptions:
    """How faces are found and described. Every field is part of the cache fingerprint.

    detector: "hog" (dlib's frontal face detector, the study's) or "cnn" (dlib's MMOD CNN detector:
        finds more non-frontal faces, ~20x slower on a CPU).
    upsample: times the image is upsampled before detection (finds smaller faces, 4x slower each).
    landmarks: 68 (the study's shape predictor) or 5 (dlib's small predictor).
    jitter: descriptor jitter passes (0 = the plain descriptor; 10 is ~10x slower, slightly steadier).
    fallback: when nothing is detected, treat the whole image as the face (for pre-cropped, aligned
        photos such as UTKFace and Yale); such faces are marked found_by="fallback".
    max_side: images larger than this (longest side, pixels) are downscaled for detection only;
        landmarks and descriptors are computed on the original pixels.
    """

    detector: str = "hog"
    upsample: int = 1
    landmarks: int = 68
    jitter: int = 0
    fallback: bool = False
    max_side: int = 1600

    def __post_init__(self):
        if self.detector not in ("hog", "cnn"):
            raise ValueError(f"detector must be 'hog' or 'cnn', not {self.detector!r}")
        if self.landmarks not in (68, 5):
            raise ValueError(f"landmarks must be 68 or 5, not {self.landmarks!r}")
        if not 0 <= self.upsample <= 4:
            raise ValueError("upsample must be between 0 and 4")
        if not 0 <= self.jitter <= 100:
            raise ValueError("jitter must be between 0 and 100")
        if self.max_side < 64:
            raise ValueError("max_side must be at least 64 pixels")

    @classmethod
    def from_dict(cls, values: dict | None) -> "PipelineOptions":
        # Unknown keys are dropped, so a job enqueued by a newer version still runs here.
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (values or {}).items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)


def model_paths() -> dict[str, str]:
    """Paths of the model files shipped in the `face-recognition-models` package."""
    import face_recognition_models as frm

    return {
        "shape68": frm.pose_predictor_model_location(),
        "shape5": frm.pose_predictor_five_point_model_location(),
        "resnet": frm.face_recognition_model_location(),
        "cnn": frm.cnn_face_detector_model_location(),
    }


@functools.lru_cache(maxsize=None)
def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _models_used(options: PipelineOptions) -> list[str]:
    names = ["resnet", "shape68" if options.landmarks == 68 else "shape5"]
    if options.detector == "cnn":
        names.append("cnn")
    return names


@functools.lru_cache(maxsize=None)
def fingerprint(options: PipelineOptions) -> str:
    """A short id of everything that decides the vectors: model files, options, pipeline version.

    Cache keys carry it, so a changed option or model never serves stale vectors.
    """
    paths = model_paths()
    h = hashlib.sha256(f"v{PIPELINE_VERSION}".encode())
    for name in _models_used(options):
        h.update(f"{name}={_file_digest(paths[name])}".encode())
    h.update(repr(sorted(options.to_dict().items())).encode())
    return h.hexdigest()[:16]


def dlib_build_info() -> dict:
    """Which dlib this process runs: version, and whether it was built with BLAS / AVX / CUDA."""
    import dlib

    return {
        "version": dlib.__version__,
        "blas": bool(getattr(dlib, "DLIB_USE_BLAS", False)),
        "avx": bool(getattr(dlib, "USE_AVX_INSTRUCTIONS", False)),
        "cuda": bool(getattr(dlib, "DLIB_USE_CUDA", False)),
    }


def describe_dlib() -> str:
    """One log line on the dlib build, with a warning when it is the slow (no BLAS) one."""
    info = dlib_build_info()
    line = "dlib {version} (BLAS: {blas}, AVX: {avx}, CUDA: {cuda})".format(**info)
    if not info["blas"] and not info["cuda"]:
        line += (" -- WARNING: this dlib has no BLAS, descriptors run ~5x slower;"
                 " scripts/up installs the cached BLAS build")
    return line


class FacePipeline:
    """dlib detector + shape predictor + ResNet descriptor with fixed options.

    Not thread-safe (dlib's objects are not); use one per process, via `get_pipeline`.
    """

    def __init__(self, options: PipelineOptions = PipelineOptions()):
        import dlib

        self.options = options
        self._detector = _load_model("cnn" if options.detector == "cnn" else "hog")
        self._shape = _load_model("shape68" if options.landmarks == 68 else "shape5")
        self._resnet = _load_model("resnet")
        self._dlib = dlib

    def _detect(self, rgb: np.ndarray) -> list[tuple[tuple[int, int, int, int], float]]:
        """Boxes (left, top, right, bottom) in `rgb`'s pixels with detector scores."""
        if self.options.detector == "cnn":
            found = self._detector(rgb, self.options.upsample)
            return [((d.rect.left(), d.rect.top(), d.rect.right() + 1, d.rect.bottom() + 1),
                     float(d.confidence)) for d in found]
        rects, scores, _ = self._detector.run(rgb, self.options.upsample, 0.0)
        return [((r.left(), r.top(), r.right() + 1, r.bottom() + 1), float(s))
                for r, s in zip(rects, scores)]

    def faces(self, rgb: np.ndarray) -> list[Face]:
        """All faces in an image.

        rgb: (H, W, 3) uint8. Returns faces sorted left to right; boxes and landmarks are in
        rgb's pixels (clipped to the image). An image without a face gives [] unless
        options.fallback is set, in which case the whole image is the one face.
        """
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 image, got {rgb.shape} {rgb.dtype}")
        rgb = np.ascontiguousarray(rgb)
        height, width = rgb.shape[:2]
        scale = min(1.0, self.options.max_side / max(height, width))
        small = rgb if scale == 1.0 else _resize(rgb, scale)
        found_by = self.options.detector
        detections = [(_scale_box(box, 1 / scale, width, height), score)
                      for box, score in self._detect(small)]
        detections = [(box, s) for box, s in detections if box[2] > box[0] and box[3] > box[1]]
        if not detections and self.options.fallback:
            detections, found_by = [((0, 0, width, height), 0.0)], "fallback"
        detections.sort(key=lambda d: (d[0][0], d[0][1]))
        if not detections:
            return []

        dlib = self._dlib
        shapes = dlib.full_object_detections()
        for (left, top, right, bottom), _ in detections:
            shapes.append(self._shape(rgb, dlib.rectangle(left, top, right - 1, bottom - 1)))
        # One batched call per image: dlib extracts all chips and runs the ResNet on them together.
        vectors = self._resnet.compute_face_descriptor(rgb, shapes, self.options.jitter)
        faces = []
        for (box, score), shape, vector in zip(detections, shapes, vectors):
            landmarks = np.array([(p.x, p.y) for p in shape.parts()], np.float32)
            faces.append(Face(box, landmarks, np.asarray(vector, np.float32), score, found_by))
        return faces


def _resize(rgb: np.ndarray, scale: float) -> np.ndarray:
    from PIL import Image

    height, width = rgb.shape[:2]
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR))


def _scale_box(box, factor: float, width: int, height: int) -> tuple[int, int, int, int]:
    left, top, right, bottom = (round(v * factor) for v in box)
    return (max(0, left), max(0, top), min(width, right), min(height, bottom))


@functools.lru_cache(maxsize=None)
def _load_model(name: str):
    """Each dlib model once per process, shared by the pipelines of every option set.

    Loaded in an RQ worker's parent process, the models are inherited by its forked work-horses.
    """
    import dlib

    log.info("loading dlib model %s in pid %d", name, os.getpid())
    if name == "hog":
        return dlib.get_frontal_face_detector()
    path = model_paths()[name]
    if name == "cnn":
        return dlib.cnn_face_detection_model_v1(path)
    if name == "resnet":
        return dlib.face_recognition_model_v1(path)
    return dlib.shape_predictor(path)


@functools.lru_cache(maxsize=32)
def get_pipeline(options: PipelineOptions = PipelineOptions()) -> FacePipeline:
    """The process's pipeline for these options (models load on first use)."""
    return FacePipeline(options)

"""The seed study's face pipeline (section 3.2): detector -> landmarks -> dlib ResNet v1 descriptor.

    >>> pipeline = get_pipeline(PipelineOptions())
    >>> faces = pipeline.faces(rgb)          # rgb: (H, W, 3) uint8
    >>> found = [pipeline.find(rgb) for rgb in images]     # detection, landmarks, chips per image
    >>> per_image = pipeline.describe(found)               # one descriptor run over all their chips

Models come from the installed `face-recognition-models` package and are loaded once per process
(`get_pipeline` caches one pipeline per option set), so an RQ worker pays for loading only once.
dlib finds the faces, their landmarks and their 150x150 chips; the descriptor runs in onnxruntime on
a graph built from dlib's own network file (workers/descriptor), or in dlib (descriptor="dlib").

Settings:
    SUBDISC_DESCRIPTOR     the default of PipelineOptions.descriptor: onnx (default) or dlib
Settings of the worker process (not part of the fingerprint: they do not change the vectors):
    SUBDISC_ONNX_THREADS   onnxruntime intra-op threads per worker (default 1: workers are the
                           parallelism, one per core)
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from workers.results import Face

log = logging.getLogger(__name__)

#: Bump when the pipeline's code changes what it computes: every cached vector is then recomputed.
PIPELINE_VERSION = 2
#: dlib's chip for its descriptor: compute_face_descriptor's size and padding.
CHIP_SIZE, CHIP_PADDING = 150, 0.25
#: The descriptor runtimes: onnxruntime on our graph of dlib's network, or dlib's own code.
DESCRIPTORS = ("onnx", "dlib")
#: Most chips in one descriptor run: a job's photos are cached after each run, so a killed job
#: redoes at most one run's worth (measured: ms per face stops falling beyond ~16).
MAX_CHIPS_PER_RUN = 16


@dataclass(frozen=True)
class PipelineOptions:
    """How faces are found and described. Every field is part of the cache fingerprint.

    detector: "hog" (dlib's frontal face detector, the study's) or "cnn" (dlib's MMOD CNN detector:
        finds more non-frontal faces, ~20x slower on a CPU).
    upsample: times the image is upsampled before detection (0-4: finds smaller faces, 4x slower
        each), or "auto" (the default): detect at 0 (faces from ~80 px), and again at 1 (from ~40
        px) only where that can pay: when nothing was found, or when the photo is large enough to
        hold faces under ~80 px beside those found (its short side, at detection scale, at least
        `small_faces_from` pixels). On the dev photos it finds what upsample 1 finds, ~4x faster.
    small_faces_from: see upsample="auto" (pixels, short side); 0 = always look again at 1.
    landmarks: 68 (the study's shape predictor) or 5 (dlib's small predictor).
    jitter: descriptor jitter passes (0 = the plain descriptor; 10 is ~10x slower, slightly steadier).
    fallback: when nothing is detected, treat the whole image as the face (for pre-cropped, aligned
        photos such as UTKFace and Yale); such faces are marked found_by="fallback".
    max_side: images larger than this (longest side, pixels) are downscaled for detection only;
        landmarks and descriptors are computed on the original pixels.
    descriptor: "onnx" (dlib's network in onnxruntime, the default) or "dlib" (dlib's own
        compute_face_descriptor, for comparison); the vectors agree to ~1e-6. jitter > 0 always
        uses dlib's (its random crops are dlib's). Defaults to $SUBDISC_DESCRIPTOR, else "onnx".
    """

    detector: str = "hog"
    upsample: int | str = "auto"
    landmarks: int = 68
    jitter: int = 0
    fallback: bool = False
    max_side: int = 1600
    # The default follows SUBDISC_DESCRIPTOR, so a worker started with it preloads that runtime.
    descriptor: str = field(default_factory=lambda: os.environ.get("SUBDISC_DESCRIPTOR", "onnx"))
    small_faces_from: int = 640

    def __post_init__(self):
        if self.detector not in ("hog", "cnn"):
            raise ValueError(f"detector must be 'hog' or 'cnn', not {self.detector!r}")
        if self.landmarks not in (68, 5):
            raise ValueError(f"landmarks must be 68 or 5, not {self.landmarks!r}")
        if self.upsample != "auto" and (not isinstance(self.upsample, int)
                                        or isinstance(self.upsample, bool)
                                        or not 0 <= self.upsample <= 4):
            raise ValueError(f"upsample must be 'auto' or between 0 and 4, not {self.upsample!r}")
        if self.small_faces_from < 0:
            raise ValueError("small_faces_from must be 0 or more pixels")
        if not 0 <= self.jitter <= 100:
            raise ValueError("jitter must be between 0 and 100")
        if self.max_side < 64:
            raise ValueError("max_side must be at least 64 pixels")
        if self.descriptor not in DESCRIPTORS:
            raise ValueError(f"descriptor must be 'onnx' or 'dlib', not {self.descriptor!r}")

    @classmethod
    def from_dict(cls, values: dict | None) -> "PipelineOptions":
        # Unknown keys are dropped, so a job enqueued by a newer version still runs here.
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (values or {}).items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)


def parse_upsample(text: str) -> int | str:
    """An upsample setting as written on a command line or in SUBDISC_UPSAMPLE: "auto" or 0-4."""
    text = str(text).strip().lower()
    return "auto" if text == "auto" else int(text)


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
    from workers.descriptor.graph import GRAPH_VERSION

    paths = model_paths()
    # The graph's version too: with either runtime, the views come from the graph.
    h = hashlib.sha256(f"v{PIPELINE_VERSION}:graph{GRAPH_VERSION}".encode())
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


def onnx_threads() -> int:
    """SUBDISC_ONNX_THREADS: onnxruntime intra-op threads per worker process (default 1)."""
    value = int(os.environ.get("SUBDISC_ONNX_THREADS", "1"))
    if value < 1:
        raise ValueError(f"SUBDISC_ONNX_THREADS must be at least 1, not {value}")
    return value


def describe_dlib() -> str:
    """One log line on the runtimes: dlib's build (detection, landmarks, chips) and the descriptor's."""
    import onnxruntime

    info = dlib_build_info()
    threads = onnx_threads()
    ort = f"onnxruntime {onnxruntime.__version__}, {threads} thread" + ("s" if threads > 1 else "")
    line = "dlib {version} (AVX: {avx}, CUDA: {cuda}) for detection and landmarks; ".format(**info)
    if PipelineOptions().descriptor == "dlib":
        return line + f"descriptor: dlib's own (SUBDISC_DESCRIPTOR=dlib; views: {ort})"
    return line + f"descriptor: {ort} (dlib's own with descriptor=dlib or jitter > 0)"


@dataclass(eq=False)
class Found:
    """The faces found in one image, before their descriptors (FacePipeline.find).

    boxes: [(left, top, right, bottom)] in the image's pixels, left to right; scores: detector
    scores; found_by: "hog", "cnn" or "fallback"; landmarks: [(n, 2) float32];
    chips: (n_faces, 150, 150, 3) uint8, dlib.get_face_chip(img, shape, 150, 0.25) of each face.
    """

    boxes: list[tuple[int, int, int, int]]
    scores: list[float]
    found_by: str
    landmarks: list[np.ndarray]
    chips: np.ndarray

    def __len__(self) -> int:
        return len(self.boxes)


class FacePipeline:
    """dlib detector + shape predictor + chips, and the ResNet descriptor, with fixed options.

    Not thread-safe (dlib's objects are not); use one per process, via `get_pipeline`.
    """

    def __init__(self, options: PipelineOptions = PipelineOptions()):
        import dlib

        self.options = options
        self._detector = _load_model("cnn" if options.detector == "cnn" else "hog")
        self._shape = _load_model("shape68" if options.landmarks == 68 else "shape5")
        # The graph runs with either runtime: it gives the views, and with "onnx" the vectors.
        self._onnx = _load_model("onnx")
        self._dlib_resnet = (_load_model("resnet")
                             if options.descriptor == "dlib" or options.jitter > 0 else None)
        self._dlib = dlib

    def _detect_at(self, rgb: np.ndarray, upsample: int) -> list[tuple[tuple[int, int, int, int], float]]:
        """Boxes (left, top, right, bottom) in `rgb`'s pixels with detector scores."""
        if self.options.detector == "cnn":
            found = self._detector(rgb, upsample)
            return [((d.rect.left(), d.rect.top(), d.rect.right() + 1, d.rect.bottom() + 1),
                     float(d.confidence)) for d in found]
        rects, scores, _ = self._detector.run(rgb, upsample, 0.0)
        return [((r.left(), r.top(), r.right() + 1, r.bottom() + 1), float(s))
                for r, s in zip(rects, scores)]

    def _detect(self, rgb: np.ndarray) -> list[tuple[tuple[int, int, int, int], float]]:
        if self.options.upsample != "auto":
            return self._detect_at(rgb, self.options.upsample)
        found = self._detect_at(rgb, 0)
        if found and min(rgb.shape[:2]) < self.options.small_faces_from:
            return found   # a face found, and no room for faces too small for upsample 0
        # Upsample 1 sees faces from ~40 px; keep what upsample 0 found (at 1 it may miss a
        # large face) and add the faces it did not find.
        more = [d for d in self._detect_at(rgb, 1)
                if all(_overlap(d[0], box) < 0.3 for box, _ in found)]
        return found + more

    def find(self, rgb: np.ndarray) -> Found:
        """Detection, landmarks and chips of all faces in an image (no descriptor yet).

        rgb: (H, W, 3) uint8. Faces are sorted left to right; boxes and landmarks are in rgb's
        pixels (clipped to the image). An image without a face gives none unless options.fallback
        is set, in which case the whole image is the one face.
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

        dlib = self._dlib
        shapes = dlib.full_object_detections()
        for (left, top, right, bottom), _ in detections:
            shapes.append(self._shape(rgb, dlib.rectangle(left, top, right - 1, bottom - 1)))
        # The chips compute_face_descriptor makes for itself (checked: same vectors).
        chips = (np.stack(dlib.get_face_chips(rgb, shapes, size=CHIP_SIZE, padding=CHIP_PADDING))
                 if len(shapes) else np.zeros((0, CHIP_SIZE, CHIP_SIZE, 3), np.uint8))
        return Found([box for box, _ in detections], [score for _, score in detections], found_by,
                     [np.array([(p.x, p.y) for p in shape.parts()], np.float32) for shape in shapes],
                     chips)

    def describe(self, found: list[Found]) -> list[list[Face]]:
        """The faces of several images, their descriptors computed in one run over all chips.

        Each face gets its vector and its views (Face.views) from the same run; with
        descriptor="dlib" (or jitter) the vectors are dlib's and the views still the graph's.
        """
        chips = np.concatenate([f.chips for f in found]) if found else np.zeros(
            (0, CHIP_SIZE, CHIP_SIZE, 3), np.uint8)
        vectors, views = self._onnx.compute(chips)
        if self._dlib_resnet is not None and len(chips):
            vectors = np.array(self._dlib_resnet.compute_face_descriptor(list(chips),
                                                                         self.options.jitter),
                               np.float32)
        faces, at = [], 0
        for image in found:
            faces.append([Face(box, landmarks, vectors[at + i].copy(), score, image.found_by,
                               {name: view[at + i].copy() for name, view in views.items()})
                          for i, (box, score, landmarks)
                          in enumerate(zip(image.boxes, image.scores, image.landmarks))])
            at += len(image)
        return faces

    def faces(self, rgb: np.ndarray) -> list[Face]:
        """All faces in an image (find, then describe): see `find`."""
        return self.describe([self.find(rgb)])[0]


def _overlap(a, b) -> float:
    """Intersection over the smaller box's area (1 when one box holds the other)."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    return width * height / min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))


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
    """Each model once per process, shared by the pipelines of every option set.

    Loaded in an RQ worker's parent process, the models are inherited by its forked work-horses.
    """
    import dlib

    log.info("loading model %s in pid %d", name, os.getpid())
    if name == "onnx":
        from workers.descriptor import OnnxDescriptor

        path = model_paths()["resnet"]
        return OnnxDescriptor.load(path, _file_digest(path), threads=onnx_threads())
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

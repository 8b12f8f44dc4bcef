"""dlib's face descriptor in onnxruntime: the graph built once per .dat file, cached, run in batches.

    >>> net = OnnxDescriptor.load(dat_path, sha256_of_dat, threads=1)
    >>> vectors, views = net.compute(chips)   # chips: (N, 150, 150, 3) uint8
    >>> vectors.shape, views["eyes"].shape
    ((N, 128), (N, 192))

The .onnx file lives in the model cache (model_cache_dir(): $SUBDISC_CACHE/models, else
$XDG_CACHE_HOME/subdisc/models, else ~/.cache/subdisc/models), named by the .dat's sha256 and the
graph builder's version, so a changed file or builder builds anew; nothing is ever downloaded.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from workers.descriptor.graph import BANDS, CHIP_SIZE, GRAPH_VERSION

log = logging.getLogger(__name__)

#: The views the graph gives beside the descriptor (see graph.py for what each one is).
VIEW_NAMES = ("pooled", *BANDS)


def model_cache_dir() -> Path:
    """Where built models are kept: $SUBDISC_CACHE/models, else the XDG cache's subdisc/models."""
    root = os.environ.get("SUBDISC_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "subdisc")
    return Path(root) / "models"


def cached_model(dat_path: str, sha256: str) -> Path:
    """The .onnx file of the .dat at dat_path (whose hash is sha256), built and saved if missing."""
    path = model_cache_dir() / f"dlib_resnet_v1-{sha256[:16]}-g{GRAPH_VERSION}.onnx"
    if path.exists():
        return path
    import onnx

    from workers.descriptor.dat import read_dat
    from workers.descriptor.graph import build_graph

    log.info("building the ONNX descriptor graph from %s into %s", dat_path, path)
    model = build_graph(read_dat(dat_path))
    path.parent.mkdir(parents=True, exist_ok=True)
    # Several workers may start at once: each writes its own file and renames it into place.
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".onnx.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model.SerializeToString())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


class OnnxDescriptor:
    """An onnxruntime session on the descriptor graph.

    threads: intra-op threads (1 by default: workers are the parallelism). With one thread the
    session holds no thread pool, so a worker's forked work-horses can use the session their parent
    loaded; with more, a session is made anew in each process that runs it.
    """

    def __init__(self, model_path: str | Path, threads: int = 1):
        if threads < 1:
            raise ValueError(f"threads must be at least 1, not {threads}")
        self.model_path, self.threads = str(model_path), threads
        self._session, self._pid = None, None

    @classmethod
    def load(cls, dat_path: str, sha256: str, threads: int = 1) -> "OnnxDescriptor":
        runner = cls(cached_model(dat_path, sha256), threads)
        runner.session()
        return runner

    def session(self):
        if self._session is None or (self.threads > 1 and self._pid != os.getpid()):
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            if self.threads == 1:
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self._session = ort.InferenceSession(self.model_path, options,
                                                 providers=["CPUExecutionProvider"])
            self._pid = os.getpid()
        return self._session

    def compute(self, chips: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Descriptors and views of a batch of chips.

        chips: (N, 150, 150, 3) uint8 from dlib.get_face_chip(img, shape, 150, 0.25).
        Returns ((N, 128) float32 descriptors, {view name: (N, d) float32}); N may be 0.
        """
        chips = np.ascontiguousarray(chips, np.uint8)
        if chips.ndim != 4 or chips.shape[1:] != (CHIP_SIZE, CHIP_SIZE, 3):
            raise ValueError(f"expected (N, {CHIP_SIZE}, {CHIP_SIZE}, 3) chips, got {chips.shape}")
        session = self.session()
        if not len(chips):
            dims = {o.name: o.shape[1] for o in session.get_outputs()}
            empty = {name: np.zeros((0, dims[name]), np.float32) for name in dims}
            return empty.pop("descriptor"), empty
        names = ["descriptor", *VIEW_NAMES]
        outputs = session.run(names, {"chips": chips})
        return outputs[0], dict(zip(VIEW_NAMES, outputs[1:]))

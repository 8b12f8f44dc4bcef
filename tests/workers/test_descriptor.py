"""dlib's descriptor network read from its .dat file, rebuilt in ONNX, run in onnxruntime: dlib's vectors."""
import csv
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from workers.descriptor import OnnxDescriptor
from workers.descriptor.dat import DatFormatError, read_dat
from workers.descriptor.graph import build_graph, expected_versions
from workers.descriptor.runner import cached_model, model_cache_dir
from workers.pipeline import PipelineOptions, _file_digest, get_pipeline, model_paths

DAT = model_paths()["resnet"]


@pytest.fixture(scope="module")
def net():
    return read_dat(DAT)


def test_the_reader_takes_the_whole_file(net):
    kinds = [layer.kind for layer in net.layers]
    assert {k: kinds.count(k) for k in set(kinds)} == {
        "con": 29, "affine": 29, "relu": 29, "add_prev": 14, "avg_pool": 5, "max_pool": 1, "fc": 1}
    assert net.versions == expected_versions() and len(net.versions) == 130
    assert np.allclose(net.mean, (122.782, 117.001, 104.298)) and net.size == (150, 150)
    assert net.loss == pytest.approx({"margin": 0.04, "distance_threshold": 0.6})
    # every float of the file is in a parameter tensor or a known field: count the parameters
    params = sum(a.size for layer in net.layers for a in layer.arrays.values())
    assert 4 * params > 0.99 * os.path.getsize(DAT)
    assert net.layers[-1].arrays["weight"].shape == (256, 128)


def test_the_reader_refuses_a_cut_or_longer_file(tmp_path):
    data = open(DAT, "rb").read()
    (tmp_path / "cut.dat").write_bytes(data[:-3])
    (tmp_path / "long.dat").write_bytes(data + b"\x01\x00")
    with pytest.raises(DatFormatError, match="ends"):
        read_dat(str(tmp_path / "cut.dat"))
    with pytest.raises(DatFormatError, match="2 bytes left unread"):
        read_dat(str(tmp_path / "long.dat"))


def test_the_graph_is_the_documented_one(net):
    ops = [node.op_type for node in build_graph(net).graph.node]
    counts = {op: ops.count(op) for op in ("Conv", "Relu", "Add", "Pad", "AveragePool", "MaxPool",
                                           "GlobalAveragePool", "MatMul")}
    assert counts == {"Conv": 29, "Relu": 29, "Add": 14, "Pad": 5, "AveragePool": 4, "MaxPool": 1,
                      "GlobalAveragePool": 1, "MatMul": 1}


def test_the_graph_is_built_once_and_cached_by_the_files_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBDISC_CACHE", str(tmp_path / "cache"))
    assert model_cache_dir() == tmp_path / "cache" / "models"
    sha = _file_digest(DAT)
    path = cached_model(DAT, sha)
    assert path.parent == tmp_path / "cache" / "models" and sha[:16] in path.name
    stamp = path.stat().st_mtime_ns
    assert cached_model(DAT, sha) == path and path.stat().st_mtime_ns == stamp
    # another file (another hash) gets a graph of its own
    other = tmp_path / "copy.dat"
    shutil.copy(DAT, other)
    assert cached_model(str(other), "0" * 64) != path
    assert sorted(p.suffix for p in path.parent.iterdir()) == [".onnx", ".onnx"]


def dev_photos(root, n_per_source=6):
    with open(root / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    picked = []
    for source in ("lfw", "mtfl", "yale"):
        picked += [r["path"] for r in rows if r["source"] == source][:n_per_source]
    return [np.asarray(Image.open(root / p).convert("RGB")) for p in picked]


def compare_runtimes(images):
    """Both runtimes on the same faces, and dlib's compute_face_descriptor on the image itself."""
    import dlib

    onnx, own = (get_pipeline(PipelineOptions(descriptor=d, fallback=True)) for d in ("onnx", "dlib"))
    resnet = dlib.face_recognition_model_v1(DAT)
    shape68 = dlib.shape_predictor(model_paths()["shape68"])
    worst, n = 0.0, 0
    for rgb in images:
        a, b = onnx.faces(rgb), own.faces(rgb)
        assert [f.box for f in a] == [f.box for f in b]
        for face_a, face_b in zip(a, b):
            left, top, right, bottom = face_a.box
            shape = shape68(rgb, dlib.rectangle(left, top, right - 1, bottom - 1))
            reference = np.array(resnet.compute_face_descriptor(rgb, shape, 0), np.float32)
            assert np.array_equal(face_b.vector, reference)   # dlib from our chips = dlib's own
            worst = max(worst, float(np.abs(face_a.vector - reference).max()))
            n += 1
    return worst, n


def test_onnx_vectors_are_dlibs_on_the_astronaut(astronaut, astronaut_face):
    pair = np.ascontiguousarray(np.concatenate([astronaut_face, astronaut_face[:, ::-1]], axis=1))
    worst, n = compare_runtimes([astronaut, astronaut_face, pair])
    assert n >= 4 and worst <= 1e-5


@pytest.mark.dev_faces
def test_onnx_vectors_are_dlibs_on_dev_photos(dev_faces):
    worst, n = compare_runtimes(dev_photos(dev_faces))
    assert n >= 18 and worst <= 1e-5


def test_a_batch_gives_each_chip_its_own_vector(astronaut):
    pipeline = get_pipeline(PipelineOptions())
    chip = pipeline.find(astronaut).chips[:1]
    runner = OnnxDescriptor.load(DAT, _file_digest(DAT))
    one, _ = runner.compute(chip)
    many, _ = runner.compute(np.concatenate([chip, chip[:, :, ::-1], chip]))
    assert np.abs(many[0] - one[0]).max() < 1e-6 and np.abs(many[2] - one[0]).max() < 1e-6
    assert np.linalg.norm(many[1] - one[0]) > 1e-3      # the mirrored chip is another input
    with pytest.raises(ValueError, match="chips"):
        runner.compute(np.zeros((1, 100, 100, 3), np.uint8))

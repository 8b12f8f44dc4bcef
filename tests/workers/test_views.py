"""Face.views: the descriptor network's pooled vector and band-pooled feature maps, cached with the face."""
import json
import struct

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from workers.descriptor.graph import BANDS, band_rows
from workers.descriptor.runner import cached_model
from workers.pipeline import PipelineOptions, _file_digest, get_pipeline, model_paths
from workers.results import VIEW_DIMS, Face, ImageResult

DAT = model_paths()["resnet"]


@pytest.fixture(scope="module")
def faces(astronaut):
    return get_pipeline(PipelineOptions()).faces(astronaut)


def test_every_face_has_the_documented_views(faces):
    assert len(faces) >= 1
    for face in faces:
        assert {k: v.shape for k, v in face.views.items()} == {k: (d,) for k, d in VIEW_DIMS.items()}
        assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in face.views.values())
        # after a relu, averaged: nothing negative, and the bands differ
        assert all((v >= 0).all() for v in face.views.values())
        assert not np.allclose(face.views["eyes"], face.views["mouth"])


def test_pooled_is_the_vector_before_the_fc_layer(faces):
    from workers.descriptor.dat import read_dat

    weight = read_dat(DAT).layers[-1].arrays["weight"]
    for face in faces:
        assert np.abs(face.views["pooled"] @ weight - face.vector).max() < 1e-5


def test_band_views_are_the_level_maps_averaged_over_the_band(astronaut):
    """The level-3 and level-2 maps taken out of the graph by hand, pooled over the bands here."""
    found = get_pipeline(PipelineOptions()).find(astronaut)
    model = onnx.load(str(cached_model(DAT, _file_digest(DAT))))
    for name in ("level3", "level2"):
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    level3, level2 = session.run(["level3", "level2"], {"chips": found.chips})
    assert level3.shape[1:] == (64, 17, 17) and level2.shape[1:] == (128, 8, 8)
    assert band_rows(BANDS["eyes"], 17) == (3, 8) and band_rows(BANDS["lower"], 8) == (5, 8)
    faces = get_pipeline(PipelineOptions()).describe([found])[0]
    for i, face in enumerate(faces):
        for band, (top, bottom) in BANDS.items():
            expected = [maps[i][:, slice(*band_rows((top, bottom), maps.shape[2]))].mean(axis=(1, 2))
                        for maps in (level3, level2)]
            assert np.allclose(face.views[band], np.concatenate(expected), atol=1e-6)


def test_both_runtimes_give_the_same_views(astronaut_face):
    onnx_face, = get_pipeline(PipelineOptions()).faces(astronaut_face)
    dlib_face, = get_pipeline(PipelineOptions(descriptor="dlib")).faces(astronaut_face)
    jitter_face, = get_pipeline(PipelineOptions(jitter=2)).faces(astronaut_face)
    for name in VIEW_DIMS:
        assert np.array_equal(onnx_face.views[name], dlib_face.views[name])
        assert np.array_equal(onnx_face.views[name], jitter_face.views[name])


def test_views_round_trip_through_the_cached_form(faces):
    result = ImageResult("ab" * 32, 512, 512, faces)
    back = ImageResult.from_bytes(result.to_bytes())
    for a, b in zip(faces, back.faces):
        assert list(b.views) == list(a.views)
        assert all(np.array_equal(a.views[k], b.views[k]) for k in a.views)
        assert np.array_equal(a.vector, b.vector) and np.array_equal(a.landmarks, b.landmarks)


def old_form(result):
    """The binary form as written before views existed (PIPELINE_VERSION 1)."""
    header = {"sha256": result.sha256, "width": result.width, "height": result.height,
              "error": None, "message": "",
              "faces": [{"box": list(f.box), "score": f.score, "found_by": f.found_by,
                         "n_landmarks": len(f.landmarks)} for f in result.faces]}
    head = json.dumps(header).encode()
    return struct.pack("<I", len(head)) + head + b"".join(
        f.vector.astype("<f4").tobytes() + f.landmarks.astype("<f4").tobytes() for f in result.faces)


def test_entries_cached_before_views_still_decode(faces):
    result = ImageResult("ab" * 32, 512, 512, faces)
    back = ImageResult.from_bytes(old_form(result))
    assert [f.views for f in back.faces] == [{}] * len(faces)
    assert np.array_equal(back.vectors(), result.vectors())
    # and a reader of the old form finds the vectors and landmarks of a new entry where it expects
    new = result.to_bytes()
    (n,) = struct.unpack_from("<I", new, 0)
    offset = 4 + n
    for face in faces:
        assert np.array_equal(np.frombuffer(new, "<f4", 128, offset), face.vector)
        offset += 4 * (128 + 2 * len(face.landmarks))


def test_a_face_without_views_is_as_before():
    face = Face((0, 0, 10, 10), np.zeros((5, 2), np.float32), np.ones(128, np.float32), 1.0, "hog")
    assert face.views == {}
    back = ImageResult.from_bytes(ImageResult("cd" * 32, 10, 10, [face]).to_bytes()).faces[0]
    assert back.views == {} and np.array_equal(back.vector, face.vector)

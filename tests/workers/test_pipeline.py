"""The dlib pipeline on packaged faces: what it finds, where, and with which options."""
import numpy as np
import pytest

from workers.pipeline import PipelineOptions, describe_dlib, fingerprint, get_pipeline
from workers.results import ImageResult

# Where the astronaut's face is in skimage's astronaut photo (left, top, right, bottom).
FACE = (160, 60, 280, 180)


def inside(box, region, slack=10):
    return (box[0] >= region[0] - slack and box[1] >= region[1] - slack
            and box[2] <= region[2] + slack and box[3] <= region[3] + slack)


def test_one_face(astronaut_face):
    faces = get_pipeline(PipelineOptions()).faces(astronaut_face)
    assert len(faces) == 1
    face = faces[0]
    assert face.found_by == "hog" and face.score > 0.5
    assert face.vector.shape == (128,) and face.vector.dtype == np.float32
    assert np.isfinite(face.vector).all() and np.linalg.norm(face.vector) > 0.5
    assert face.landmarks.shape == (68, 2)
    left, top, right, bottom = face.box
    # the 68 landmarks lie on the face, inside (or at the edge of) the detector's box
    assert (face.landmarks[:, 0] > left - 15).all() and (face.landmarks[:, 0] < right + 15).all()
    assert (face.landmarks[:, 1] > top - 25).all() and (face.landmarks[:, 1] < bottom + 15).all()


def test_several_faces_are_all_found_left_to_right(astronaut_face):
    pair = np.concatenate([astronaut_face, astronaut_face[:, ::-1]], axis=1)
    faces = get_pipeline(PipelineOptions()).faces(np.ascontiguousarray(pair))
    assert len(faces) == 2
    width = astronaut_face.shape[1]
    assert faces[0].box[2] <= width < faces[1].box[0]
    # a mirrored face is the same person: its vector stays close (dlib's threshold is 0.6)
    assert np.linalg.norm(faces[0].vector - faces[1].vector) < 0.6


def test_no_face_is_an_empty_result_not_an_error():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 255, (200, 300, 3), dtype=np.uint8)
    assert get_pipeline(PipelineOptions()).faces(noise) == []


def test_fallback_takes_the_whole_image_when_nothing_is_detected():
    grey = np.full((120, 100, 3), 128, np.uint8)
    faces = get_pipeline(PipelineOptions(fallback=True)).faces(grey)
    assert len(faces) == 1
    assert faces[0].found_by == "fallback" and faces[0].box == (0, 0, 100, 120)
    assert faces[0].score == 0.0 and faces[0].vector.shape == (128,)


def test_fallback_is_not_used_when_a_face_is_detected(astronaut_face):
    faces = get_pipeline(PipelineOptions(fallback=True)).faces(astronaut_face)
    assert [f.found_by for f in faces] == ["hog"]


def test_large_photo_is_downscaled_for_detection_and_boxes_map_back(astronaut):
    big = np.ascontiguousarray(np.kron(astronaut, np.ones((4, 4, 1), np.uint8)))  # 2048 x 2048
    small_faces = get_pipeline(PipelineOptions()).faces(astronaut)
    big_faces = get_pipeline(PipelineOptions(max_side=1024)).faces(big)
    face = max(small_faces, key=lambda f: f.score)
    big_face = max(big_faces, key=lambda f: f.score)
    assert inside(big_face.box, tuple(4 * v for v in FACE), slack=40)
    assert np.allclose(np.array(big_face.box) / 4, face.box, atol=12)
    # descriptors come from the original pixels: the same person at 4x resolution
    assert np.linalg.norm(big_face.vector - face.vector) < 0.3


def test_five_point_landmarks(astronaut_face):
    faces = get_pipeline(PipelineOptions(landmarks=5)).faces(astronaut_face)
    assert len(faces) == 1 and faces[0].landmarks.shape == (5, 2)


def test_cnn_detector(astronaut_face):
    faces = get_pipeline(PipelineOptions(detector="cnn", upsample=0)).faces(astronaut_face)
    assert len(faces) == 1 and faces[0].found_by == "cnn"
    hog = get_pipeline(PipelineOptions()).faces(astronaut_face)[0]
    assert np.linalg.norm(faces[0].vector - hog.vector) < 0.4


def test_jitter_changes_little(astronaut_face):
    plain = get_pipeline(PipelineOptions()).faces(astronaut_face)[0]
    jittered = get_pipeline(PipelineOptions(jitter=3)).faces(astronaut_face)[0]
    assert 0 < np.linalg.norm(plain.vector - jittered.vector) < 0.2


@pytest.mark.parametrize("bad", [dict(detector="mtcnn"), dict(landmarks=7), dict(upsample=9),
                                 dict(jitter=-1), dict(max_side=10), dict(descriptor="tf")])
def test_bad_options_are_refused(bad):
    with pytest.raises(ValueError):
        PipelineOptions(**bad)


def test_fingerprint_follows_every_option():
    base = fingerprint(PipelineOptions())
    assert base == fingerprint(PipelineOptions())
    changed = [PipelineOptions(upsample=2), PipelineOptions(fallback=True), PipelineOptions(jitter=1),
               PipelineOptions(landmarks=5), PipelineOptions(detector="cnn"),
               PipelineOptions(max_side=800), PipelineOptions(descriptor="dlib")]
    prints = {fingerprint(o) for o in changed}
    assert base not in prints and len(prints) == len(changed)


def test_describe_dlib_names_the_build_and_the_descriptor_runtime():
    line = describe_dlib()
    assert line.startswith("dlib ") and "AVX" in line and "descriptor: onnxruntime" in line
    assert "WARNING" not in line


def test_result_round_trips_through_bytes(astronaut):
    faces = get_pipeline(PipelineOptions()).faces(astronaut)
    result = ImageResult("ab" * 32, astronaut.shape[1], astronaut.shape[0], faces)
    back = ImageResult.from_bytes(result.to_bytes())
    assert back.sha256 == result.sha256 and (back.width, back.height) == (512, 512)
    assert [f.box for f in back.faces] == [f.box for f in faces]
    assert np.array_equal(back.vectors(), result.vectors())
    assert all(np.array_equal(a.landmarks, b.landmarks) for a, b in zip(back.faces, faces))
    failed = ImageResult.failed("not_image", "cannot identify image file", "cd" * 32)
    back = ImageResult.from_bytes(failed.to_bytes())
    assert (back.error, back.message, back.faces) == ("not_image", "cannot identify image file", [])


def canvas(side, *pieces):
    """A grey side x side photo with each (image, left, top) pasted in."""
    out = np.full((side, side, 3), 120, np.uint8)
    for image, left, top in pieces:
        out[top:top + image.shape[0], left:left + image.shape[1]] = image
    return out


def half(image):
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((image.shape[1] // 2, image.shape[0] // 2)))


def test_auto_upsample_looks_again_when_nothing_is_found(astronaut_face):
    small = canvas(400, (half(astronaut_face), 150, 150))      # a ~50 px face, under HOG's 80
    assert get_pipeline(PipelineOptions(upsample=0)).faces(small) == []
    faces = get_pipeline(PipelineOptions()).faces(small)
    assert len(faces) == 1 and inside(faces[0].box, (150, 150, 265, 270))
    assert [f.box for f in faces] == [f.box for f in get_pipeline(PipelineOptions(upsample=1)).faces(small)]


def test_auto_upsample_finds_small_faces_beside_large_ones_in_a_large_photo(astronaut_face):
    group = canvas(700, (astronaut_face, 20, 20), (half(astronaut_face), 400, 400))
    assert len(get_pipeline(PipelineOptions(upsample=0)).faces(group)) == 1
    faces = get_pipeline(PipelineOptions()).faces(group)
    assert len(faces) == 2 and faces[0].box[0] < 300 < faces[1].box[0]
    # a photo under small_faces_from is taken as a portrait: upsample 0's face only
    assert len(get_pipeline(PipelineOptions(small_faces_from=701)).faces(group)) == 1


def test_auto_upsample_finds_what_upsample_1_finds_on_these_photos(astronaut, astronaut_face):
    pair = np.ascontiguousarray(np.concatenate([astronaut_face, astronaut_face[:, ::-1]], axis=1))
    for photo in (astronaut_face, pair):
        auto = get_pipeline(PipelineOptions()).faces(photo)
        one = get_pipeline(PipelineOptions(upsample=1)).faces(photo)
        assert len(auto) == len(one)
        for a, b in zip(auto, one):
            assert np.abs(np.array(a.box) - b.box).max() <= 12
    # On the whole photo upsample 1 also takes the mission patch on her sleeve for a face (score
    # ~0.1); auto keeps to her face.
    one = get_pipeline(PipelineOptions(upsample=1)).faces(astronaut)
    assert len(one) == 2 and inside(one[0].box, (120, 330, 220, 430), slack=5)
    auto = get_pipeline(PipelineOptions()).faces(astronaut)
    assert len(auto) == 1 and inside(auto[0].box, FACE)


def test_upsample_settings():
    from workers.pipeline import parse_upsample

    assert parse_upsample("auto") == "auto" and parse_upsample(" 2") == 2
    assert PipelineOptions.from_dict({"upsample": "auto"}) == PipelineOptions()
    assert fingerprint(PipelineOptions(small_faces_from=320)) != fingerprint(PipelineOptions())
    for bad in ("always", 1.5, True, 5):
        with pytest.raises(ValueError):
            PipelineOptions(upsample=bad)

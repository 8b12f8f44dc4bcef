"""Views of a face: the landmark geometry of a real face (skimage's astronaut, through the real
pipeline), its invariance to the photo's scale and mirror image, and faces without cached views."""
import numpy as np

from backend.attributes.views import face_views, landmark_views, stack_views
from workers.pipeline import get_pipeline
from workers.results import Face


def _face(rgb):
    faces = get_pipeline().faces(np.ascontiguousarray(rgb))
    assert len(faces) == 1
    return faces[0]


def test_real_face_views_and_their_invariance(astronaut_face):
    face = _face(astronaut_face)
    views = face_views(face)
    assert views["vector"].shape == (128,) and views["smile"].shape == (3,)
    assert views["geometry"].shape == (10,) and np.isfinite(views["geometry"]).all()
    # Plain anatomy in eye-aligned units: a mouth about as wide as the eyes are apart, narrower
    # than the jaw; both eyes open.
    mouth_width, width_to_jaw = views["smile"][0], views["smile"][1]
    assert 0.5 < mouth_width < 1.5 and 0.2 < width_to_jaw < 0.8
    assert (views["geometry"][[6, 8]] > 0.1).all()      # eye opening, both eyes
    # Landmark views do not depend on where the face is or how big: shift and scale the points.
    L = np.asarray(face.landmarks, np.float64)[None]
    moved = landmark_views(L * 2.5 + 40.0)
    np.testing.assert_allclose(moved["geometry"], landmark_views(L)["geometry"], atol=1e-9)
    # The mirror image: mouth features the same within the landmark detector's wobble.
    mirrored = face_views(_face(astronaut_face[:, ::-1]))
    np.testing.assert_allclose(mirrored["smile"][:2], views["smile"][:2], rtol=0.1)


def test_cached_appearance_views_pass_through_and_missing_ones_are_left_out():
    rng = np.random.default_rng(0)
    L = rng.normal(0, 1, (68, 2)).astype(np.float32) * 10 + 100
    old = Face((0, 0, 10, 10), L, rng.normal(size=128).astype(np.float32), 1.0, "hog")
    new = Face((0, 0, 10, 10), L, rng.normal(size=128).astype(np.float32), 1.0, "hog")
    object.__setattr__(new, "views", {"eyes": np.ones(192, np.float32)})
    assert face_views(new)["eyes"].shape == (192,)
    assert "eyes" not in face_views(old)
    stacked = stack_views([face_views(old), face_views(new)])
    assert set(stacked) == {"vector", "smile", "geometry"} and stacked["vector"].shape == (2, 128)
    # Five landmarks (the other landmark model): the vector alone.
    five = Face((0, 0, 10, 10), L[:5], rng.normal(size=128).astype(np.float32), 1.0, "hog")
    assert set(face_views(five)) == {"vector"}

"""Label Studio prediction JSON, checked by Label Studio's own validator (label_studio_sdk)."""
import numpy as np
import pytest
from label_studio_sdk.label_interface import LabelInterface

from backend.labeling_config import default_config_xml, parse
from backend.predictions import FacePrediction, box_percent, build, detector_confidence, empty
from workers.results import Face, ImageResult

WHOLE = """<View><Image name="img" value="$photo"/>
  <RectangleLabels name="box" toName="img"><Label value="Face"/></RectangleLabels>
  <Choices name="mood" toName="img"><Choice value="happy"/><Choice value="sad"/></Choices>
  <Choices name="gender" toName="img" perRegion="true"><Choice value="m"/><Choice value="f"/></Choices>
</View>"""


def face(box, score=1.0, found_by="hog"):
    return Face(box, np.zeros((68, 2), np.float32), np.zeros(128, np.float32), score, found_by)


def test_two_faces_give_two_regions_with_their_choices_and_valid_json():
    config = parse(default_config_xml())
    result = ImageResult("x", 640, 480, [face((64, 48, 192, 240)), face((320, 96, 448, 288), 0.2)])
    preds = [FacePrediction({"gender": ("male", 0.9), "emotion": ("neutral", 0.6),
                             "skin": (None, 0.0)}, rank=0.25),
             FacePrediction({"gender": ("female", 0.7)}, rank=0.75)]
    prediction, shown = build(result, preds, config, "v7")
    assert LabelInterface(config.xml).validate_prediction(prediction, return_errors=True) == []
    items = prediction["result"]
    rects = [r for r in items if r["type"] == "rectanglelabels"]
    assert [r["id"] for r in rects] == ["face1", "face2"]
    assert rects[0]["value"] == {"x": 10.0, "y": 10.0, "width": 20.0, "height": 40.0, "rotation": 0,
                                 "rectanglelabels": ["Face"]}
    assert (rects[0]["original_width"], rects[0]["original_height"]) == (640, 480)
    choices = {(r["id"], r["from_name"]): r for r in items if r["type"] == "choices"}
    # Unnamed attributes (skin: None) are left to the labeler: the box alone.
    assert set(choices) == {("face1", "gender"), ("face1", "emotion"), ("face2", "gender")}
    assert choices[("face1", "gender")]["value"]["choices"] == ["male"]
    # A per-region choice repeats its rectangle's geometry.
    assert {k: choices[("face2", "gender")]["value"][k] for k in ("x", "y", "width", "height")} == \
        {k: rects[1]["value"][k] for k in ("x", "y", "width", "height")}
    assert choices[("face1", "gender")]["score"] == 0.9
    assert prediction["score"] == 0.75 and prediction["model_version"] == "v7"
    assert shown == {"version": "v7", "faces": [
        {"box": [10.0, 10.0, 20.0, 40.0], "values": {"gender": "male", "emotion": "neutral"}},
        {"box": [50.0, 20.0, 20.0, 40.0], "values": {"gender": "female"}}], "whole": {}}


def test_whole_image_choices_come_from_the_largest_face():
    config = parse(WHOLE)
    result = ImageResult("x", 200, 100, [face((0, 0, 20, 20)), face((100, 0, 180, 80))])
    preds = [FacePrediction({"mood": ("sad", 0.9), "gender": ("m", 0.8)}),
             FacePrediction({"mood": ("happy", 0.6), "gender": ("f", 0.7)})]
    prediction, shown = build(result, preds, config, "v1")
    assert LabelInterface(WHOLE).validate_prediction(prediction, return_errors=True) == []
    whole = [r for r in prediction["result"] if r["from_name"] == "mood"]
    assert len(whole) == 1 and whole[0]["value"] == {"choices": ["happy"]}
    assert shown["whole"] == {"mood": "happy"}
    # Without ranks, the task score is the best detector confidence.
    assert prediction["score"] == round(detector_confidence(result.faces[0]), 4)


@pytest.mark.parametrize("result", [
    ImageResult("x", 640, 480, []),                                   # no face
    ImageResult.failed("truncated", "the image file is cut short"),    # broken photo
])
def test_no_face_or_broken_photo_is_an_empty_result(result):
    prediction, shown = build(result, None, parse(default_config_xml()), "v2")
    assert prediction == empty("v2") == {"result": [], "score": 0.0, "model_version": "v2"}
    assert shown["faces"] == []


def test_without_a_model_faces_get_boxes_only():
    config = parse(default_config_xml())
    prediction, _ = build(ImageResult("x", 100, 100, [face((10, 10, 50, 50), 0.0, "fallback")]),
                          None, config, "v0")
    assert [r["type"] for r in prediction["result"]] == ["rectanglelabels"]
    assert prediction["result"][0]["score"] == 0.0


def test_geometry_helpers():
    assert box_percent((50, 25, 150, 75), 200, 100) == (25.0, 25.0, 50.0, 50.0)
    assert detector_confidence(face((0, 0, 1, 1), 0.0)) == 0.0
    assert 0.6 < detector_confidence(face((0, 0, 1, 1), 1.0)) < 0.7
    assert detector_confidence(face((0, 0, 1, 1), -0.4)) == 0.0

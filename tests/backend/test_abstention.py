"""Honest pre-annotation: the gate on held-out predictions, and the whole attribute path on faces
whose clusters carry a signal for one attribute and none for another."""
import numpy as np
import pytest

from backend.attributes.abstention import Gate, wilson_lower
from backend.attributes.project_model import Clusterings, fit_project
from backend.labeling_config import parse

from tests.backend.helpers import TWO_ATTRIBUTES


def test_wilson_lower_bound_by_hand():
    # p = 0.9, n = 10, z = 1.645: (0.9 + 0.1353 - 1.645 * sqrt(0.009 + 0.00676)) / 1.2706
    expected = (0.9 + 1.645 ** 2 / 20 - 1.645 * np.sqrt(0.09 / 10 + 1.645 ** 2 / 400)) / (1 + 1.645 ** 2 / 10)
    assert wilson_lower(9, 10) == pytest.approx(expected)
    assert wilson_lower(0, 0) == 0.0 and wilson_lower(5, 5) < 1.0


def test_nine_right_of_nine_does_not_beat_a_two_thirds_majority():
    """9 held-out answers, all right, on labels 6:3: the lower bound (0.77) clears 0.67, but a
    baseline near it is not beaten by luck: 9/9 against a 0.8 majority stays closed."""
    y = np.array(["no"] * 6 + ["yes"] * 3, dtype=object)
    gate = Gate.fit(y, y, np.full(9, 0.9))
    assert gate.open and gate.lower_bound == pytest.approx(wilson_lower(9, 9))
    y = np.array(["no"] * 8 + ["yes"] * 2, dtype=object)
    closed = Gate.fit(y[:9], y[:9], np.full(9, 0.9))
    assert not closed.open and not closed.show([0.99]).any()


def test_threshold_shows_the_sure_faces_only():
    """Held out: confident answers right, unsure ones a coin toss: only the confident are shown."""
    rng = np.random.default_rng(0)
    y = np.array(["a", "b"] * 40, dtype=object)
    conf = np.r_[np.full(40, 0.95), np.full(40, 0.55)]
    pred = y.copy()
    flip = 40 + rng.choice(40, 20, replace=False)
    pred[flip] = np.where(y[flip] == "a", "b", "a")
    gate = Gate.fit(y, pred, conf)
    assert gate.open and gate.shown_accuracy == 1.0 and gate.coverage == 0.5
    assert list(gate.show([0.95, 0.55])) == [True, False]
    assert gate.calibrated([0.95])[0] == pytest.approx(1.0)
    assert gate.calibrated([0.55])[0] == pytest.approx(0.5)


def test_an_attribute_without_signal_is_not_pre_annotated_and_one_with_signal_is():
    """Two groups (gender follows them); glasses drawn at random: the same number of confirmations,
    gender is shown on every face, glasses on none."""
    rng = np.random.default_rng(1)
    n = 120
    centres = rng.normal(0, 1, (2, 128)) * 0.3
    group = np.arange(n) % 2
    X = centres[group] + rng.normal(0, 0.03, (n, 128))
    gender = np.where(group == 0, "male", "female").astype(object)
    glasses = rng.choice(np.array(["yes", "no"], dtype=object), n)
    confirmed = np.zeros(n, bool)
    confirmed[:40] = True
    labels = {"gender": np.where(confirmed, gender, None), "glasses": np.where(confirmed, glasses, None)}
    model = fit_project({"vector": X}, labels, parse(TWO_ATTRIBUTES), Clusterings(n_faces=n),
                        keys=[f"{i}:0" for i in range(n)])
    assert model.info["gender"]["status"] == "shown"
    assert model.info["glasses"]["status"] == "silent"
    assert model.info["glasses"]["selection"]["scores"]["accuracy"] is not None
    faces = model.predict({"vector": X[40:]})
    assert [f.values["gender"][0] for f in faces] == list(gender[40:])
    assert all(f.values["glasses"][0] is None for f in faces)
    assert model.info["gender"]["coverage"] == 1.0 and model.info["glasses"]["coverage"] == 0.0

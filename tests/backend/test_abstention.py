"""Honest pre-annotation: the gate on held-out predictions, and the whole attribute path on faces
whose clusters carry a signal for one attribute and none for another."""
import numpy as np
import pytest

from backend.attributes.abstention import MIN_SHOWN, Z_THIN, Gate, wilson_lower
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
    gate = Gate.fit(y, y, np.full(9, 0.9), min_shown=9)
    assert gate.open and gate.lower_bound == pytest.approx(wilson_lower(9, 9))
    y = np.array(["no"] * 8 + ["yes"] * 2, dtype=object)
    closed = Gate.fit(y[:9], y[:9], np.full(9, 0.9), min_shown=9)
    assert not closed.open and not closed.show([0.99]).any()


def test_a_threshold_needs_min_shown_held_out_faces():
    """All right on balanced labels, a bound far above the majority: 11 faces are still too few to
    open on (MIN_SHOWN = 12), 12 are enough."""
    assert MIN_SHOWN == 12
    for m, opens in ((11, False), (12, True)):
        y = np.array(["no", "yes"] * 6, dtype=object)[:m]
        gate = Gate.fit(y, y, np.full(m, 0.9))
        assert wilson_lower(m, m) > 0.75 and gate.open is opens


def test_twelve_faces_weighted_to_fewer_effective_ones_face_the_wider_bound():
    """Twelve faces 7 "no" / 5 "yes", their estimated shares a hair off (58.32 % against 58.33 %):
    11.9999 effective faces, so the bound is Z_THIN's. All 12 right against that 58 % majority
    clears it (0.76) and opens, as 12 effective faces would; 10 of 12 right against 59 %, the
    replayed glasses gate that was shown below its majority, clears the 95 % bound (0.60) but not
    the wider one (0.55), and stays shut. Eleven faces never open (MIN_SHOWN)."""
    y = np.array(["no"] * 7 + ["yes"] * 5, dtype=object)
    exact = Gate.fit(y, y, np.full(12, 0.9), prevalence={"no": 7 / 12, "yes": 5 / 12})
    off = Gate.fit(y, y, np.full(12, 0.9), prevalence={"no": 0.5832, "yes": 0.4168})
    assert exact.open and exact.lower_bound == pytest.approx(wilson_lower(12, 12))
    assert off.open and off.lower_bound == pytest.approx(wilson_lower(12, 12, Z_THIN), abs=1e-4)
    pred = y.copy()
    pred[[0, 7]] = np.array(["yes", "no"], dtype=object)            # 10 of 12 right
    shares = {"no": 0.591, "yes": 0.409}
    assert wilson_lower(10, 12) > 0.591 > wilson_lower(10, 12, Z_THIN)
    assert not Gate.fit(y, pred, np.full(12, 0.9), prevalence=shares).open
    assert Gate.fit(y, pred, np.full(12, 0.9), prevalence={"no": 7 / 12, "yes": 5 / 12}).open
    assert not Gate.fit(y[1:], y[1:], np.full(11, 0.9), prevalence=shares).open


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


def test_the_cut_lies_midway_between_held_out_faces_and_not_below_the_least_sure():
    """Held out: sure answers (0.9) right, unsure ones (0.6) a coin toss. The calibration curve,
    interpolated, would show only faces at 0.9 or above; the cut is midway, 0.75. When every
    held-out face is shown (all right, 0.7 to 0.9), a face less sure than 0.7 is not."""
    y = np.array(["a", "b"] * 40, dtype=object)
    conf = np.r_[np.full(40, 0.9), np.full(40, 0.6)]
    pred = y.copy()
    pred[40::2] = "b"                      # 20 of the 40 unsure ones wrong
    gate = Gate.fit(y, pred, conf)
    assert gate.open and gate.cut == pytest.approx(0.75)
    assert gate.calibrated([0.8])[0] < gate.threshold       # the curve alone would hide 0.8
    assert list(gate.show([0.95, 0.8, 0.76, 0.74, 0.6])) == [True, True, True, False, False]
    everywhere = Gate.fit(y, y, np.linspace(0.7, 0.9, 80))
    assert everywhere.open and everywhere.coverage == 1.0 and everywhere.cut == pytest.approx(0.7)
    assert list(everywhere.show([0.69, 0.7, 0.99])) == [False, True, True]
    # The cut follows from what a gate stores: one read back shows the same faces.
    stored = Gate.from_dict(gate.to_dict() | {"cut": 0.9})     # a key it no longer has: ignored
    assert stored.cut == gate.cut and list(stored.show([0.8, 0.74])) == [True, False]
    closed = Gate.fit(y[:9], y[:9], np.full(9, 0.9))
    assert not closed.open and closed.cut is None and not closed.show([0.99]).any()


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


def test_balanced_confirmations_are_judged_against_the_faces_majority():
    """A teaching order confirmed 5 "no" and 3 "yes" (62.5 % majority) of faces that are 71 % "no";
    the weak model got 6 of the 8 right, the 6 it is surest of: 6/6 clears 62.5 % (lower bound
    0.69) but not the faces' 71 %. Judged against the faces (their estimated prevalence), with the
    held-out faces weighted by how common their value is among them, the gate stays shut. (The
    case was met with a gate that needed 6 shown faces; the default now needs 8.)"""
    y = np.array(["no"] * 5 + ["yes"] * 3, dtype=object)
    pred = np.array(["no"] * 4 + ["yes"] + ["yes"] * 2 + ["no"], dtype=object)
    conf = np.array([0.9] * 4 + [0.6] + [0.9] * 2 + [0.6])
    assert Gate.fit(y, pred, conf, min_shown=6).open   # the confirmations' majority alone: opens
    assert not Gate.fit(y, pred, conf).open            # 6 shown faces are too few by default
    shut = Gate.fit(y, pred, conf, prevalence={"no": 0.71, "yes": 0.29}, min_shown=6)
    assert not shut.open and shut.majority == pytest.approx(0.71) and not shut.show([0.9]).any()
    # A model that earns it still opens: 18 right of 18 against the same faces.
    y2 = np.array(["no"] * 10 + ["yes"] * 8, dtype=object)
    good = Gate.fit(y2, y2, np.full(18, 0.9), prevalence={"no": 0.71, "yes": 0.29})
    assert good.open and good.show([0.9]).all()


def test_population_prevalence_post_stratifies_the_confirmations():
    """Two clusters of 60 and 20 faces, 4 confirmations in each: the faces' shares follow the
    clusters' sizes, not the confirmations' (balanced) counts; the model's guess fills a cluster
    without confirmations; faces of clusters whose labelled tasks never carry the attribute (photos
    without it) do not count."""
    from backend.attributes.abstention import population_prevalence

    strata = np.array([0] * 60 + [1] * 20 + [2] * 20)
    confirmed = np.full(100, None, dtype=object)
    confirmed[[0, 1, 2, 3]] = "no"
    confirmed[[60, 61, 62, 63]] = "yes"
    labelled = confirmed != None  # noqa: E711
    labelled[80:84] = True          # cluster 2: labelled tasks, none with this attribute
    predicted = np.array(["no"] * 100, dtype=object)
    p = population_prevalence(["no", "yes"], confirmed, predicted, strata, labelled)
    assert p["no"] == pytest.approx(0.75) and p["yes"] == pytest.approx(0.25)
    # Without confirmations in cluster 1, its faces count by the model's guess ("no").
    confirmed[[60, 61, 62, 63]] = None
    confirmed[[4, 5]] = "yes"
    labelled = confirmed != None  # noqa: E711
    p = population_prevalence(["no", "yes"], confirmed, predicted, strata, labelled)
    assert p["yes"] == pytest.approx(2 / 6 * 60 / 100)

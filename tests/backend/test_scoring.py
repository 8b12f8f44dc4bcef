"""Naming (Hungarian and majority), scores computed by hand, and the planted hierarchy recovered."""
from __future__ import annotations

import numpy as np
import pytest

from backend.attributes.clustering import make_clusterer
from backend.attributes.scoring import (apply_names, follows, hierarchy, name_clusters, purity, score,
                             summarise)
from backend.attributes.study import planted_hierarchy

A = np.array


def test_hungarian_is_one_to_one_where_majority_would_not_be():
    # Both clusters hold more "a" than "b": majority would name both "a"; one-to-one gives the
    # assignment with most agreeing rows: cluster 0 = a (3 rows), cluster 1 = b (2 rows).
    ids = A([0, 0, 0, 0, 1, 1, 1, 1, 1])
    labels = A(["a", "a", "a", "b", "a", "a", "a", "b", "b"], object)
    assert name_clusters(ids, labels, 2) == {0: "a", 1: "b"}
    # ... and the total agreement beats the swapped naming: 3 + 2 > 1 + 3.


def test_hungarian_ignores_unlabelled_rows():
    ids = A([0, 0, 0, 1, 1, 1, 1])
    labels = A(["b", None, "", "a", None, None, "b"], object)
    assert name_clusters(ids, labels, 2) == {0: "b", 1: "a"}


def test_majority_naming_when_more_clusters_than_values():
    ids = A([0, 0, 1, 1, 2, 2, 3, 3])
    labels = A(["m", "m", "f", "m", "f", "f", None, None], object)
    names = name_clusters(ids, labels, 4)
    assert names[0] == "m" and names[2] == "f"
    assert names[1] == "f"          # a 1-1 tie goes to the value rarer overall (f: 3, m: 3 -> alphabetical)
    assert names[3] is None         # no labelled member, no centres: unnamed
    centres = A([[0.0, 0], [1, 0], [10, 0], [9, 1]])
    assert name_clusters(ids, labels, 4, centers=centres)[3] == "f"   # nearest named centre: 2


def test_majority_tie_prefers_the_rarer_value():
    ids = A([0, 0, 1, 1, 1, 1])
    labels = A(["x", "y", "x", "x", "x", "y"], object)   # x: 4 overall, y: 2
    assert name_clusters(ids, labels, 3)[0] == "y"


def test_score_by_hand():
    y_true = A(["a", "a", "a", "b", "b", None, ""], object)
    y_pred = A(["a", "b", "a", "b", None, "a", "b"], object)
    s = score(y_true, y_pred)
    assert s.n == 5
    assert s.values == ["a", "b"]
    assert s.accuracy == pytest.approx(3 / 5)
    assert s.per_value == pytest.approx({"a": 2 / 3, "b": 1 / 2})
    assert s.balanced_accuracy == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert s.confusion.tolist() == [[2, 1], [0, 1]]
    assert s.unassigned == [0, 1]   # the None prediction for a "b"
    assert s.majority_baseline == pytest.approx(3 / 5)


def test_score_keeps_the_given_value_order_and_rejects_unknown_labels():
    s = score(A(["y", "x", "x"], object), A(["y", "y", "x"], object), values=["y", "x"])
    assert s.confusion.tolist() == [[1, 0], [1, 1]]
    with pytest.raises(ValueError, match="not among values"):
        score(A(["z"], object), A(["z"], object), values=["x", "y"])


def test_summarise_mean_and_spread():
    runs = [score(A(["a", "a", "b", "b"], object), A(p, object))
            for p in (["a", "a", "b", "b"], ["a", "b", "b", "b"])]
    s = summarise(runs)
    assert s.runs == 2
    assert s.accuracy == pytest.approx(0.875)
    assert s.accuracy_std == pytest.approx(0.125)
    assert (s.accuracy_min, s.accuracy_max) == (0.75, 1.0)
    assert s.per_value == pytest.approx({"a": 0.75, "b": 1.0})
    assert s.per_value_std == pytest.approx({"a": 0.25, "b": 0.0})
    assert s.majority_baseline == 0.5


def test_named_clusters_of_the_planted_skin_split_score_perfectly():
    X, labels = planted_hierarchy(n_per_group=10, seed=2)
    from backend.attributes.clustering import KMeansClusterer

    ids = KMeansClusterer(2, random_state=0).fit_predict(X)
    names = name_clusters(ids, labels["skin"], 2)
    assert sorted(names.values()) == ["dark", "pale"]
    s = score(labels["skin"], apply_names(ids, names))
    assert s.accuracy == 1.0 and s.confusion.tolist() == [[40, 0], [0, 40]]
    # The same two clusters say nothing of gender: exactly half right on the balanced set.
    g = score(labels["gender"], apply_names(ids, name_clusters(ids, labels["gender"], 2)))
    assert g.accuracy == 0.5 and g.majority_baseline == 0.5


def test_hierarchy_recovers_skin_then_gender_then_age():
    X, labels = planted_hierarchy(n_per_group=15, seed=3)
    levels = hierarchy({k: make_clusterer("kmeans", k, random_state=0).fit_predict(X) for k in (2, 4, 8)},
                       labels)
    assert [lv.follows for lv in levels] == [
        ("skin",), ("skin", "gender"), ("skin", "gender", "age_group")]
    assert all(lv.follows_ami == pytest.approx(1.0) for lv in levels)
    two, four, eight = levels
    assert two.ami["skin"] == pytest.approx(1.0) and abs(two.ami["gender"]) < 0.05
    assert two.purity == pytest.approx({"skin": 1.0, "gender": 0.5, "age_group": 0.5})
    assert four.purity["gender"] == 1.0 and four.purity["age_group"] == 0.5
    assert eight.purity == pytest.approx({"skin": 1.0, "gender": 1.0, "age_group": 1.0})
    # Every k=8 cluster is pure in all three attributes.
    assert all(c[a]["share"] == 1.0 for c in eight.clusters for a in labels)
    assert sum(c["size"] for c in eight.clusters) == len(X)


def test_follows_prefers_the_simpler_combination_on_a_tie():
    ids = A([0, 0, 1, 1])
    labels = {"a": A(["x", "x", "y", "y"], object), "b": A(["p", "p", "p", "p"], object)}
    combo, ami, combos = follows(ids, labels)
    assert combo == ("a",) and ami == pytest.approx(1.0)
    assert combos["a x b"] == pytest.approx(1.0)


def test_purity_by_hand():
    assert purity(A([0, 0, 0, 1, 1]), A(["a", "a", "b", "b", None], object)) == pytest.approx(3 / 4)

"""Each candidate learner and the nested choice among them, on planted structure and on real faces.

Planted: one informative dimension among noise (a supervised learner must find it), or two tight
groups (clusters and label spreading name them from a handful of labels). Real: the 68-landmark
views of skimage's astronaut, mirrored, which must give the same geometry.
"""
import numpy as np
import pytest

from backend.attributes.candidates import (ClusterLearner, LogisticLearner, MeanLearner, PriorLearner,
                                           SpreadLearner, learner_from_state, supervised_candidates)
from backend.attributes.clustering import make_clusterer
from backend.attributes.selection import choose


def planted(n=200, d=20, seed=0, shift=3.0):
    """y depends on dimension 3 only; the other dimensions are noise of the same spread."""
    rng = np.random.default_rng(seed)
    y = np.array(["a", "b"] * (n // 2), dtype=object)
    X = rng.normal(0, 1, (n, d))
    X[:, 3] += np.where(y == "a", -shift / 2, shift / 2)
    return X, y


def groups(n=60, d=16, seed=1):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (2, d)) * 3
    y = np.array(["x"] * (n // 2) + ["z"] * (n // 2), dtype=object)
    X = np.concatenate([centres[0] + rng.normal(0, 0.3, (n // 2, d)),
                        centres[1] + rng.normal(0, 0.3, (n // 2, d))])
    return X, y


@pytest.mark.parametrize("cls, d", [(MeanLearner, 5), (LogisticLearner, 20), (SpreadLearner, 4)])
def test_supervised_learners_find_the_planted_dimension(cls, d):
    """Among d - 1 noise dimensions: logistic regression weighs them, the others only average
    them out (nearest mean) or need them few (neighbours), hence fewer for those."""
    X, y = planted(d=d)
    train = np.arange(0, 200, 5)            # 40 labels
    test = np.setdiff1d(np.arange(200), train)
    learner = cls("v").fit(X, train, y[train], ["a", "b"])
    P = learner.predict_proba(X[test])
    assert P.shape == (len(test), 2) and np.allclose(P.sum(1), 1)
    acc = np.mean(learner.predict(X[test]) == y[test])
    assert acc > 0.8, acc
    # Labels drawn independently of the faces carry nothing: near chance on the others' labels.
    z = np.array(["a", "b"], dtype=object)[np.random.default_rng(5).permutation(np.arange(200) % 2)]
    noise = cls("v").fit(X, train, z[train], ["a", "b"])
    assert np.mean(noise.predict(X[test]) == z[test]) < 0.65


@pytest.mark.parametrize("cls", [MeanLearner, LogisticLearner, SpreadLearner])
def test_learners_round_trip_their_state(cls):
    X, y = planted(seed=2)
    rows = np.arange(0, 200, 5)
    learner = cls("eyes").fit(X, rows, y[rows], ["a", "b"])
    params, arrays = learner.get_state()
    back = learner_from_state(params, arrays)
    assert back.view == "eyes" and back.values == ["a", "b"]
    np.testing.assert_allclose(back.predict_proba(X[:30]), learner.predict_proba(X[:30]), atol=1e-6)


def test_label_spreading_follows_the_groups_from_two_labels_each():
    X, y = groups()
    rows = np.array([0, 1, 30, 31])
    learner = SpreadLearner("v", n_neighbors=5).fit(X, rows, y[rows], ["x", "z"])
    assert np.mean(learner.predict(X) == y) == 1.0


def test_named_clusters_and_the_prior():
    X, y = groups(seed=4)
    km = make_clusterer("kmeans", 2, random_state=0).fit(X)
    rows = np.array([0, 30])
    clusters = ClusterLearner("vector", km, "kmeans:2").fit(X, rows, y[rows], ["x", "z"])
    assert np.mean(clusters.predict(X) == y) == 1.0
    back = learner_from_state(*clusters.get_state())
    assert list(back.predict(X)) == list(clusters.predict(X))
    # The prior keeps the names it came with, whatever the labels say.
    prior = PriorLearner("vector", km, "prior", dict(clusters.names)).fit(X, rows, y[rows][::-1], ["x", "z"])
    assert list(prior.predict(X)) == list(clusters.predict(X))


def test_choose_picks_the_informative_view_and_its_nested_score_is_honest():
    X, y = planted(n=120, d=10, seed=3, shift=4.0)
    rng = np.random.default_rng(9)
    views = {"vector": rng.normal(0, 1, (120, 10)), "eyes": X}   # the vector holds nothing here
    rows = np.arange(0, 120, 3)   # 40 labels, both values
    choice, learner = choose(supervised_candidates(["vector", "eyes"]), views, rows, y[rows])
    assert learner.view == "eyes" and choice.chosen.endswith(":eyes")
    assert choice.held_out.shape == (40, 2)
    assert choice.scores().accuracy > 0.85
    assert max(v for k, v in choice.cv.items() if k.endswith(":vector")) < 0.75


def test_choose_refuses_a_single_value():
    X, y = planted()
    with pytest.raises(ValueError):
        choose(supervised_candidates(["v"]), {"v": X}, np.arange(10), np.array(["a"] * 10, dtype=object))

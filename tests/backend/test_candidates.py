"""Each candidate learner and the nested choice among them, on planted structure and on real faces.

Planted: one informative dimension among noise (a supervised learner must find it), or two tight
groups (clusters and label spreading name them from a handful of labels). Real: the 68-landmark
views of skimage's astronaut, mirrored, which must give the same geometry.
"""
import numpy as np
import pytest

from backend.attributes.candidates import (ClusterLearner, CommitteeLearner, LogisticLearner,
                                           MeanLearner, PriorLearner, SpreadLearner,
                                           learner_from_state, supervised_candidates)
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
    # The committee is the three best by cross-validation: the three learners on the eyes.
    assert isinstance(learner, CommitteeLearner) and learner.needs == ["eyes"]
    assert choice.chosen == learner.key and len(learner.members) == 3
    assert all(m.view == "eyes" for m in learner.members)
    assert choice.held_out.shape == (40, 2)
    assert choice.scores().accuracy > 0.85
    assert max(v for k, v in choice.cv.items() if k.endswith(":vector")) < 0.75


def test_a_committee_averages_its_members_over_their_own_views_and_round_trips():
    X, y = planted(n=120, d=10, seed=6, shift=4.0)
    views = {"eyes": X, "vector": X[:, ::-1] + 0.1}
    rows = np.arange(0, 120, 3)    # 40 labels, both values
    members = [MeanLearner("eyes").fit(X, rows, y[rows], ["a", "b"]),
               LogisticLearner("vector").fit(views["vector"], rows, y[rows], ["a", "b"])]
    committee = CommitteeLearner(members)
    assert committee.needs == ["eyes", "vector"] and committee.values == ["a", "b"]
    expected = (members[0].predict_proba(X) + members[1].predict_proba(views["vector"])) / 2
    np.testing.assert_allclose(committee.proba_from(views), expected)
    with pytest.raises(TypeError):
        committee.predict_proba(X)       # one matrix cannot serve two views
    back = learner_from_state(*committee.get_state())
    assert isinstance(back, CommitteeLearner) and back.key == committee.key
    np.testing.assert_allclose(back.proba_from(views), committee.proba_from(views), atol=1e-6)
    assert list(back.predict_from(views)) == list(committee.predict_from(views))


def test_the_gate_calibrates_on_the_committees_own_held_out_confidences():
    """choice.own: the chosen members' outer-fold probabilities, averaged (the scale the fitted
    committee gives faces); choice.held_out: the nested procedure's, which may pick others."""
    from backend.attributes.selection import _fold_proba, splits

    X, y = planted(n=120, d=10, seed=3, shift=2.0)
    views = {"vector": np.random.default_rng(9).normal(0, 1, (120, 10)), "eyes": X}
    rows = np.arange(0, 120, 3)
    factories = supervised_candidates(["vector", "eyes"])
    choice, learner = choose(factories, views, rows, y[rows])
    by_key = {f().key: f for f in factories}
    folds = splits(y[rows], 0)
    own = np.mean([_fold_proba(by_key[m.key], views[m.view], rows, y[rows], ["a", "b"], folds)
                   for m in learner.members], axis=0)
    np.testing.assert_allclose(choice.own, own)
    np.testing.assert_allclose(choice.own_conf, own.max(1))
    assert choice.held_out.shape == own.shape


def test_choose_with_a_committee_of_one_is_the_best_learner_alone():
    X, y = planted(n=120, d=10, seed=3, shift=4.0)
    views = {"vector": np.random.default_rng(9).normal(0, 1, (120, 10)), "eyes": X}
    rows = np.arange(0, 120, 3)
    choice, learner = choose(supervised_candidates(["vector", "eyes"]), views, rows, y[rows],
                             committee=1)
    assert not isinstance(learner, CommitteeLearner) and learner.view == "eyes"
    assert choice.chosen == learner.key == max(choice.cv, key=choice.cv.get)


def test_choose_refuses_a_single_value():
    X, y = planted()
    with pytest.raises(ValueError):
        choose(supervised_candidates(["v"]), {"v": X}, np.arange(10), np.array(["a"] * 10, dtype=object))

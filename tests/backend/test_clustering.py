"""Clusterers on vectors with a known structure: exact recovery, soft assignments, saved state."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from backend.attributes.clustering import (CLUSTERERS, AgglomerativeClusterer, ChineseWhispers,
                                GaussianMixtureClusterer, KMeansClusterer, Preprocessor,
                                clusterer_from_state, make_clusterer)
from backend.attributes.study import planted_hierarchy


@pytest.fixture(scope="module")
def planted():
    return planted_hierarchy(n_per_group=15, seed=1)


@pytest.mark.parametrize("algo", ["kmeans", "gmm", "agglomerative"])
def test_two_clusters_follow_the_biggest_split(planted, algo):
    X, labels = planted
    ids = make_clusterer(algo, 2, random_state=0).fit_predict(X)
    assert adjusted_rand_score(labels["skin"], ids) == 1.0
    assert adjusted_rand_score(labels["gender"], ids) == pytest.approx(0, abs=0.02)


def test_kmeans_four_clusters_are_skin_by_gender(planted):
    X, labels = planted
    joint = [f"{s}|{g}" for s, g in zip(labels["skin"], labels["gender"])]
    ids = KMeansClusterer(4, random_state=0).fit_predict(X)
    assert adjusted_rand_score(joint, ids) == 1.0


@pytest.mark.parametrize("parent_k,attribute", [(1, "skin"), (2, "gender"), (4, "age_group")])
def test_residual_split_follows_the_next_level_of_the_hierarchy(planted, parent_k, attribute):
    X, labels = planted
    c = make_clusterer("residual", 2, random_state=0, parent_k=parent_k).fit(X)
    assert adjusted_rand_score(labels[attribute], c.predict(X)) == 1.0
    assert np.array_equal(c.predict(X), c.labels_)


def test_kmeans_soft_assignment_by_hand():
    # Centres 1 and 11; every point lies at squared distance 1 from its centre: s^2 = 1 / d = 1.
    X = np.array([[0.0], [2.0], [10.0], [12.0]])
    km = KMeansClusterer(2, random_state=0).fit(X)
    order = np.argsort(km.cluster_centers_[:, 0])
    assert km.cluster_centers_[order, 0] == pytest.approx([1.0, 11.0])
    assert float(km.variance_) == pytest.approx(1.0)
    p = km.predict_proba(np.array([[6.0], [0.0]]))[:, order]
    assert p[0] == pytest.approx([0.5, 0.5])           # equidistant
    # softmax(-[1, 121] / 2): the far centre gets e^-60 of the weight.
    assert p[1, 1] == pytest.approx(np.exp(-60) / (1 + np.exp(-60)), rel=1e-6)


@pytest.mark.parametrize("algo", ["kmeans", "gmm", "agglomerative", "cw"])
def test_predict_proba_is_a_distribution_agreeing_with_predict(planted, algo):
    X, _ = planted
    c = make_clusterer(algo, 4, random_state=0).fit(X)
    p = c.predict_proba(X)
    assert p.shape == (len(X), c.n_clusters)
    assert np.all((p >= 0) & (p <= 1))
    assert p.sum(axis=1) == pytest.approx(np.ones(len(X)))
    ids = c.predict(X)
    assert np.array_equal(p.argmax(axis=1)[ids >= 0], ids[ids >= 0])


def test_gmm_posteriors_match_scikit_learn(planted):
    from sklearn.mixture import GaussianMixture

    X, _ = planted
    ours = GaussianMixtureClusterer(4, random_state=3).fit(X)
    theirs = GaussianMixture(4, covariance_type="diag", init_params="kmeans", random_state=3,
                             max_iter=200).fit(X.astype(np.float64))
    np.testing.assert_allclose(ours.predict_proba(X), theirs.predict_proba(X), atol=1e-8)
    assert np.array_equal(ours.predict(X), theirs.predict(X))


@pytest.mark.parametrize("cov", ["spherical", "full"])
def test_gmm_other_covariances_match_scikit_learn(planted, cov):
    from sklearn.mixture import GaussianMixture

    X, _ = planted
    X = X[:, :6] * 10  # full covariances want fewer dimensions than rows
    ours = GaussianMixtureClusterer(2, covariance_type=cov, random_state=0).fit(X)
    theirs = GaussianMixture(2, covariance_type=cov, random_state=0, max_iter=200).fit(X.astype(np.float64))
    np.testing.assert_allclose(ours.predict_proba(X), theirs.predict_proba(X), atol=1e-8)


def test_random_state_makes_kmeans_repeatable(planted):
    X, _ = planted
    a = KMeansClusterer(8, random_state=5).fit(X).cluster_centers_
    b = KMeansClusterer(8, random_state=5).fit(X).cluster_centers_
    assert np.array_equal(a, b)


def identities(n_people=5, per_person=6, seed=0):
    """People 1.0 apart (dlib's scale), faces within 0.1 of their person's centre."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_people, 128))
    # Norm 1/sqrt(2): two random (near-orthogonal) people are ~1.0 apart.
    centres /= np.linalg.norm(centres, axis=1, keepdims=True) * np.sqrt(2)
    who = np.repeat(np.arange(n_people), per_person)
    X = centres[who] + rng.normal(scale=0.1 / np.sqrt(128), size=(len(who), 128))
    return X, who, centres


def test_chinese_whispers_finds_the_people():
    X, who, centres = identities()
    cw = ChineseWhispers().fit(X)
    assert cw.n_clusters == 5
    assert adjusted_rand_score(who, cw.labels_) == 1.0
    # A new photo of person 2 joins person 2's cluster; a stranger joins none.
    ids = cw.predict(np.vstack([centres[2] + 0.01, -centres[2]]))
    assert ids[0] == cw.labels_[who == 2][0]
    assert ids[1] == -1


def test_preprocessing():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 5)) @ rng.normal(size=(5, 5)) + 3
    Z = Preprocessor("whiten").fit(X).transform(X)
    np.testing.assert_allclose(np.cov(Z, rowvar=False), np.eye(5), atol=1e-9)
    Z = Preprocessor("l2").fit(X).transform(X)
    np.testing.assert_allclose(np.linalg.norm(Z, axis=1), 1.0)
    Z = Preprocessor("center-l2").fit(X).transform(X)
    np.testing.assert_allclose(np.linalg.norm(Z, axis=1), 1.0)
    with pytest.raises(ValueError, match="preprocess"):
        Preprocessor("pca")


def test_cosine_kmeans_ignores_vector_length(planted):
    X, labels = planted
    scaled = X * np.random.default_rng(0).uniform(0.5, 3, size=(len(X), 1))
    ids = KMeansClusterer(2, random_state=0, preprocess="l2").fit_predict(scaled)
    plain = KMeansClusterer(2, random_state=0, preprocess="l2").fit_predict(X)
    assert adjusted_rand_score(ids, plain) == 1.0


@pytest.mark.parametrize("algo", sorted(CLUSTERERS))
@pytest.mark.parametrize("preprocess", ["none", "whiten"])
def test_state_round_trip_predicts_identically(planted, algo, preprocess):
    X, _ = planted
    c = make_clusterer(algo, 4, random_state=0, preprocess=preprocess).fit(X)
    params, arrays = c.get_state()
    copy = clusterer_from_state(algo, params, {k: np.array(v) for k, v in arrays.items()})
    assert type(copy) is type(c) and copy.n_clusters == c.n_clusters
    assert np.array_equal(copy.predict(X), c.predict(X))
    assert np.array_equal(copy.predict_proba(X), c.predict_proba(X))


def test_factory_and_registry():
    assert isinstance(make_clusterer("kmeans", 3), KMeansClusterer)
    assert make_clusterer("kmeans", 3).n_clusters == 3
    assert isinstance(make_clusterer("agglomerative", 2), AgglomerativeClusterer)
    assert isinstance(make_clusterer("cw", 7), ChineseWhispers)
    with pytest.raises(ValueError, match="unknown clustering algorithm 'spectral'"):
        make_clusterer("spectral", 2)
    with pytest.raises(ValueError, match="shape"):
        KMeansClusterer(2).fit(np.zeros(10))


@pytest.mark.parametrize("algo", sorted(CLUSTERERS))
def test_a_face_s_distance_to_its_centre_is_taken_where_the_clusterer_works(planted, algo):
    """centrality (which faces to label first) reads distances through transform(): for the
    residual split that is residual space, not the preprocessed input."""
    from backend.attributes.project_model import _assignments

    X, _ = planted
    c = make_clusterer(algo, 4, random_state=0).fit(X)
    D = c.transform(X)
    assert D.shape == (len(X), c.n_clusters) and np.all(D >= 0)
    ids, d = _assignments(c, X)
    assert np.array_equal(ids, c.predict(X))
    assert np.allclose(d, D[np.arange(len(X)), ids])
    if algo != "gmm":   # a mixture assigns by likelihood, not by the nearest mean
        assert np.array_equal(D.argmin(axis=1), ids)

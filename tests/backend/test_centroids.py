"""The saved centroid model: best-run fitting, names with scores, exact save/load round trips."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest

from backend.attributes.centroids import (CentroidModel, ModelFormatError, fit_attribute)
from backend.attributes.clustering import make_clusterer
from backend.attributes.scoring import apply_names, name_clusters, score
from backend.attributes.study import planted_hierarchy


@pytest.fixture(scope="module")
def planted():
    X, labels = planted_hierarchy(n_per_group=12, seed=4, noise=0.05)
    return X, labels


def test_fit_attribute_keeps_the_run_with_the_best_training_accuracy(planted):
    X, labels = planted
    # Age is the weakest, noisiest split: runs disagree, so the choice among runs matters.
    y = labels["age_group"]
    accuracies = []
    for run in range(4):
        c = make_clusterer("kmeans", 8, random_state=run).fit(X)
        ids = c.predict(X)
        accuracies.append(score(y, apply_names(ids, name_clusters(ids, y, 8, c.cluster_centers_))).accuracy)
    assert max(accuracies) > max(accuracies[0], accuracies[-1])   # neither first nor last wins
    model = fit_attribute(X, y, "age_group", "kmeans", k=8, runs=4, seed=0)
    assert model.train_scores.accuracy == max(accuracies)
    assert model.k == 8 and model.values == ["old", "young"]
    assert set(model.names.values()) <= {"old", "young"}


def test_unlabelled_rows_shape_clusters_but_not_names(planted):
    X, labels = planted
    y = labels["skin"].copy()
    y[::2] = None
    model = fit_attribute(X, y, "skin", "kmeans", k=2, runs=1)
    assert model.train_scores.n == len(X) // 2
    names, _ = model.predict(X)
    assert score(labels["skin"], np.array(names, object)).accuracy == 1.0


def test_scores_are_the_total_probability_of_the_named_clusters(planted):
    X, labels = planted
    model = fit_attribute(X, labels["skin"], "skin", "kmeans", k=4, runs=1)  # 2 clusters per value
    names, scores = model.predict(X)
    proba = model.clusterer.predict_proba(X)
    for i in (0, len(X) - 1):
        carrying = [c for c, n in model.names.items() if n == names[i]]
        assert scores[i] == pytest.approx(proba[i, carrying].sum())
    assert np.all((scores >= 0) & (scores <= 1))
    assert model.value_proba(proba).sum(axis=1) == pytest.approx(np.ones(len(X)))


def test_unnamed_clusters_predict_none_with_score_zero(planted):
    X, labels = planted
    model = fit_attribute(X, labels["skin"], "skin", "kmeans", k=2, runs=1)
    c = model.clusterer.predict(X[:1])[0]
    model.names[int(c)] = None
    names, scores = model.predict(X[:1])
    assert names == [None] and scores[0] == 0.0


def fitted_model(X, labels, algo, preprocess="none"):
    attrs = {a: fit_attribute(X, y, a, algo, k, runs=2, preprocess=preprocess)
             for (a, y), k in zip(labels.items(), (2, 4, 8))}
    return CentroidModel(attrs, fingerprint="abc123", created="2024-01-02T03:04:05+00:00")


@pytest.mark.parametrize("algo,preprocess", [("kmeans", "none"), ("gmm", "none"),
                                             ("kmeans", "whiten"), ("agglomerative", "l2"),
                                             ("cw", "none")])
def test_save_load_round_trip_predicts_identically(planted, tmp_path, algo, preprocess):
    X, labels = planted
    model = fitted_model(X, labels, algo, preprocess)
    path = model.save(tmp_path / "models" / "m.npz")
    loaded = CentroidModel.load(path)
    assert (loaded.fingerprint, loaded.created, loaded.version) == ("abc123", model.created, 1)
    before, after = model.predict(X), loaded.predict(X)
    for a in labels:
        assert after[a][0] == before[a][0]
        assert np.array_equal(after[a][1], before[a][1])
        assert loaded.attributes[a].names == model.attributes[a].names
        assert loaded.attributes[a].k == model.attributes[a].k
        assert loaded.attributes[a].train_scores.accuracy == model.attributes[a].train_scores.accuracy
        assert np.array_equal(loaded.attributes[a].train_scores.confusion,
                              model.attributes[a].train_scores.confusion)
    # Bytes for Redis give the same model.
    again = CentroidModel.from_bytes(loaded.to_bytes())
    assert again.predict(X)["skin"][0] == before["skin"][0]


def test_model_file_is_small_and_pickle_free(planted, tmp_path):
    X, labels = planted
    path = fitted_model(X, labels, "gmm").save(tmp_path / "m.npz")
    assert path.stat().st_size < 60_000
    npz = np.load(path, allow_pickle=False)   # would raise if anything were pickled
    meta = json.loads(bytes(npz["__meta__"]).decode())
    assert meta["format"] == "subdisc-centroid-model" and meta["version"] == 1
    assert meta["attributes"]["gender"]["k"] == 4


def _rewrite_meta(data: bytes, **changes) -> bytes:
    npz = np.load(io.BytesIO(data), allow_pickle=False)
    arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(bytes(arrays["__meta__"]).decode()) | changes
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_refuses_unknown_versions_and_other_files(planted, tmp_path):
    X, labels = planted
    data = fitted_model(X, labels, "kmeans").to_bytes()
    with pytest.raises(ModelFormatError, match="version 2 is not supported"):
        CentroidModel.from_bytes(_rewrite_meta(data, version=2))
    with pytest.raises(ModelFormatError, match="not a subdisc centroid model"):
        CentroidModel.from_bytes(_rewrite_meta(data, format="something-else"))
    with pytest.raises(ModelFormatError, match="not a subdisc centroid model"):
        CentroidModel.from_bytes(b"hello")
    bad = tmp_path / "future.npz"
    bad.write_bytes(_rewrite_meta(data, version=99))
    with pytest.raises(ModelFormatError, match=r"future\.npz.*version 99"):
        CentroidModel.load(bad)
    with pytest.raises(ModelFormatError, match="cannot read"):
        CentroidModel.load(tmp_path / "absent.npz")

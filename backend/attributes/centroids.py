"""The saved model of the study's section 5: named clusters per attribute, applied to unseen faces.

    model = CentroidModel({"gender": fit_attribute(X, labels, "gender", "kmeans", k=2)}, fingerprint)
    model.save("model.npz");  model = CentroidModel.load("model.npz")
    names, scores = model.predict(X_new)["gender"]       # ["male", ...], (n,) in 0..1

The file is one .npz: the clusterers' arrays (centres, or mixture weights / means / covariances,
plus any preprocessing matrix) under "<attribute>/<array>", and a JSON header under "__meta__"
(format name, version, pipeline fingerprint, creation date, per attribute: algorithm, k, parameters,
cluster names). No pickles: a model file can be loaded from an untrusted place.
The Label Studio backend stores the same bytes in Redis (to_bytes / from_bytes).
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from backend.attributes.clustering import Clusterer, clusterer_from_state, make_clusterer
from backend.attributes.scoring import Scores, apply_names, is_labelled, label_values, name_clusters, score

FORMAT = "subdisc-centroid-model"
#: The file layout this code writes; files of other versions are refused with a clear error.
VERSION = 1
SUPPORTED_VERSIONS = (1,)


class ModelFormatError(ValueError):
    """The bytes are not a centroid model this version of subdisc can read."""


@dataclass
class AttributeModel:
    """Named clusters for one attribute.

    names: {cluster id: value or None}; values: the attribute's possible values (sorted).
    train_scores: how the naming scored on its training labels (None when unknown).
    """

    attribute: str
    algo: str
    k: int
    clusterer: Clusterer
    names: dict[int, str | None]
    values: list[str]
    train_scores: Scores | None = None

    def predict(self, X) -> tuple[list[str | None], np.ndarray]:
        """Names of X's (n, d) nearest cluster / most probable component, and their scores.

        score: total soft probability of the clusters carrying the predicted name (0 for None).
        """
        proba = self.clusterer.predict_proba(X)
        ids = self.clusterer.predict(X)
        names = apply_names(ids, self.names)
        per_value = self.value_proba(proba)
        scores = np.array([per_value[i, self.values.index(n)] if n is not None else 0.0
                           for i, n in enumerate(names)], float)
        return list(names), scores

    def value_proba(self, proba: np.ndarray) -> np.ndarray:
        """(n, k) cluster probabilities -> (n, len(values)) probabilities per value."""
        out = np.zeros((len(proba), len(self.values)))
        for c, name in self.names.items():
            if name is not None and c < proba.shape[1]:
                out[:, self.values.index(name)] += proba[:, c]
        return np.clip(out, 0.0, 1.0)  # sums of probabilities can round to just above 1


def fit_runs(X, algo: str = "kmeans", k: int = 2, runs: int = 5, seed: int = 0,
             preprocess: str | None = "none", **params) -> list[tuple[Clusterer, np.ndarray]]:
    """`runs` clusterings of X (n, d) with seeds seed..seed+runs-1, each with its (n,) cluster ids.

    They depend on X only, not on labels: one set serves every attribute."""
    out = []
    for run in range(runs):
        clusterer = make_clusterer(algo, k, random_state=seed + run, preprocess=preprocess,
                                   **params).fit(X)
        out.append((clusterer, clusterer.predict(X)))
    return out


def fit_attribute(X, labels, attribute: str, algo: str = "kmeans", k: int = 2, runs: int = 5,
                  seed: int = 0, preprocess: str | None = "none",
                  values: list[str] | None = None, fits=None, **params) -> AttributeModel:
    """Cluster X (n, d) `runs` times (seeds seed..seed+runs-1), name each clustering from the
    labelled rows of `labels` (n,), and keep the run with the best training accuracy (the study's
    choice of centroids). Unlabelled rows ("" / None) still shape the clusters.
    params: further clusterer arguments (e.g. parent_k=4 for algo="residual").
    fits: `fit_runs(X, algo, k, runs, seed, preprocess, **params)` made already (another attribute's)."""
    labels = np.asarray(labels, object)
    if not is_labelled(labels).any():
        raise ValueError(f"no labelled rows for {attribute!r}")
    values = values or label_values(labels)
    if fits is None:
        fits = fit_runs(X, algo, k, runs, seed, preprocess, **params)
    best = None
    for clusterer, ids in fits:
        names = name_clusters(ids, labels, clusterer.n_clusters,
                              centers=getattr(clusterer, "cluster_centers_", None), values=values)
        s = score(labels, apply_names(ids, names), values)
        if best is None or s.accuracy > best[2].accuracy:
            best = (clusterer, names, s)
    clusterer, names, s = best
    return AttributeModel(attribute, algo, clusterer.n_clusters, clusterer, names, values, s)


def candidates(algo: str, ks, n_values: int, levels=(1, 2, 4, 8)) -> list[tuple[str, int, dict]]:
    """(algo, k, params) to try for one attribute: each k of `ks`, or for algo="residual" one
    n_values-way split per level of the hierarchy (parent_k in `levels`)."""
    if algo == "residual":
        return [("residual", n_values, {"parent_k": p}) for p in levels]
    return [(algo, int(k), {}) for k in ks]


def select_attribute_model(X, labels, attribute: str, options: list[tuple[str, int, dict]],
                           runs: int = 5, seed: int = 0, preprocess: str | None = "none",
                           values: list[str] | None = None, fitted: dict | None = None) -> AttributeModel:
    """The best of several clusterings (algo, k, params) by training accuracy on the labelled rows
    (ties: the earlier option, so list the simpler ones first).

    fitted: a dict shared by calls on the same X (other attributes): each option is fitted once."""
    fitted = {} if fitted is None else fitted
    best = None
    for algo, k, params in options:
        key = (algo, k, tuple(sorted(params.items())), runs, seed, preprocess)
        if key not in fitted:
            fitted[key] = fit_runs(X, algo, k, runs, seed, preprocess, **params)
        m = fit_attribute(X, labels, attribute, algo, k, values=values, fits=fitted[key])
        if best is None or m.train_scores.accuracy > best.train_scores.accuracy:
            best = m
    return best


@dataclass
class CentroidModel:
    """Per attribute, named clusters; plus the pipeline fingerprint the vectors must come from."""

    attributes: dict[str, AttributeModel]
    fingerprint: str = ""
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    version: int = VERSION

    def predict(self, X) -> dict[str, tuple[list[str | None], np.ndarray]]:
        """{attribute: (names, scores)} for X (n, d); see AttributeModel.predict."""
        return {a: m.predict(X) for a, m in self.attributes.items()}

    # --- serialisation ----------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        arrays: dict[str, np.ndarray] = {}
        attrs = {}
        for a, m in self.attributes.items():
            params, state = m.clusterer.get_state()
            for name, arr in state.items():
                arrays[f"{a}/{name}"] = np.asarray(arr)
            attrs[a] = {
                "algo": m.algo, "k": int(m.k), "params": params, "values": list(m.values),
                # JSON keys are strings; cluster ids go back to int on load.
                "names": {str(c): n for c, n in m.names.items()},
                "train_scores": m.train_scores.to_dict() if m.train_scores is not None else None,
                "arrays": sorted(state),
            }
        meta = {"format": FORMAT, "version": self.version, "fingerprint": self.fingerprint,
                "created": self.created, "attributes": attrs}
        arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "CentroidModel":
        try:
            npz = np.load(io.BytesIO(data), allow_pickle=False)
            meta = json.loads(bytes(npz["__meta__"]).decode())
        except Exception as exc:  # not a zip, no header, bad JSON: all "not a model file"
            raise ModelFormatError(f"not a subdisc centroid model ({type(exc).__name__}: {exc})") from None
        if meta.get("format") != FORMAT:
            raise ModelFormatError(f"not a subdisc centroid model (format {meta.get('format')!r})")
        version = meta.get("version")
        if version not in SUPPORTED_VERSIONS:
            raise ModelFormatError(
                f"centroid model file version {version!r} is not supported by this subdisc "
                f"(it reads versions {list(SUPPORTED_VERSIONS)}); refit the model or upgrade subdisc")
        attributes = {}
        for a, info in meta["attributes"].items():
            state = {name: npz[f"{a}/{name}"] for name in info["arrays"]}
            clusterer = clusterer_from_state(info["algo"], info["params"], state)
            ts = info.get("train_scores")
            train = None
            if ts is not None:
                ts["confusion"] = np.asarray(ts["confusion"], int)
                train = Scores(**ts)
            attributes[a] = AttributeModel(a, info["algo"], int(info["k"]), clusterer,
                                           {int(c): n for c, n in info["names"].items()},
                                           list(info["values"]), train)
        return cls(attributes, meta["fingerprint"], meta["created"], version)

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(self.to_bytes())
        tmp.replace(path)  # never leave a half-written model where a reader may find it
        return path

    @classmethod
    def load(cls, path) -> "CentroidModel":
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModelFormatError(f"cannot read centroid model {path}: {exc.strerror}") from None
        try:
            return cls.from_bytes(data)
        except ModelFormatError as exc:
            raise ModelFormatError(f"{path}: {exc}") from None

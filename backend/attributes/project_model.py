"""A project's model: per attribute, a clustering of the project's faces and the names of its clusters.

    clusterings = Clusterings.fit(X, keys)           # unsupervised, on every face of the project
    model = fit_project(X, labels, config, clusterings, prior)
    faces = model.predict(X_new)                     # [FacePrediction], values and scores per face

Per attribute, three states:
  * "named": enough confirmations (MIN_PER_VALUE for at least two values); the clustering (algorithm
    and k among CANDIDATE_KS) is chosen by cross-validated accuracy (backend.attributes.selection), a saved prior
    competing as one more candidate; clusters are named from all confirmations;
  * "prior": not enough confirmations yet, but the saved centroid model (SUBDISC_PRIOR) knows the
    attribute: its names are used from the start;
  * "collecting": neither: the faces are still clustered (K-Means, k = number of classes) so the
    scores below can sort the best faces to label first, but no value is predicted.

Scores. Each choice's score is the soft probability of the predicted value (the summed posterior of
the clusters carrying that name: AttributeModel.predict). A face's rank, which becomes the task's
prediction score (the column the Data Manager sorts on), is its centrality averaged over the
attributes: for the cluster a face falls in, the share of the project's faces of that cluster lying
farther from the cluster's centre than it does (1.0 = the most central face, ~0 = the outermost).
Because it is a rank *within* each cluster, the most central faces of every cluster come first
together, so the first labels a team gives cover every cluster and name it from its most typical
face; a task's score is its best face's rank.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from backend.attributes.centroids import AttributeModel, CentroidModel
from backend.attributes.clustering import Clusterer, make_clusterer
from backend.labeling_config import Attribute, LabelingConfig
from backend.predictions import FacePrediction
from backend.attributes.scoring import is_labelled, name_clusters, score
from backend.attributes.selection import MIN_PER_VALUE, Candidate, ready_values, select

log = logging.getLogger(__name__)

SEED = 0
ALGOS = ("kmeans", "gmm")
CANDIDATE_KS = (2, 4, 8, 16)
#: Points kept per cluster to place a new face among the project's faces (its centrality).
QUANTILES = 101


def candidate_keys(n_values: int, n_faces: int) -> list[str]:
    """"algo:k" candidates, simplest first: k = the number of values (one-to-one naming) or larger
    powers of two (majority naming), with at least two faces per cluster on average."""
    ks = sorted({n_values, *(k for k in CANDIDATE_KS if k > n_values)})
    ks = [k for k in ks if k <= n_faces and (k == n_values or 2 * k <= n_faces)]
    return [f"{algo}:{k}" for k in ks for algo in ALGOS]


def default_key(attribute: Attribute, n_faces: int) -> str:
    return f"kmeans:{max(2, min(len(attribute.values), n_faces))}"


class Clusterings:
    """Candidate clusterings of the project's faces, keyed "algo:k", fitted without labels.

    They depend only on the faces, not on labels or config: refits after new confirmations reuse
    them; the caller starts a fresh set when the project's faces have grown a lot.
    """

    def __init__(self, fitted: dict[str, Clusterer] | None = None, n_faces: int = 0):
        self.fitted = dict(fitted or {})
        self.n_faces = n_faces

    def ensure(self, X: np.ndarray, keys) -> bool:
        """Fit the missing candidates on X; True if anything was fitted."""
        missing = [k for k in dict.fromkeys(keys) if k not in self.fitted]
        for key in missing:
            algo, k = key.split(":")
            started = time.perf_counter()
            self.fitted[key] = make_clusterer(algo, int(k), random_state=SEED).fit(X)
            log.info("fitted %s on %d faces in %.2fs", key, len(X), time.perf_counter() - started)
        return bool(missing)

    def __getitem__(self, key: str) -> Clusterer:
        return self.fitted[key]

    def to_bytes(self) -> bytes:
        models = {key: AttributeModel(key, key.split(":")[0], c.n_clusters, c,
                                      {i: None for i in range(c.n_clusters)}, [])
                  for key, c in self.fitted.items()}
        return CentroidModel(models).to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes, n_faces: int) -> "Clusterings":
        model = CentroidModel.from_bytes(data)
        return cls({key: m.clusterer for key, m in model.attributes.items()}, n_faces)


def _assignments(clusterer: Clusterer, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cluster of each face, its distance to that cluster's centre) in the clusterer's space."""
    ids = np.asarray(clusterer.predict(X))
    d = clusterer.transform(X)[np.arange(len(ids)), np.clip(ids, 0, None)]
    return ids, d


def centrality_table(clusterer: Clusterer, X: np.ndarray) -> list[list[float]]:
    """Per cluster, sorted distances (quantiles when many) of the project's faces to its centre."""
    ids, d = _assignments(clusterer, X)
    table = []
    for c in range(clusterer.n_clusters):
        mine = np.sort(d[ids == c])
        if len(mine) > QUANTILES:
            mine = np.quantile(mine, np.linspace(0, 1, QUANTILES))
        table.append([float(v) for v in mine])
    return table


def centrality(table: list[list[float]], ids: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Share of the cluster's faces farther from the centre than each face (1 = most central)."""
    out = np.zeros(len(ids))
    for i, (c, dist) in enumerate(zip(ids, d)):
        if 0 <= c < len(table) and table[c]:
            q = table[c]
            # The tolerance keeps a face at its own recorded distance from counting itself.
            out[i] = 1.0 - np.searchsorted(q, dist - 1e-9, side="left") / len(q)
    return out


@dataclass
class ProjectModel:
    attributes: dict[str, AttributeModel]
    info: dict[str, dict]
    centrality: dict[str, list[list[float]]]
    config_fingerprint: str
    pipeline_fingerprint: str = ""
    n_faces: int = 0
    n_tasks: int = 0
    version: str = ""
    fitted: float = field(default_factory=time.time)

    def predict(self, X) -> list[FacePrediction]:
        """One FacePrediction per row of X (n, 128): values and scores per attribute, and a rank."""
        X = np.asarray(X, np.float64).reshape(-1, 128)
        faces = [FacePrediction() for _ in range(len(X))]
        if not len(X):
            return faces
        ranks = np.zeros(len(X))
        for name, model in self.attributes.items():
            values, scores = model.predict(X)
            ids, d = _assignments(model.clusterer, X)
            ranks += centrality(self.centrality[name], ids, d)
            for face, value, s in zip(faces, values, scores):
                face.values[name] = (value, float(s))
        if self.attributes:
            for face, r in zip(faces, ranks / len(self.attributes)):
                face.rank = float(r)
        return faces

    def content_hash(self) -> str:
        """What predictions depend on (not the centrality tables, which only refine scores)."""
        h = hashlib.sha256(self.config_fingerprint.encode())
        for name in sorted(self.attributes):
            m = self.attributes[name]
            params, arrays = m.clusterer.get_state()
            h.update(json.dumps([name, m.algo, int(m.k), sorted((str(c), n) for c, n in m.names.items()),
                                 params], sort_keys=True, default=str).encode())
            for key in sorted(arrays):
                h.update(np.ascontiguousarray(arrays[key], np.float64).tobytes())
        return h.hexdigest()

    def to_stored(self) -> tuple[bytes, dict]:
        blob = CentroidModel(self.attributes, self.pipeline_fingerprint).to_bytes()
        meta = {"version": self.version, "config_fingerprint": self.config_fingerprint,
                "pipeline_fingerprint": self.pipeline_fingerprint, "n_faces": self.n_faces,
                "n_tasks": self.n_tasks, "fitted": self.fitted, "content_hash": self.content_hash(),
                "info": self.info, "centrality": self.centrality}
        return blob, meta

    @classmethod
    def from_stored(cls, blob: bytes, meta: dict) -> "ProjectModel":
        attributes = CentroidModel.from_bytes(blob).attributes
        return cls(attributes, meta["info"], meta["centrality"], meta["config_fingerprint"],
                   meta.get("pipeline_fingerprint", ""), meta.get("n_faces", 0),
                   meta.get("n_tasks", 0), meta.get("version", ""), meta.get("fitted", 0.0))


def usable_prior(prior: CentroidModel | None, attribute: Attribute,
                 pipeline_fingerprint: str) -> AttributeModel | None:
    """The prior's model of this attribute, its names limited to the config's classes, or None."""
    if prior is None or attribute.name not in prior.attributes:
        return None
    if prior.fingerprint and pipeline_fingerprint and prior.fingerprint != pipeline_fingerprint:
        # Vectors of another pipeline (detector, landmarks, jitter...) live in another space.
        log.warning("prior ignored for %s: fitted on pipeline %s, this backend embeds with %s",
                    attribute.name, prior.fingerprint, pipeline_fingerprint)
        return None
    m = prior.attributes[attribute.name]
    names = {c: (n if n in attribute.values else None) for c, n in m.names.items()}
    if not any(names.values()):
        return None
    return AttributeModel(attribute.name, m.algo, m.k, m.clusterer, names, m.values, None)


def fit_project(X: np.ndarray, labels: dict[str, np.ndarray], config: LabelingConfig,
                clusterings: Clusterings, prior: CentroidModel | None = None,
                pipeline_fingerprint: str = "", n_tasks: int = 0) -> ProjectModel:
    """Fit every attribute of the config on the project's faces X (n, 128).

    labels: {attribute: (n,) confirmed value or None per face}. Missing candidate clusterings are
    fitted into `clusterings` (the caller stores them for the next refit).
    """
    X = np.asarray(X, np.float64).reshape(-1, 128)
    n = len(X)
    attributes: dict[str, AttributeModel] = {}
    info: dict[str, dict] = {}
    table: dict[str, list[list[float]]] = {}
    for attribute in config.attributes:
        y = np.asarray(labels.get(attribute.name, np.full(n, None, object)), dtype=object)
        labelled = is_labelled(y)
        confirmations = dict(Counter(str(v) for v in y[labelled]))
        ready = ready_values(y)
        prior_model = usable_prior(prior, attribute, pipeline_fingerprint)
        entry = {"values": list(attribute.values), "confirmations": confirmations,
                 "ready_values": ready, "min_per_value": MIN_PER_VALUE, "selection": None,
                 "prior_accuracy": None}
        if n < 2:
            info[attribute.name] = entry | {"status": "no faces"}
            continue
        if prior_model is not None and labelled.any():
            # The prior was not fitted on these labels: its accuracy on them is an honest figure.
            entry["prior_accuracy"] = score(y[labelled], prior_model.predict(X[labelled])[0],
                                            sorted(set(confirmations) | set(prior_model.values))).accuracy
        if len(ready) >= 2:
            keys = candidate_keys(len(ready), n)
            clusterings.ensure(X, keys)
            candidates = []
            for key in keys:
                c = clusterings[key]
                candidates.append(Candidate(key, c.n_clusters, c.predict(X[labelled]),
                                            np.asarray(c.cluster_centers_)))
            if prior_model is not None:
                candidates.append(Candidate("prior", prior_model.k,
                                            prior_model.clusterer.predict(X[labelled]),
                                            names=prior_model.names))
            sel = select(candidates, y[labelled], seed=SEED)
            if sel.chosen == "prior":
                model, status = prior_model, "prior"
            else:
                c = clusterings[sel.chosen]
                ids = c.predict(X[labelled])
                names = name_clusters(ids, y[labelled], c.n_clusters,
                                      centers=np.asarray(c.cluster_centers_), values=ready)
                model = AttributeModel(attribute.name, sel.chosen.split(":")[0], c.n_clusters, c,
                                       names, ready, None)
                status = "named"
            entry["selection"] = sel.to_dict()
        elif prior_model is not None:
            model, status = prior_model, "prior"
        else:
            key = default_key(attribute, n)
            clusterings.ensure(X, [key])
            c = clusterings[key]
            model = AttributeModel(attribute.name, "kmeans", c.n_clusters, c,
                                   {i: None for i in range(c.n_clusters)}, list(attribute.values), None)
            status = "collecting"
        attributes[attribute.name] = model
        table[attribute.name] = centrality_table(model.clusterer, X)
        info[attribute.name] = entry | {"status": status, "algo": model.algo, "k": int(model.k),
                                        "names": {str(c): v for c, v in model.names.items()}}
    return ProjectModel(attributes, info, table, config.fingerprint(), pipeline_fingerprint, n,
                        n_tasks)


"""A project's model: per attribute, the learner chosen by nested cross-validation on the
confirmations, a gate saying whether and where its values may be shown, and an order to label in.

    clusterings = Clusterings.fit(X, keys)           # unsupervised, on every face of the project
    model = fit_project(views, labels, config, clusterings, prior, keys=face_keys)
    faces = model.predict(views_new, keys)           # [FacePrediction], values and scores per face

views: {view: (n, d)} of every project face (backend.attributes.views; "vector" always there).

Per attribute, the states (info[attribute]["status"]):
  * "shown": enough confirmations (MIN_PER_VALUE for at least two values); among the candidates
    (backend.attributes.candidates: named clusters, nearest class mean, logistic regression, label
    spreading, each on every view, and the saved prior) the three with the best cross-validated
    accuracy are chosen and their probabilities averaged (a committee:
    backend.attributes.selection.choose), and the nested held-out predictions of choosing so
    open the gate (backend.attributes.abstention): it beats the majority baseline of the project's
    faces (estimated from every face, not the balanced confirmations alone) with confidence.
    A face's value is shown only when its confidence clears the gate's cut (its threshold, set on
    held-out faces); other faces keep their box and an empty choice;
  * "silent": a model was chosen but its held-out predictions do not beat always guessing the
    commonest value with confidence: nothing is shown for this attribute;
  * "prior": no two values confirmed yet, but the saved centroid model (SUBDISC_PRIOR) knows the
    attribute: its names are shown from the start;
  * "collecting": neither: nothing shown; the attribute waits for confirmations.

Scores. A shown choice's score is its calibrated probability. A face's rank, the task's prediction
score the Data Manager sorts on, is its place in the teaching order (backend.attributes.ordering):
round-robin over a fine label-free clustering of the faces (the least-labelled clusters first),
within a cluster a systematic sample from its most typical face outwards, faces of values with few
confirmations first. Faces the refit did not see (new photos) get half their
centrality in that clustering: below the planned ones, most typical first.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from backend.attributes.abstention import Gate, population_prevalence
from backend.attributes.candidates import (ClusterLearner, Learner, PriorLearner, learner_from_state,
                                           supervised_candidates)
from backend.attributes.centroids import AttributeModel, CentroidModel, ModelFormatError
from backend.attributes.clustering import Clusterer, clusterer_from_state, make_clusterer
from backend.attributes.ordering import teaching_scores, uncertainty, value_need
from backend.labeling_config import Attribute, LabelingConfig
from backend.predictions import FacePrediction
from backend.attributes.scoring import is_labelled, score
from backend.attributes.selection import MIN_PER_VALUE, choose, ready_values, splits

log = logging.getLogger(__name__)

SEED = 0
ALGOS = ("kmeans", "gmm")
CANDIDATE_KS = (2, 4, 8, 16)
#: Points kept per cluster to place a new face among the project's faces (its centrality).
QUANTILES = 101
MODEL_FORMAT = "subdisc-project-model-2"


def candidate_keys(n_values: int, n_faces: int) -> list[str]:
    """"algo:k" candidates, simplest first: k = the number of values (one-to-one naming) or larger
    powers of two (majority naming), with at least two faces per cluster on average."""
    ks = sorted({n_values, *(k for k in CANDIDATE_KS if k > n_values)})
    ks = [k for k in ks if k <= n_faces and (k == n_values or 2 * k <= n_faces)]
    # Mixtures only at k = the number of values: beside K-Means at larger k they were no better
    # (bench/STUDY_RESULTS.md) and cost most of a refit's time.
    return [f"{algo}:{k}" for k in ks for algo in ALGOS if algo == "kmeans" or k == n_values]


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


DIVERSITY_K = 16


def diversity_key(n_faces: int) -> str:
    return f"kmeans:{max(2, min(DIVERSITY_K, n_faces // 4))}"


def _pack(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    return buf.getvalue()


def _unpack(blob: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


@dataclass
class ProjectModel:
    learners: dict[str, Learner]
    gates: dict[str, Gate]
    info: dict[str, dict]
    diversity: Clusterer | None
    centrality: list[list[float]]
    order: dict[str, float]                 # "task:face" -> teaching score
    config_fingerprint: str
    pipeline_fingerprint: str = ""
    n_faces: int = 0
    n_tasks: int = 0
    version: str = ""
    fitted: float = field(default_factory=time.time)

    def predict(self, views, keys=None) -> list[FacePrediction]:
        """One FacePrediction per face. views: {view: (n, d)} or the (n, 128) vectors alone;
        keys: (n,) "task:face" ids of project faces (their teaching score), or None."""
        if not isinstance(views, dict):
            views = {"vector": np.asarray(views, np.float64).reshape(-1, 128)}
        X = np.asarray(views["vector"], np.float64).reshape(-1, 128)
        n = len(X)
        faces = [FacePrediction() for _ in range(n)]
        if not n:
            return faces
        for name, learner in self.learners.items():
            gate = self.gates.get(name)
            if not all(v in views for v in learner.needs):
                continue   # a face without that view (cached before it existed): no value
            P = learner.proba_from(views)
            values = np.array(learner.values, dtype=object)[P.argmax(1)]
            if gate is None:   # the prior, trusted before any confirmation
                show, cal = np.ones(n, bool), P.max(1)
            else:
                cal = gate.calibrated(P.max(1))
                show = gate.show(P.max(1))
            for face, v, c, s in zip(faces, values, cal, show):
                face.values[name] = (str(v) if s else None, float(c))
        fallback = np.zeros(n)
        if self.diversity is not None:
            ids, d = _assignments(self.diversity, X)
            fallback = 0.5 * centrality(self.centrality, ids, d)
        for i, face in enumerate(faces):
            key = keys[i] if keys is not None else None
            face.rank = float(self.order.get(key, fallback[i]) if key is not None else fallback[i])
        return faces

    def content_hash(self) -> str:
        """What predictions depend on: learners, gates, the order."""
        h = hashlib.sha256(self.config_fingerprint.encode())
        params, arrays = self._state()
        h.update(json.dumps(params, sort_keys=True, default=str).encode())
        for key in sorted(arrays):
            h.update(np.ascontiguousarray(arrays[key]).tobytes())
        h.update(json.dumps(sorted(self.order.items())).encode())
        return h.hexdigest()

    def _state(self) -> tuple[dict, dict[str, np.ndarray]]:
        params, arrays = {"learners": {}, "gates": {}}, {}
        for name, learner in self.learners.items():
            p, a = learner.get_state()
            params["learners"][name] = p
            arrays |= {f"{name}/{k}": v for k, v in a.items() if v is not None}
            if name in self.gates:
                params["gates"][name] = self.gates[name].to_dict()
        if self.diversity is not None:
            p, a = self.diversity.get_state()
            params["diversity"] = p
            arrays |= {f"__diversity__/{k}": v for k, v in a.items()}
        return params, arrays

    def to_stored(self) -> tuple[bytes, dict]:
        params, arrays = self._state()
        meta = {"format": MODEL_FORMAT, "version": self.version,
                "config_fingerprint": self.config_fingerprint,
                "pipeline_fingerprint": self.pipeline_fingerprint, "n_faces": self.n_faces,
                "n_tasks": self.n_tasks, "fitted": self.fitted, "content_hash": self.content_hash(),
                "info": self.info, "centrality": self.centrality, "order": self.order,
                "state": params}
        return _pack(arrays), meta

    @classmethod
    def from_stored(cls, blob: bytes, meta: dict) -> "ProjectModel":
        if meta.get("format") != MODEL_FORMAT:
            raise ModelFormatError("a project model of an older subdisc: refit it")
        arrays = _unpack(blob)
        params = meta["state"]

        def part(prefix):
            return {k[len(prefix) + 1:]: v for k, v in arrays.items() if k.startswith(prefix + "/")}
        learners = {name: learner_from_state(p, part(name)) for name, p in params["learners"].items()}
        gates = {name: Gate.from_dict(g) for name, g in params["gates"].items()}
        diversity = (clusterer_from_state("kmeans", params["diversity"], part("__diversity__"))
                     if "diversity" in params else None)
        return cls(learners, gates, meta["info"], diversity, meta.get("centrality", []),
                   meta.get("order", {}), meta["config_fingerprint"],
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


def candidate_factories(n_values: int, views: dict, clusterings: Clusterings, prior_model) -> list:
    """Every candidate learner of one attribute, simplest first (ties go to the earlier)."""
    X = views["vector"]
    keys = candidate_keys(n_values, len(X))
    clusterings.ensure(X, keys)
    caches = {key: {} for key in keys + ["prior"]}
    out = [(lambda key=key: ClusterLearner("vector", clusterings[key], key, cache=caches[key]))
           for key in keys]
    out += supervised_candidates(sorted(views, key=lambda v: (v != "vector", v)))
    if prior_model is not None:
        out.append(lambda: PriorLearner("vector", prior_model.clusterer, "prior",
                                        dict(prior_model.names), cache=caches["prior"]))
    return out


def fit_project(views, labels: dict[str, np.ndarray], config: LabelingConfig,
                clusterings: Clusterings, prior: CentroidModel | None = None,
                pipeline_fingerprint: str = "", n_tasks: int = 0, keys=None) -> ProjectModel:
    """Fit every attribute of the config on the project's faces.

    views: {view: (n, d)} (or the (n, 128) vectors alone); labels: {attribute: (n,) confirmed value
    or None per face}; keys: (n,) "task:face" ids, for the teaching order. Missing candidate
    clusterings are fitted into `clusterings` (the caller stores them for the next refit).
    """
    if not isinstance(views, dict):
        views = {"vector": np.asarray(views, np.float64).reshape(-1, 128)}
    views = {k: np.asarray(v, np.float64) for k, v in views.items()}
    X = views["vector"].reshape(-1, 128)
    n = len(X)
    learners: dict[str, Learner] = {}
    gates: dict[str, Gate] = {}
    info: dict[str, dict] = {}
    probas, counts = [], []
    any_labelled = np.zeros(n, bool)
    for attribute in config.attributes:
        any_labelled |= is_labelled(np.asarray(labels.get(attribute.name, np.full(n, None, object)),
                                               dtype=object))
    key = diversity_key(n)
    strata = None
    if n >= 2:
        # Label-free strata of the faces: the teaching order's clusters, and what the gates'
        # population estimates weight by.
        clusterings.ensure(X, [key])
        strata = np.asarray(clusterings[key].predict(X))
    for attribute in config.attributes:
        y = np.asarray(labels.get(attribute.name, np.full(n, None, object)), dtype=object)
        labelled = is_labelled(y)
        confirmations = dict(Counter(str(v) for v in y[labelled]))
        ready = ready_values(y)
        prior_model = usable_prior(prior, attribute, pipeline_fingerprint)
        entry = {"values": list(attribute.values), "confirmations": confirmations,
                 "ready_values": ready, "min_per_value": MIN_PER_VALUE, "selection": None,
                 "prior_accuracy": None, "gate": None, "view": None, "coverage": 0.0}
        if n < 2:
            info[attribute.name] = entry | {"status": "no faces"}
            continue
        if prior_model is not None and labelled.any():
            # The prior was not fitted on these labels: its accuracy on them is an honest figure.
            entry["prior_accuracy"] = score(y[labelled], prior_model.predict(X[labelled])[0],
                                            sorted(set(confirmations) | set(prior_model.values))).accuracy
        rows = np.flatnonzero(labelled)
        learner = None
        if len(ready) >= 2 and splits(y[rows][np.isin(y[rows].astype(str), ready)], SEED):
            started = time.perf_counter()
            factories = candidate_factories(len(ready), views, clusterings, prior_model)
            choice, learner = choose(factories, views, rows, y[rows], seed=SEED)
            # The gate judges against the project's faces, not the confirmations alone: a teaching
            # order that balances the values makes their majority under-state the faces' one.
            predicted = learner.predict_from(views)
            prevalence = population_prevalence(choice.values, y, predicted, strata, any_labelled)
            # Right or wrong as the nested procedure predicted (honest), confidence on the scale of
            # the chosen model (what its faces will be shown by).
            gate = Gate.fit(choice.y, choice.pred, choice.own_conf, prevalence=prevalence)
            entry["prevalence"] = prevalence
            gates[attribute.name] = gate
            status = "shown" if gate.open else "silent"
            entry["selection"] = {"chosen": choice.chosen, "cv": choice.cv,
                                  "scores": choice.scores().to_dict(), "folds": choice.folds}
            entry["gate"] = gate.to_dict()
            log.info("%s: %s chosen among %d in %.2fs (%s)", attribute.name, choice.chosen,
                     len(factories), time.perf_counter() - started, status)
        elif prior_model is not None:
            learner = PriorLearner("vector", prior_model.clusterer, "prior", dict(prior_model.names))
            learner.fit(X, rows, y[rows], list(prior_model.values))
            status = "prior"
        else:
            status = "collecting"
        if learner is not None:
            learners[attribute.name] = learner
            P = learner.proba_from(views)
            probas.append(P)
            counts.append([confirmations.get(v, 0) for v in learner.values])
            gate = gates.get(attribute.name)
            shown = gate.show(P.max(1)) if gate is not None else np.ones(n, bool)
            entry["coverage"] = float(shown[~labelled].mean()) if (~labelled).any() else 0.0
            entry["view"] = learner.view
        k = getattr(getattr(learner, "clusterer", None), "n_clusters", None)
        info[attribute.name] = entry | {
            "status": status, "algo": learner.kind if learner is not None else None,
            "k": int(k) if k is not None and learner.kind in ("clusters", "prior") else None,
            "names": ({str(c): v for c, v in learner.names.items()}
                      if learner is not None and getattr(learner, "names", None) else None)}
    diversity, table, order = None, [], {}
    if n >= 2:
        diversity = clusterings[key]
        table = centrality_table(diversity, X)
        ids, d = _assignments(diversity, X)
        scores = teaching_scores(ids, centrality(table, ids, d), uncertainty(probas, n), any_labelled,
                                 value_need(probas, counts, n), np.asarray(diversity.cluster_centers_))
        if keys is not None:
            order = {str(k): float(s) for k, s in zip(keys, scores)}
    return ProjectModel(learners, gates, info, diversity, table, order, config.fingerprint(),
                        pipeline_fingerprint, n, n_tasks)

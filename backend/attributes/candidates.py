"""Candidate models of one attribute, each on one view, all with the same small interface.

    learner = LogisticLearner("vector").fit(V, rows, y, values)   # V: (n, d) every project face
    P = learner.predict_proba(V_new)                               # (m, len(values))
    P = learner.proba_from({"vector": V_new, ...})                 # the same, from every view
    committee = CommitteeLearner([learner, other])                 # mean of their proba_from
    params, arrays = learner.get_state();  learner_from_state(params, arrays)

Simplest first (ties in the cross-validation go to the earlier): the saved prior (fixed names, no
fitting), named clusters (a label-free clustering of every project face, its clusters named from the
labels: today's zero-shot model), nearest class mean, standardised logistic regression, label
spreading over a k-nearest-neighbour graph of all the project's faces. Every learner z-scores its view
with the mean and spread of all the project's faces (no labels involved, so shared by all folds).
What an attribute is predicted by is a committee of the few that cross-validate best
(backend.attributes.selection.choose), each on its own view. No pickles in the state: arrays and
JSON-able parameters only.
"""
from __future__ import annotations

import numpy as np

from backend.attributes.centroids import AttributeModel
from backend.attributes.clustering import Clusterer, clusterer_from_state, softmax
from backend.attributes.scoring import name_clusters


class Learner:
    kind = ""

    def __init__(self, view: str = "vector"):
        self.view = view
        self.values: list[str] = []
        self.mean_: np.ndarray | None = None
        self.scale_: np.ndarray | None = None

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.view}"

    def _scaler(self, V: np.ndarray) -> None:
        self.mean_ = V.mean(0)
        s = V.std(0)
        self.scale_ = np.where(s > 1e-12, s, 1.0)

    def z(self, V) -> np.ndarray:
        return (np.asarray(V, np.float64) - self.mean_) / self.scale_

    def fit(self, V: np.ndarray, rows: np.ndarray, y: np.ndarray, values: list[str]) -> "Learner":
        """V: (n, d) the view of every project face; rows: (m,) the labelled ones; y: (m,) values."""
        self.values = list(values)
        if self.mean_ is None:
            self._scaler(np.asarray(V, np.float64))
        self._fit(self.z(V), np.asarray(rows), np.asarray(y, dtype=object))
        return self

    def _fit(self, Z, rows, y) -> None:
        raise NotImplementedError

    def predict_proba(self, V) -> np.ndarray:
        raise NotImplementedError

    def predict(self, V) -> np.ndarray:
        return np.array(self.values, dtype=object)[self.predict_proba(V).argmax(1)]

    @property
    def needs(self) -> list[str]:
        """The views this learner reads."""
        return [self.view]

    def proba_from(self, views: dict[str, np.ndarray]) -> np.ndarray:
        """(n, len(values)) from {view: (n, d)}: what callers holding every view use."""
        return self.predict_proba(views[self.view])

    def predict_from(self, views: dict[str, np.ndarray]) -> np.ndarray:
        return np.array(self.values, dtype=object)[self.proba_from(views).argmax(1)]

    def get_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        return ({"kind": self.kind, "view": self.view, "values": self.values},
                {"mean": self.mean_, "scale": self.scale_})

    @classmethod
    def from_state(cls, params: dict, arrays: dict[str, np.ndarray]) -> "Learner":
        learner = cls(params["view"])
        learner._load(params, arrays)
        return learner

    def _load(self, params: dict, arrays: dict) -> None:
        self.values = list(params["values"])
        self.mean_, self.scale_ = arrays["mean"], arrays["scale"]


class MeanLearner(Learner):
    """Nearest class mean in the z-scored view; probabilities from an isotropic Gaussian per class
    (its variance: the labelled faces' mean squared distance to their own class mean)."""

    kind = "mean"

    def _fit(self, Z, rows, y):
        Zl = Z[rows]
        self.means_ = np.stack([Zl[y == v].mean(0) for v in self.values])
        d = ((Zl - self.means_[[self.values.index(v) for v in y]]) ** 2).sum(1)
        self.var_ = np.array([max(float(d.mean()), 1e-9)])

    def predict_proba(self, V):
        Z = self.z(V)
        d2 = ((Z[:, None, :] - self.means_[None]) ** 2).sum(-1)
        return softmax(-d2 / (2 * self.var_[0]))

    def get_state(self):
        params, arrays = super().get_state()
        return params, arrays | {"means": self.means_, "var": self.var_}

    def _load(self, params, arrays):
        super()._load(params, arrays)
        self.means_, self.var_ = arrays["means"], arrays["var"]


class LogisticLearner(Learner):
    """Logistic regression on the z-scored view (L2, C fixed: few labels, many dimensions)."""

    kind = "logreg"

    def __init__(self, view: str = "vector", C: float = 0.1):
        super().__init__(view)
        self.C = C

    def _fit(self, Z, rows, y):
        from sklearn.linear_model import LogisticRegression

        # newton-cholesky: exact and quick for few features and few labels (lbfgs took 10x longer).
        clf = LogisticRegression(C=self.C, solver="newton-cholesky", max_iter=100).fit(
            Z[rows], y.astype(str))
        order = [list(clf.classes_).index(v) for v in self.values]
        if len(self.values) == 2:
            w = clf.coef_[0]
            self.coef_ = np.stack([-w / 2, w / 2])[[list(clf.classes_).index(v) for v in self.values]]
            b = clf.intercept_[0]
            self.intercept_ = np.array([-b / 2, b / 2])[[list(clf.classes_).index(v) for v in self.values]]
        else:
            self.coef_, self.intercept_ = clf.coef_[order], clf.intercept_[order]

    def predict_proba(self, V):
        return softmax(self.z(V) @ self.coef_.T + self.intercept_)

    def get_state(self):
        params, arrays = super().get_state()
        return params | {"C": self.C}, arrays | {"coef": self.coef_, "intercept": self.intercept_}

    def _load(self, params, arrays):
        super()._load(params, arrays)
        self.C = params.get("C", 0.1)
        self.coef_, self.intercept_ = arrays["coef"], arrays["intercept"]


class SpreadLearner(Learner):
    """Label spreading over the k-nearest-neighbour graph of every project face (z-scored view):
    the labels flow along the faces' own structure, so unlabelled faces shape the answer. A face
    outside the graph gets the mean label distribution of its k nearest project faces."""

    kind = "spread"

    def __init__(self, view: str = "vector", n_neighbors: int = 10, alpha: float = 0.5):
        super().__init__(view)
        self.n_neighbors, self.alpha = n_neighbors, alpha

    def fit(self, V, rows, y, values):
        self.V_ = V
        return super().fit(V, rows, y, values)

    def _fit(self, Z, rows, y):
        # Zhou et al.'s spreading, F <- alpha S F + (1 - alpha) Y, on the symmetric normalised kNN
        # graph of the faces; the graph depends on the faces only, so the folds share it.
        S = _knn_graph(self.V_, Z, int(min(self.n_neighbors, len(Z) - 1)))
        Y = np.zeros((len(Z), len(self.values)))
        Y[rows, [self.values.index(v) for v in y]] = 1.0
        F = Y.copy()
        for _ in range(30):
            F = self.alpha * (S @ F) + (1 - self.alpha) * Y
        F = F + 1e-9
        self.points_ = Z.astype(np.float32)
        self.dist_ = (F / F.sum(1, keepdims=True)).astype(np.float32)
        del self.V_

    def predict_proba(self, V):
        Z = self.z(V).astype(np.float32)
        k = int(min(self.n_neighbors, len(self.points_)))
        d2 = (Z ** 2).sum(1)[:, None] - 2 * Z @ self.points_.T + (self.points_ ** 2).sum(1)[None]
        near = np.argpartition(d2, k - 1, axis=1)[:, :k]
        P = self.dist_[near].mean(1).astype(np.float64) + 1e-6
        return P / P.sum(1, keepdims=True)

    def get_state(self):
        params, arrays = super().get_state()
        return (params | {"n_neighbors": self.n_neighbors, "alpha": self.alpha},
                arrays | {"points": self.points_, "dist": self.dist_})

    def _load(self, params, arrays):
        super()._load(params, arrays)
        self.n_neighbors, self.alpha = params["n_neighbors"], params["alpha"]
        self.points_, self.dist_ = arrays["points"], arrays["dist"]


_GRAPHS: dict = {}


def _knn_graph(V, Z: np.ndarray, k: int):
    """D^-1/2 W D^-1/2 of the symmetrised k-nearest-neighbour graph of Z's rows (cached per V)."""
    from scipy import sparse
    from sklearn.neighbors import kneighbors_graph

    key = (id(V), V.shape, k)
    if key not in _GRAPHS:
        if len(_GRAPHS) > 16:
            _GRAPHS.clear()
        W = kneighbors_graph(Z, k, mode="connectivity", include_self=False)
        W = ((W + W.T) > 0).astype(np.float64)
        d = np.asarray(W.sum(1)).ravel()
        inv = sparse.diags(1.0 / np.sqrt(np.maximum(d, 1e-12)))
        _GRAPHS[key] = (V, (inv @ W @ inv).tocsr())   # V kept: its id stays unique while cached
    return _GRAPHS[key][1]


class ClusterLearner(Learner):
    """Named clusters: a clustering fitted without labels on the raw view, its clusters named from
    the labels (majority, or one-to-one when k = number of values; backend.attributes.scoring)."""

    kind = "clusters"

    def __init__(self, view: str = "vector", clusterer: Clusterer | None = None, name: str = "",
                 names: dict[int, str | None] | None = None, cache: dict | None = None):
        super().__init__(view)
        self.clusterer, self.name, self.names = clusterer, name, names
        # Shared by the learners of one clustering (the CV makes many): {id(V): (V, ids, proba)}.
        self._cache = cache if cache is not None else {}

    @property
    def key(self) -> str:
        return f"clusters:{self.name}"

    def _scaler(self, V):
        self.mean_, self.scale_ = np.zeros(V.shape[1]), np.ones(V.shape[1])

    def _cluster_proba(self, V) -> tuple[np.ndarray, np.ndarray]:
        # The CV calls this on the same project matrix again and again: compute it once.
        hit = self._cache.get(id(V))
        if hit is not None and hit[0] is V:
            return hit[1], hit[2]
        W = np.asarray(V, np.float64)
        ids, proba = np.asarray(self.clusterer.predict(W)), self.clusterer.predict_proba(W)
        if len(self._cache) > 4:
            self._cache.clear()
        self._cache[id(V)] = (V, ids, proba)
        return ids, proba

    def fit(self, V, rows, y, values):
        self.values = list(values)
        self._scaler(np.asarray(V))
        ids, _ = self._cluster_proba(V)
        self.names = name_clusters(ids[rows], np.asarray(y, dtype=object), self.clusterer.n_clusters,
                                   centers=np.asarray(self.clusterer.cluster_centers_), values=self.values)
        return self

    def predict_proba(self, V):
        _, proba = self._cluster_proba(V)
        model = AttributeModel("", "", self.clusterer.n_clusters, self.clusterer, self.names, self.values)
        P = model.value_proba(proba) + 1e-6
        return P / P.sum(1, keepdims=True)

    def get_state(self):
        cparams, carrays = self.clusterer.get_state()
        algo = self.name.split(":")[0]
        params = {"kind": self.kind, "view": self.view, "values": self.values, "name": self.name,
                  "algo": algo, "clusterer": cparams,
                  "names": {str(c): n for c, n in (self.names or {}).items()}}
        return params, {f"c.{k}": v for k, v in carrays.items()}

    def _load(self, params, arrays):
        self.values, self.name = list(params["values"]), params["name"]
        self.clusterer = clusterer_from_state(params["algo"], params["clusterer"],
                                              {k[2:]: v for k, v in arrays.items() if k.startswith("c.")})
        self.names = {int(c): n for c, n in params["names"].items()}
        self._scaler(np.zeros((1, 1)))


class PriorLearner(ClusterLearner):
    """The saved centroid model (SUBDISC_PRIOR): its clusters keep their names; nothing is fitted."""

    kind = "prior"

    @property
    def key(self) -> str:
        return "prior"

    def fit(self, V, rows, y, values):
        self.values = list(values)
        self.names = {c: (n if n in self.values else None) for c, n in self.names.items()}
        return self


class CommitteeLearner(Learner):
    """The mean probabilities of a few fitted learners, each on its own view (the candidates that
    cross-validated best, backend.attributes.selection.choose).

    Why: with a few dozen confirmations, the single best of ~26 candidates by cross-validation is
    mostly the luckiest. Measured on bench/loop.py's faces at 64 tasks (advised order), age: label
    spreading on the pooled view cross-validated 96.7 % and scored 72.4 % on the faces not
    labelled, while the next four (86.7-93.3 % in the CV) scored 78.6-85.9 %; their mean is steadier
    than any one of them.
    """

    kind = "committee"

    def __init__(self, members=()):
        members = list(members)
        super().__init__("+".join(dict.fromkeys(v for m in members for v in m.needs)))
        self.members = members
        self.values = list(members[0].values) if members else []

    @property
    def key(self) -> str:
        return "committee:" + "+".join(m.key for m in self.members)

    @property
    def needs(self) -> list[str]:
        return list(dict.fromkeys(v for m in self.members for v in m.needs))

    def proba_from(self, views):
        return np.mean([m.proba_from(views) for m in self.members], axis=0)

    def predict_proba(self, V):
        raise TypeError("a committee reads several views: call proba_from({view: matrix})")

    def get_state(self):
        params, arrays = {"kind": self.kind, "view": self.view, "values": self.values,
                          "members": []}, {}
        for i, member in enumerate(self.members):
            p, a = member.get_state()
            params["members"].append(p)
            arrays |= {f"m{i}.{k}": v for k, v in a.items() if v is not None}
        return params, arrays

    @classmethod
    def from_state(cls, params, arrays):
        members = []
        for i, p in enumerate(params["members"]):
            prefix = f"m{i}."
            members.append(learner_from_state(p, {k[len(prefix):]: v for k, v in arrays.items()
                                                  if k.startswith(prefix)}))
        return cls(members)


KINDS = {c.kind: c for c in (MeanLearner, LogisticLearner, SpreadLearner, ClusterLearner, PriorLearner,
                             CommitteeLearner)}


def learner_from_state(params: dict, arrays: dict[str, np.ndarray]) -> Learner:
    cls = KINDS.get(params.get("kind"))
    if cls is None:
        raise ValueError(f"unknown learner kind {params.get('kind')!r}")
    return cls.from_state(params, arrays)


#: The supervised learners tried on every view, simplest first.
SUPERVISED = (MeanLearner, LogisticLearner, SpreadLearner)


def supervised_candidates(views) -> list:
    """Factories (callables -> a fresh Learner) of every supervised learner on every view."""
    return [(lambda cls=cls, view=view: cls(view)) for cls in SUPERVISED for view in views]

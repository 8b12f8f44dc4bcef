"""Clusterers for face vectors, one scikit-learn style interface.

    clusterer = make_clusterer("kmeans", k=2, random_state=0).fit(X)     # X: (n, d) float
    ids = clusterer.predict(X)              # (n,) int, -1 = no cluster (Chinese whispers only)
    proba = clusterer.predict_proba(X)      # (n, k) soft assignment, rows sum to 1

Every clusterer predicts with its own numpy code from a few fitted arrays (centres, variances,
mixture parameters), so a clusterer rebuilt from `get_state()` by `from_state()` predicts exactly as
the fitted one did: that is what the saved centroid model (backend/attributes/centroids.py) relies on.

A new algorithm is one small class: subclass `CentroidClusterer`, implement `_fit_labels(Z)` (cluster
ids of the preprocessed training vectors), and add it to `CLUSTERERS`.
"""
from __future__ import annotations

import numpy as np
from scipy.special import softmax as scipy_softmax

#: Preprocessing applied to the vectors before clustering (fitted on the training vectors).
#:   none: the raw 128-D vectors (the study's Euclidean K-Means);
#:   l2: unit length, so Euclidean K-Means becomes cosine (spherical) K-Means;
#:   center-l2: subtract the training mean, then unit length (cosine around the data's centre);
#:   whiten: PCA whitening, every direction of the training set gets unit variance.
PREPROCESS = ("none", "l2", "center-l2", "whiten")


class Preprocessor:
    """A fitted, stateless-at-predict transform of the vectors (see PREPROCESS)."""

    def __init__(self, kind: str | None = "none"):
        kind = kind or "none"
        if kind not in PREPROCESS:
            raise ValueError(f"preprocess must be one of {PREPROCESS}, not {kind!r}")
        self.kind = kind
        self.mean_: np.ndarray | None = None
        self.matrix_: np.ndarray | None = None

    def fit(self, X: np.ndarray) -> "Preprocessor":
        X = np.asarray(X, np.float64)
        if self.kind in ("center-l2", "whiten"):
            self.mean_ = X.mean(axis=0)
        if self.kind == "whiten":
            # Eigen-decomposition of the covariance; directions with ~no variance are dropped, not
            # blown up (with fewer rows than dimensions most directions are empty).
            cov = np.cov(X - self.mean_, rowvar=False)
            eigval, eigvec = np.linalg.eigh(np.atleast_2d(cov))
            keep = eigval > eigval.max() * 1e-6
            self.matrix_ = eigvec[:, keep] / np.sqrt(eigval[keep])
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        """(n, d) -> (n, d') float64."""
        Z = np.asarray(X, np.float64)
        if self.mean_ is not None:
            Z = Z - self.mean_
        if self.matrix_ is not None:
            Z = Z @ self.matrix_
        if self.kind in ("l2", "center-l2"):
            Z = Z / np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-12)
        return Z

    def arrays(self) -> dict[str, np.ndarray]:
        out = {}
        if self.mean_ is not None:
            out["pre_mean"] = self.mean_
        if self.matrix_ is not None:
            out["pre_matrix"] = self.matrix_
        return out

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.mean_ = arrays.get("pre_mean")
        self.matrix_ = arrays.get("pre_matrix")


def _as_matrix(X) -> np.ndarray:
    X = np.asarray(X, np.float64)
    if X.ndim != 2:
        raise ValueError(f"expected an (n, d) array of vectors, got shape {X.shape}")
    return X


def squared_distances(Z: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """(n, d), (k, d) -> (n, k) squared Euclidean distances (clipped at 0 against rounding)."""
    d2 = (Z * Z).sum(1)[:, None] - 2 * Z @ centers.T + (centers * centers).sum(1)[None, :]
    return np.maximum(d2, 0.0)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (n, k) logits."""
    return scipy_softmax(logits, axis=1)


class Clusterer:
    """The interface: fit(X) -> self, predict(X) -> (n,) int, predict_proba(X) -> (n, k).

    Subclasses list their constructor parameters in `_params` and fitted arrays in `_arrays`.
    """

    _params: tuple[str, ...] = ()
    _arrays: tuple[str, ...] = ()
    n_clusters: int

    def fit(self, X) -> "Clusterer":
        raise NotImplementedError

    def predict(self, X) -> np.ndarray:
        raise NotImplementedError

    def predict_proba(self, X) -> np.ndarray:
        raise NotImplementedError

    def fit_predict(self, X) -> np.ndarray:
        return self.fit(X).predict(X)

    def transform(self, X) -> np.ndarray:
        """(n, k) Euclidean distances to the cluster centres, in the space the clusterer works in."""
        return np.sqrt(squared_distances(self.preprocessor_.transform(_as_matrix(X)),
                                         np.asarray(self.cluster_centers_)))

    # --- state, for saving -----------------------------------------------------------------------
    def get_params(self) -> dict:
        return {name: getattr(self, name) for name in self._params}

    def get_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """(JSON-able parameters, fitted arrays): everything `from_state` needs to predict."""
        params = self.get_params() | {"n_clusters": int(self.n_clusters)}
        arrays = {name: np.asarray(getattr(self, name)) for name in self._arrays}
        arrays |= self.preprocessor_.arrays()
        return params, arrays

    @classmethod
    def from_state(cls, params: dict, arrays: dict[str, np.ndarray]) -> "Clusterer":
        init = {name: params[name] for name in cls._params if name in params}
        obj = cls(**init)
        obj.n_clusters = int(params["n_clusters"])
        for name in cls._arrays:
            setattr(obj, name, np.asarray(arrays[name]))
        obj.preprocessor_ = Preprocessor(params.get("preprocess"))
        obj.preprocessor_.load_arrays(arrays)
        return obj

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"


class CentroidClusterer(Clusterer):
    """Clusters summarised by centres: predict = nearest centre, soft assignment from distances.

    predict_proba is a softmax of -d^2 / (2 s^2), where s^2 is the fitted within-cluster variance
    per dimension (mean squared distance of training vectors to their own centre, divided by d):
    the posterior of an equal-weight isotropic Gaussian mixture with those centres.
    """

    _arrays = ("cluster_centers_", "variance_")

    def __init__(self, n_clusters: int = 2, preprocess: str | None = "none"):
        self.n_clusters = n_clusters
        self.preprocess = preprocess or "none"

    def _fit_labels(self, Z: np.ndarray) -> np.ndarray:
        """Cluster ids 0..k-1 of the preprocessed training vectors Z (n, d')."""
        raise NotImplementedError

    def fit(self, X) -> "CentroidClusterer":
        X = _as_matrix(X)
        if len(X) < 1:
            raise ValueError("cannot cluster zero vectors")
        self.preprocessor_ = Preprocessor(self.preprocess).fit(X)
        Z = self.preprocessor_.transform(X)
        labels = np.asarray(self._fit_labels(Z))
        ids = np.unique(labels[labels >= 0])
        self.cluster_centers_ = np.stack([Z[labels == i].mean(0) for i in ids])
        self.n_clusters = len(ids)
        own = squared_distances(Z, self.cluster_centers_)[np.arange(len(Z)), np.searchsorted(ids, labels)]
        # A floor keeps the softmax finite when every cluster is a single point.
        self.variance_ = np.asarray(max(own.mean() / Z.shape[1], 1e-12))
        self.labels_ = np.searchsorted(ids, labels)
        return self

    def _distances(self, X) -> np.ndarray:
        return squared_distances(self.preprocessor_.transform(_as_matrix(X)), self.cluster_centers_)

    def predict(self, X) -> np.ndarray:
        return self._distances(X).argmin(axis=1)

    def predict_proba(self, X) -> np.ndarray:
        return softmax(-self._distances(X) / (2 * float(self.variance_)))

    def transform(self, X) -> np.ndarray:
        """(n, k) Euclidean distances to the centres (in the preprocessed space)."""
        return np.sqrt(self._distances(X))


class KMeansClusterer(CentroidClusterer):
    """K-Means with random initialisation repeated `n_init` times (the study's setting).

    scikit-learn keeps the initialisation with the lowest inertia; the study's "runs" are separate
    fits with different random_state. init="k-means++" spreads the initial centres instead: on a
    planted 3-level hierarchy with k=8 random init (n_init=10) lands in a local minimum (two true
    groups merged, another split) in about half the seeds, k-means++ in none.
    """

    _params = ("n_clusters", "n_init", "random_state", "preprocess", "init")

    def __init__(self, n_clusters: int = 2, n_init: int = 10, random_state: int | None = None,
                 preprocess: str | None = "none", init: str = "random"):
        super().__init__(n_clusters, preprocess)
        if init not in ("random", "k-means++"):
            raise ValueError(f"init must be 'random' or 'k-means++', not {init!r}")
        self.n_init = n_init
        self.random_state = random_state
        self.init = init

    def _fit_labels(self, Z):
        from sklearn.cluster import KMeans

        k = min(self.n_clusters, len(Z))
        km = KMeans(k, init=self.init, n_init=self.n_init, random_state=self.random_state)
        return km.fit_predict(Z)


class KMeansPlusPlusClusterer(KMeansClusterer):
    """K-Means with k-means++ initialisation (scikit-learn's default; not the study's)."""

    def __init__(self, n_clusters: int = 2, n_init: int = 10, random_state: int | None = None,
                 preprocess: str | None = "none", init: str = "k-means++"):
        super().__init__(n_clusters, n_init, random_state, preprocess, init)


class AgglomerativeClusterer(CentroidClusterer):
    """Ward agglomerative clustering (deterministic); predicts by the nearest cluster mean."""

    _params = ("n_clusters", "linkage", "preprocess")

    def __init__(self, n_clusters: int = 2, linkage: str = "ward", preprocess: str | None = "none",
                 random_state: int | None = None):
        super().__init__(n_clusters, preprocess)
        self.linkage = linkage

    def _fit_labels(self, Z):
        from sklearn.cluster import AgglomerativeClustering

        return AgglomerativeClustering(min(self.n_clusters, len(Z)), linkage=self.linkage).fit_predict(Z)


class ChineseWhispers(CentroidClusterer):
    """dlib's Chinese whispers graph clustering: identity grouping at dlib's 0.6 distance.

    The number of clusters is found, not given. predict: the nearest cluster mean if it lies within
    `threshold`, else -1 (a face unlike every known identity).
    """

    _params = ("threshold", "preprocess")

    def __init__(self, threshold: float = 0.6, preprocess: str | None = "none",
                 n_clusters: int | None = None, random_state: int | None = None):
        super().__init__(0, preprocess)
        self.threshold = threshold

    def _fit_labels(self, Z):
        import dlib

        return dlib.chinese_whispers_clustering([dlib.vector(row.tolist()) for row in Z],
                                                float(self.threshold))

    def predict(self, X) -> np.ndarray:
        d2 = self._distances(X)
        ids = d2.argmin(axis=1)
        return np.where(d2[np.arange(len(ids)), ids] <= self.threshold ** 2, ids, -1)


class ResidualKMeans(CentroidClusterer):
    """The next split down the hierarchy: K-Means within the groups of a parent clustering.

    Fits K-Means with `parent_k` clusters (k-means++, the parent groups), subtracts from every vector
    its parent group's centre, and clusters these residuals into `n_clusters`. The residuals keep
    what varies inside every parent group, so with parent_k=2 on faces (the skin split) the next
    split is gender, with parent_k=4 (skin x gender) it is age: one binary split per level, which a
    handful of labels can name. parent_k=1 is plain K-Means on the centred vectors.
    Fitted: parent_centers_ (parent_k, d), cluster_centers_ (n_clusters, d) in residual space.
    """

    _params = ("n_clusters", "parent_k", "n_init", "random_state", "preprocess")
    _arrays = ("parent_centers_", "cluster_centers_", "variance_")

    def __init__(self, n_clusters: int = 2, parent_k: int = 2, n_init: int = 10,
                 random_state: int | None = None, preprocess: str | None = "none"):
        super().__init__(n_clusters, preprocess)
        self.parent_k = parent_k
        self.n_init = n_init
        self.random_state = random_state

    def _residuals(self, Z: np.ndarray) -> np.ndarray:
        parent = squared_distances(Z, self.parent_centers_).argmin(axis=1)
        return Z - self.parent_centers_[parent]

    def fit(self, X) -> "ResidualKMeans":
        from sklearn.cluster import KMeans

        X = _as_matrix(X)
        pre = Preprocessor(self.preprocess).fit(X)
        Z = pre.transform(X)
        parent = KMeans(min(self.parent_k, len(Z)), n_init=self.n_init,
                        random_state=self.random_state).fit(Z)
        self.parent_centers_ = parent.cluster_centers_
        # The residual step reuses CentroidClusterer.fit on residuals, then owns the preprocessing.
        inner = KMeansClusterer(self.n_clusters, self.n_init, self.random_state)
        inner.fit(self._residuals(Z))
        self.cluster_centers_, self.variance_ = inner.cluster_centers_, inner.variance_
        self.labels_, self.n_clusters = inner.labels_, inner.n_clusters
        self.preprocessor_ = pre
        return self

    def _distances(self, X) -> np.ndarray:
        Z = self.preprocessor_.transform(_as_matrix(X))
        return squared_distances(self._residuals(Z), self.cluster_centers_)


class GaussianMixtureClusterer(Clusterer):
    """A mixture of Gaussians fitted by EM, initialised by K-Means (the study's "MoG").

    predict = most probable component. Fitted parameters: weights_ (k,), means_ (k, d),
    covariances_ ((k, d) for "diag", (k,) for "spherical", (k, d, d) for "full").
    """

    _params = ("n_clusters", "covariance_type", "random_state", "preprocess", "reg_covar")
    _arrays = ("weights_", "means_", "covariances_")

    def __init__(self, n_clusters: int = 2, covariance_type: str = "diag",
                 random_state: int | None = None, preprocess: str | None = "none",
                 reg_covar: float = 1e-6):
        if covariance_type not in ("diag", "spherical", "full"):
            raise ValueError("covariance_type must be 'diag', 'spherical' or 'full'")
        self.n_clusters = n_clusters
        self.covariance_type = covariance_type
        self.random_state = random_state
        self.preprocess = preprocess or "none"
        self.reg_covar = reg_covar

    def fit(self, X) -> "GaussianMixtureClusterer":
        from sklearn.mixture import GaussianMixture

        X = _as_matrix(X)
        self.preprocessor_ = Preprocessor(self.preprocess).fit(X)
        Z = self.preprocessor_.transform(X)
        gm = GaussianMixture(min(self.n_clusters, len(Z)), covariance_type=self.covariance_type,
                             init_params="kmeans", reg_covar=self.reg_covar, n_init=1,
                             max_iter=200, random_state=self.random_state).fit(Z)
        self.weights_, self.means_, self.covariances_ = gm.weights_, gm.means_, gm.covariances_
        self.n_clusters = len(self.weights_)
        return self

    @property
    def cluster_centers_(self) -> np.ndarray:
        return self.means_

    def _log_resp(self, X) -> np.ndarray:
        """(n, k) log of weight * density, up to a per-row constant."""
        Z = self.preprocessor_.transform(_as_matrix(X))
        out = np.empty((len(Z), self.n_clusters))
        for j in range(self.n_clusters):
            diff = Z - self.means_[j]
            cov = self.covariances_[j]
            if self.covariance_type == "full":
                chol = np.linalg.cholesky(cov)
                sol = np.linalg.solve(chol, diff.T)
                maha = (sol * sol).sum(0)
                logdet = 2 * np.log(np.diag(chol)).sum()
            else:
                var = np.broadcast_to(cov, (Z.shape[1],))
                maha = (diff * diff / var).sum(1)
                logdet = np.log(var).sum()
            out[:, j] = np.log(self.weights_[j]) - 0.5 * (maha + logdet)
        return out

    def predict(self, X) -> np.ndarray:
        return self._log_resp(X).argmax(axis=1)

    def predict_proba(self, X) -> np.ndarray:
        return softmax(self._log_resp(X))


#: algo name -> clusterer class. make_clusterer passes (n_clusters, random_state, preprocess).
CLUSTERERS: dict[str, type[Clusterer]] = {
    "kmeans": KMeansClusterer,
    "kmeans++": KMeansPlusPlusClusterer,
    "gmm": GaussianMixtureClusterer,
    "agglomerative": AgglomerativeClusterer,
    "cw": ChineseWhispers,
    "residual": ResidualKMeans,
}


def make_clusterer(algo: str, k: int, random_state: int | None = None,
                   preprocess: str | None = "none", **params) -> Clusterer:
    """A fresh clusterer by name (see CLUSTERERS); k is ignored by Chinese whispers.

    params: further constructor arguments of that class (e.g. parent_k for "residual").
    """
    try:
        cls = CLUSTERERS[algo]
    except KeyError:
        raise ValueError(f"unknown clustering algorithm {algo!r}; known: {sorted(CLUSTERERS)}") from None
    # (Chinese whispers takes n_clusters and random_state too, and ignores them.)
    return cls(n_clusters=k, random_state=random_state, preprocess=preprocess, **params)


def clusterer_from_state(algo: str, params: dict, arrays: dict[str, np.ndarray]) -> Clusterer:
    """Rebuild a fitted clusterer saved with `get_state()`."""
    if algo not in CLUSTERERS:
        raise ValueError(f"unknown clustering algorithm {algo!r}; known: {sorted(CLUSTERERS)}")
    return CLUSTERERS[algo].from_state(params, arrays)

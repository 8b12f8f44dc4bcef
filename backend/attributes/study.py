"""The seed study's experiments (sections 3-5) on labelled face vectors, as functions returning data.

    faces = faces_from_vectors_file(read_labels("labels.csv"), "dev/", "vectors.npz")
    extra = extra_class(faces.X, faces.labels(["skin", "gender"]), ks=(2, 4, 8), runs=5)
    intra = intra_class(mouth_features(faces.landmarks), faces.column("emotion"),
                        faces.column("identity"), "emotion", pair=("happiness", "neutral"))
    held = holdout(faces.X, faces.labels(["skin", "gender"]), test_size=0.3)
    ceiling = supervised_ceiling(faces.X, faces.column("gender"))
    curve = label_efficiency(faces.X, faces.column("gender"))

Every accuracy comes as backend.attributes.scoring.Scores: with the majority-class baseline of the same rows and
the balanced accuracy beside it.
"""
from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from backend.attributes.centroids import CentroidModel, candidates, select_attribute_model
from backend.attributes.clustering import ChineseWhispers, make_clusterer
from backend.attributes.scoring import (HierarchyLevel, Scores, Summary, apply_names, hierarchy, is_labelled,
                             label_values, name_clusters, score, summarise)
from backend.attributes.views import MOUTH_FEATURES, align_landmarks, mouth_features, mouth_shape  # noqa: F401

# --- labelled faces ------------------------------------------------------------------------------


def read_labels(path) -> list[dict]:
    """Rows of a labels CSV (a `path` column, then one column per attribute; "" = unknown)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if "path" not in (reader.fieldnames or []):
            raise ValueError(f"{path}: a labels CSV needs a 'path' column")
        return list(reader)


def parse_where(conditions: list[str] | None) -> dict[str, set[str]]:
    """["source=utk", "skin=pale,dark"] -> {"source": {"utk"}, "skin": {"pale", "dark"}}."""
    out: dict[str, set[str]] = {}
    for cond in conditions or []:
        column, sep, values = cond.partition("=")
        if not sep or not column.strip():
            raise ValueError(f"a condition is COLUMN=VALUE[,VALUE...], not {cond!r}")
        out.setdefault(column.strip(), set()).update(v.strip() for v in values.split(","))
    return out


def filter_rows(rows: list[dict], where: dict[str, set[str]]) -> list[dict]:
    """Rows matching every condition (a value among the condition's values)."""
    for column in where:
        if rows and column not in rows[0]:
            raise ValueError(f"no column {column!r} in the labels (columns: {', '.join(rows[0])})")
    return [r for r in rows if all(r.get(c, "") in vals for c, vals in where.items())]


def central_face(boxes: np.ndarray, width: int = 0, height: int = 0) -> int:
    """Index of the labelled person's face among an image's faces: the box whose centre is nearest
    the image centre (LFW's convention: the named person is the one in the middle).

    boxes: (m, 4) left, top, right, bottom. Without an image size, the centre of all boxes is used.
    """
    boxes = np.asarray(boxes, float).reshape(-1, 4)
    if len(boxes) == 0:
        raise ValueError("no faces to choose from")
    if width > 0 and height > 0:
        cx, cy = width / 2, height / 2
    else:
        cx = (boxes[:, 0].min() + boxes[:, 2].max()) / 2
        cy = (boxes[:, 1].min() + boxes[:, 3].max()) / 2
    centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], axis=1)
    return int(((centres - (cx, cy)) ** 2).sum(axis=1).argmin())


@dataclass
class LabelledFaces:
    """One face per labelled photo: X (n, 128) float32 vectors, landmarks (n, L, 2) (NaN when
    unknown), boxes (n, 4), and the photo's label row (a dict of strings)."""

    X: np.ndarray
    landmarks: np.ndarray
    boxes: np.ndarray
    rows: list[dict]
    missing: list[tuple[str, str]] = field(default_factory=list)  # (path, why no face)
    fingerprint: str = ""

    def __len__(self) -> int:
        return len(self.rows)

    def column(self, name: str) -> np.ndarray:
        """(n,) object array of a label column; None where unknown."""
        if self.rows and name not in self.rows[0]:
            raise KeyError(f"no column {name!r} in the labels")
        return np.array([r.get(name) or None for r in self.rows], dtype=object)

    def labels(self, names) -> dict[str, np.ndarray]:
        return {n: self.column(n) for n in names}

    def subset(self, keep) -> "LabelledFaces":
        idx = np.flatnonzero(keep) if np.asarray(keep).dtype == bool else np.asarray(keep, int)
        return LabelledFaces(self.X[idx], self.landmarks[idx], self.boxes[idx],
                             [self.rows[i] for i in idx], self.missing, self.fingerprint)

    def complete(self, names) -> "LabelledFaces":
        """Only the faces labelled for every attribute in `names` (the study's fully labelled sets)."""
        keep = np.all([is_labelled(self.column(n)) for n in names], axis=0) if names else \
            np.ones(len(self), bool)
        return self.subset(keep)


def _path_keys(path: str, depth: int) -> str:
    parts = Path(path).parts
    return "/".join(parts[-depth:])


def _assemble(rows, images_dir, faces_for) -> LabelledFaces:
    """faces_for(row, absolute path) -> (vectors, landmarks, boxes, width, height) or a reason."""
    X, L, B, kept, missing = [], [], [], [], []
    for row in rows:
        found = faces_for(row, str((Path(images_dir) / row["path"]).resolve()))
        if isinstance(found, str):
            missing.append((row["path"], found))
            continue
        vectors, landmarks, boxes, width, height = found
        i = central_face(boxes, width, height)
        X.append(vectors[i])
        L.append(landmarks[i])
        B.append(boxes[i])
        kept.append(row)
    n_marks = max((len(m) for m in L), default=68)
    marks = np.full((len(L), n_marks, 2), np.nan, np.float32)
    for j, m in enumerate(L):
        marks[j, : len(m)] = m
    return LabelledFaces(np.asarray(X, np.float32).reshape(-1, 128), marks,
                         np.asarray(B, np.int32).reshape(-1, 4), kept, missing)


def faces_from_vectors_file(rows: list[dict], images_dir, path) -> LabelledFaces:
    """Match label rows to the faces of a `subdisc embed --out FILE.npz` export.

    A row matches a face by the photo's absolute path (images_dir / row path, against each source
    resolved from the current directory), or else by the trailing path components (so a file
    written from another directory still matches).
    """
    with np.load(path, allow_pickle=False) as npz:
        # Read each array once: indexing an NpzFile decompresses the whole array on every access.
        data = {name: npz[name] for name in npz.files}
    sources = [str(s) for s in data["source"]]
    by_abs: dict[str, list[int]] = {}
    for i, s in enumerate(sources):
        by_abs.setdefault(str(Path(s).resolve()) if "://" not in s else s, []).append(i)
    depths = {len(Path(r["path"]).parts) for r in rows}
    by_tail = {d: {} for d in depths}
    for i, s in enumerate(sources):
        for d in depths:
            by_tail[d].setdefault(_path_keys(s, d), []).append(i)
    errors = dict(zip((str(s) for s in data["error_source"]), (str(k) for k in data["error_kind"])))
    error_tails = {_path_keys(s, d): k for s, k in errors.items() for d in depths}

    def faces_for(row, absolute):
        idx = by_abs.get(absolute) or by_tail[len(Path(row["path"]).parts)].get(row["path"])
        if not idx:
            return error_tails.get(row["path"], "no face (or not in the vectors file)")
        idx = sorted(set(idx), key=lambda i: int(data["face_index"][i]))
        return (data["vectors"][idx], data["landmarks"][idx], data["boxes"][idx],
                int(data["width"][idx[0]]), int(data["height"][idx[0]]))

    faces = _assemble(rows, images_dir, faces_for)
    if "fingerprint" in data:
        faces.fingerprint = str(data["fingerprint"])
    return faces


def faces_from_embeddings(rows: list[dict], images_dir, results: dict) -> LabelledFaces:
    """Match label rows to `workers.client.embed` results, keyed by the source strings used:
    str(images_dir / row path)."""

    def faces_for(row, absolute):
        r = results.get(str(Path(images_dir) / row["path"])) or results.get(absolute)
        if r is None:
            return "not embedded"
        if not r.ok:
            return r.error
        if not r.faces:
            return "no face"
        return (np.stack([f.vector for f in r.faces]),
                [np.asarray(f.landmarks, np.float32) for f in r.faces],
                np.array([f.box for f in r.faces]), r.width, r.height)

    return _assemble(rows, images_dir, faces_for)


# --- another view of the face: mouth geometry from the 68 landmarks -------------------------------

def standardise(F: np.ndarray) -> np.ndarray:
    """Z-score each column (within the rows given); constant columns become 0."""
    from sklearn.preprocessing import scale

    return scale(np.asarray(F, np.float64))


#: The smile view: the mouth features a smile changes and speech does not (width, corner lift).
#: Lip opening and mouth drop are left out: open-mouthed talking faces were the commonest false
#: "happiness" with all six (see bench/STUDY_RESULTS.md).
SMILE_FEATURES = ("mouth_width", "width_to_jaw", "corner_lift")

VIEWS = ("vector", "mouth", "smile", "mouth-shape", "vector+mouth")


def face_view(faces: LabelledFaces, view: str) -> np.ndarray:
    """The features of each face used for clustering: "vector" (128-D identity vector), "mouth"
    (6 geometric features), "smile" (3 of them, see SMILE_FEATURES), "mouth-shape" (40-D aligned
    mouth), or "vector+mouth"."""
    if view == "vector":
        return faces.X.astype(np.float64)
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}: one of {', '.join(VIEWS)}")
    if faces.landmarks.shape[1] < 68:
        raise ValueError(f"view {view!r} needs the 68 landmarks")
    if view == "mouth":
        return mouth_features(faces.landmarks)
    if view == "smile":
        return mouth_features(faces.landmarks)[:, [MOUTH_FEATURES.index(f) for f in SMILE_FEATURES]]
    if view == "mouth-shape":
        return mouth_shape(faces.landmarks)
    if view == "vector+mouth":
        # Each block scaled to unit total variance, so neither drowns the other.
        V, M = faces.X.astype(np.float64), standardise(mouth_features(faces.landmarks))
        return np.hstack([V / max(np.sqrt(V.var(0).sum()), 1e-12), M / np.sqrt(M.shape[1])])
    raise AssertionError(view)


# --- extra-class (Table 1) -----------------------------------------------------------------------

@dataclass
class ExtraClassResult:
    """scores[k][attribute]: one Scores per run; summaries likewise; hierarchy: one level per k
    (from run 0); cluster_ids[k]: run 0's clusters, for plots."""

    attributes: list[str]
    ks: list[int]
    runs: int
    algo: str
    preprocess: str
    n: int
    scores: dict[int, dict[str, list[Scores]]]
    summaries: dict[int, dict[str, Summary]]
    hierarchy: list[HierarchyLevel]
    cluster_ids: dict[int, np.ndarray]

    def to_dict(self) -> dict:
        return {
            "attributes": self.attributes, "ks": self.ks, "runs": self.runs, "algo": self.algo,
            "preprocess": self.preprocess, "n": self.n,
            "scores": {str(k): {a: [s.to_dict() for s in runs] for a, runs in v.items()}
                       for k, v in self.scores.items()},
            "summaries": {str(k): {a: s.to_dict() for a, s in v.items()} for k, v in self.summaries.items()},
            "hierarchy": [h.to_dict() for h in self.hierarchy],
        }


def extra_class(X, labels_by_attribute: dict[str, np.ndarray], ks=(2, 4, 8), runs: int = 5,
                algo: str = "kmeans", seed: int = 0, preprocess: str = "none") -> ExtraClassResult:
    """Table 1: cluster X (n, d) with k clusters, `runs` times (seeds seed..), and score each
    attribute's naming (one-to-one when k equals its number of values, else majority)."""
    X = np.asarray(X, np.float64)
    scores: dict[int, dict[str, list[Scores]]] = {}
    ids_first: dict[int, np.ndarray] = {}
    for k in ks:
        scores[k] = {a: [] for a in labels_by_attribute}
        for run in range(runs):
            clusterer = make_clusterer(algo, k, random_state=seed + run, preprocess=preprocess).fit(X)
            ids = clusterer.predict(X)
            ids_first.setdefault(k, ids)
            centers = getattr(clusterer, "cluster_centers_", None)
            for a, labels in labels_by_attribute.items():
                names = name_clusters(ids, labels, clusterer.n_clusters, centers)
                scores[k][a].append(score(labels, apply_names(ids, names), label_values(labels)))
    summaries = {k: {a: summarise(r) for a, r in v.items()} for k, v in scores.items()}
    levels = hierarchy(ids_first, labels_by_attribute)
    return ExtraClassResult(list(labels_by_attribute), list(ks), runs, algo, preprocess, len(X),
                            scores, summaries, levels, ids_first)


# --- intra-class (Tables 2-3) --------------------------------------------------------------------

@dataclass
class IntraRow:
    """One identity: k=2 clusters of its faces labelled with either value of the pair."""

    identity: str
    n: int
    counts: dict[str, int]
    accuracy: float
    balanced_accuracy: float
    majority_baseline: float
    runs: list[Scores]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["runs"] = [s.to_dict() for s in self.runs]
        return d


@dataclass
class IntraClassResult:
    attribute: str
    pair: tuple[str, str]
    view: str
    algo: str
    rows: list[IntraRow]

    @property
    def accuracy(self) -> float:
        return float(np.mean([r.accuracy for r in self.rows])) if self.rows else float("nan")

    @property
    def balanced_accuracy(self) -> float:
        return float(np.mean([r.balanced_accuracy for r in self.rows])) if self.rows else float("nan")

    @property
    def majority_baseline(self) -> float:
        return float(np.mean([r.majority_baseline for r in self.rows])) if self.rows else float("nan")

    def pooled(self) -> Scores:
        """All identities' run-0 predictions scored together."""
        t, p = [], []
        for r in self.rows:
            s = r.runs[0]
            for i, v in enumerate(s.values):
                for j, w in enumerate(s.values):
                    t += [v] * int(s.confusion[i, j])
                    p += [w] * int(s.confusion[i, j])
        return score(np.array(t, object), np.array(p, object), list(self.pair))

    def to_dict(self) -> dict:
        return {"attribute": self.attribute, "pair": list(self.pair), "view": self.view,
                "algo": self.algo, "accuracy": self.accuracy,
                "balanced_accuracy": self.balanced_accuracy, "majority_baseline": self.majority_baseline,
                "identities": len(self.rows), "rows": [r.to_dict() for r in self.rows]}


def identities_by_chinese_whispers(X, threshold: float = 0.6) -> np.ndarray:
    """(n,) identity names "cw:<cluster>" found by dlib's Chinese whispers on the 128-D vectors."""
    ids = ChineseWhispers(threshold).fit(X).labels_
    return np.array([f"cw:{i}" for i in ids], dtype=object)


def intra_class(F, labels, identities, attribute: str, pair: tuple[str, str] | None = None,
                min_per_value: int = 3, runs: int = 5, algo: str = "kmeans", seed: int = 0,
                view: str = "vector", standardise_within: bool = False) -> IntraClassResult:
    """Tables 2-3: per identity, k=2 clusters of F (n, d) over its faces labelled pair[0] or pair[1].

    Identities need at least `min_per_value` faces of each value. standardise_within z-scores each
    feature within the identity first (for geometric views whose features have different units).
    """
    labels = np.asarray(labels, object)
    identities = np.asarray(identities, object)
    F = np.asarray(F, np.float64)
    if pair is None:
        values = label_values(labels)
        if len(values) != 2:
            raise ValueError(f"{attribute} has values {values}: give the pair to compare")
        pair = (values[0], values[1])
    pair = (str(pair[0]), str(pair[1]))
    rows = []
    for person in sorted({str(i) for i in identities[is_labelled(identities)]}):
        member = (identities == person) & np.isin(labels.astype(str), pair)
        counts = {v: int((labels[member] == v).sum()) for v in pair}
        if min(counts.values()) < min_per_value:
            continue
        Fp = F[member]
        if standardise_within:
            Fp = standardise(Fp)
        good = np.isfinite(Fp).all(axis=1)
        Fp, yp = Fp[good], labels[member][good]
        if min((yp == v).sum() for v in pair) < min_per_value:
            continue
        run_scores = []
        for run in range(runs):
            ids = make_clusterer(algo, 2, random_state=seed + run).fit_predict(Fp)
            names = name_clusters(ids, yp, 2, values=list(pair))
            run_scores.append(score(yp, apply_names(ids, names), list(pair)))
        s = summarise(run_scores)
        rows.append(IntraRow(person, int(len(yp)), {v: int((yp == v).sum()) for v in pair},
                             s.accuracy, s.balanced_accuracy, s.majority_baseline, run_scores))
    return IntraClassResult(attribute, pair, view, algo, rows)


# --- section 5: centroids fitted on a training split ---------------------------------------------

@dataclass
class HoldoutResult:
    """Per algorithm and attribute: the chosen k, train and test Scores, and the fitted models."""

    test_size: float
    n_train: int
    n_test: int
    train: dict[str, dict[str, Scores]]
    test: dict[str, dict[str, Scores]]
    chosen_k: dict[str, dict[str, int]]
    models: dict[str, CentroidModel]

    def to_dict(self) -> dict:
        return {"test_size": self.test_size, "n_train": self.n_train, "n_test": self.n_test,
                "chosen_k": self.chosen_k,
                "train": {g: {a: s.to_dict() for a, s in v.items()} for g, v in self.train.items()},
                "test": {g: {a: s.to_dict() for a, s in v.items()} for g, v in self.test.items()}}


def joint_labels(labels_by_attribute: dict[str, np.ndarray]) -> np.ndarray:
    cols = [np.asarray(v, object) for v in labels_by_attribute.values()]
    return np.array(["|".join(str(c[i]) for c in cols) for i in range(len(cols[0]))], dtype=object)


def split_indices(n: int, test_size: float, seed: int, stratify=None) -> tuple[np.ndarray, np.ndarray]:
    """Train / test row indices, stratified by `stratify` when every group has 2+ rows."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(n)
    if stratify is not None:
        _, counts = np.unique(np.asarray(stratify).astype(str), return_counts=True)
        if counts.min() < 2:
            stratify = None
    tr, te = train_test_split(idx, test_size=test_size, random_state=seed,
                              stratify=None if stratify is None else np.asarray(stratify).astype(str))
    return np.sort(tr), np.sort(te)


def holdout(X, labels_by_attribute: dict[str, np.ndarray], test_size: float = 0.3,
            algos=("kmeans", "gmm"), ks=(2, 4, 8), runs: int = 5, seed: int = 0,
            preprocess: str = "none", fingerprint: str = "") -> HoldoutResult:
    """Figure 4: fit on a (stratified) training split, name on its labels, keep per attribute the k
    and run with the best training accuracy, classify the test split by nearest centroid / most
    probable component."""
    X = np.asarray(X, np.float64)
    tr, te = split_indices(len(X), test_size, seed, joint_labels(labels_by_attribute))
    train, test, chosen, models = {}, {}, {}, {}
    for algo in algos:
        train[algo], test[algo], chosen[algo], attrs = {}, {}, {}, {}
        fitted: dict = {}   # the clusterings of X[tr] depend on no attribute: fit each once
        for a, labels in labels_by_attribute.items():
            labels = np.asarray(labels, object)
            values = label_values(labels)
            best = select_attribute_model(X[tr], labels[tr], a, candidates(algo, ks, len(values)),
                                          runs, seed, preprocess, values, fitted)
            names, _ = best.predict(X[te])
            attrs[a] = best
            train[algo][a] = best.train_scores
            test[algo][a] = score(labels[te], np.array(names, object), values)
            chosen[algo][a] = best.clusterer.get_params().get("parent_k", best.k) if algo == "residual" \
                else best.k
        models[algo] = CentroidModel(attrs, fingerprint)
    return HoldoutResult(test_size, len(tr), len(te), train, test, chosen, models)


# --- supervised ceiling and label efficiency -----------------------------------------------------

def supervised_ceiling(X, labels, folds: int = 5, seed: int = 0,
                       Cs=(0.003, 0.01, 0.03, 0.1, 0.3, 1.0)) -> Scores:
    """What the vectors hold at all: 5-fold cross-validated logistic regression (standardised
    inputs, its C chosen by an inner 3-fold search on each training fold only), scored on every
    labelled row's out-of-fold prediction."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = np.asarray(labels, object)
    keep = is_labelled(labels)
    y = labels[keep].astype(str)
    _, counts = np.unique(y, return_counts=True)
    folds = int(min(folds, counts.min()))
    if folds < 2 or len(counts) < 2:
        raise ValueError("the supervised ceiling needs at least 2 rows of each of 2+ values")
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    inner = max(2, min(3, int(counts.min() * (folds - 1) / folds)))
    search = GridSearchCV(model, {"logisticregression__C": list(Cs)},
                          cv=StratifiedKFold(inner, shuffle=True, random_state=seed))
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    pred = cross_val_predict(search, np.asarray(X, np.float64)[keep], y, cv=cv)
    return score(y, pred.astype(object), label_values(labels))


@dataclass
class EfficiencyResult:
    """curves[method][n]: one Scores per draw, on every labelled face outside the n drawn.

    Methods: "clusters k=K" (clusters fitted on all faces, named from the n labels), "prototypes"
    (nearest mean of the n labelled faces per value) and "logreg" (logistic regression on them).
    """

    attribute: str
    ns: list[int]
    draws: int
    curves: dict[str, dict[int, list[Scores]]]

    def mean(self, method: str, n: int, what: str = "accuracy") -> float:
        return float(np.mean([getattr(s, what) for s in self.curves[method][n]]))

    def to_dict(self) -> dict:
        return {"attribute": self.attribute, "ns": self.ns, "draws": self.draws,
                "curves": {m: {str(n): {"accuracy": self.mean(m, n),
                                        "balanced_accuracy": self.mean(m, n, "balanced_accuracy"),
                                        "majority_baseline": self.mean(m, n, "majority_baseline"),
                                        "runs": [s.accuracy for s in c[n]]}
                               for n in c} for m, c in self.curves.items()}}


def label_efficiency(X, labels, ns=(2, 5, 10, 20, 50), draws: int = 10, ks=(None,),
                     algo: str = "kmeans", seed: int = 0, preprocess: str = "none",
                     baselines: bool = True, attribute: str = "",
                     levels=(1, 2, 4, 8)) -> EfficiencyResult:
    """Accuracy of clusters named from n random labelled faces, on all the other labelled faces.

    Methods (curves keys):
      "clusters k=K": `algo` with K clusters (ks; None = the number of values, named one-to-one;
          larger = majority naming, unlabelled clusters named after the nearest named centre);
      "hierarchy split": one split per level of the hierarchy (ResidualKMeans with parent_k in
          `levels`), each named one-to-one; the n labels also pick the level that agrees with them
          best (ties: the earlier, higher level). Empty `levels` leaves it out;
      "prototypes" / "logreg" (baselines): nearest mean of the n labelled faces per value /
          logistic regression on them (inputs standardised over all faces).
    Draw d uses seed + d both for the labels drawn and for the clusterings.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    X = np.asarray(X, np.float64)
    labels = np.asarray(labels, object)
    values = label_values(labels)
    labelled = np.flatnonzero(is_labelled(labels))
    curves: dict[str, dict[int, list[Scores]]] = {}

    def add(method, n, s):
        curves.setdefault(method, {}).setdefault(n, []).append(s)

    Z = StandardScaler().fit_transform(X) if baselines else None  # unlabelled faces may set the scale
    for d in range(draws):
        order = np.random.default_rng(seed + d).permutation(labelled)
        fitted = {}
        for kk in dict.fromkeys(k or len(values) for k in ks):
            fitted[f"clusters k={kk}"] = make_clusterer(algo, kk, random_state=seed + d,
                                                        preprocess=preprocess).fit(X)
        splits = [make_clusterer("residual", len(values), random_state=seed + d, preprocess=preprocess,
                                 parent_k=p).fit(X) for p in levels]
        assigned = {method: c.predict(X) for method, c in fitted.items()}
        for n in ns:
            shown, rest = order[:n], order[n:]
            known = np.full(len(X), None, object)
            known[shown] = labels[shown]
            for method, c in fitted.items():
                ids = assigned[method]
                names = name_clusters(ids, known, c.n_clusters, getattr(c, "cluster_centers_", None),
                                      values=values)
                add(method, n, score(labels[rest], apply_names(ids[rest], names), values))
            best = None
            for c in splits:
                ids = c.labels_
                names = name_clusters(ids, known, c.n_clusters, values=values)
                agree = score(labels[shown], apply_names(ids[shown], names), values).accuracy
                if best is None or agree > best[0]:
                    best = (agree, ids, names)
            if best is not None:
                add("hierarchy split", n, score(labels[rest], apply_names(best[1][rest], best[2]), values))
        if not baselines:
            continue
        for n in ns:
            shown, rest = order[:n], order[n:]
            ys = labels[shown].astype(str)
            seen = sorted(set(ys))
            protos = np.stack([X[shown][ys == v].mean(0) for v in seen])
            pred = np.array(seen, object)[((X[rest, None, :] - protos[None]) ** 2).sum(-1).argmin(1)]
            add("prototypes", n, score(labels[rest], pred, values))
            if len(seen) > 1:
                pred = LogisticRegression(max_iter=2000).fit(Z[shown], ys).predict(Z[rest]).astype(object)
            add("logreg", n, score(labels[rest], pred, values))
    return EfficiencyResult(attribute, list(ns), draws, curves)


# --- synthetic data with a known structure (tests, demos) ----------------------------------------

def planted_hierarchy(n_per_group: int = 20, dim: int = 128, separations=(1.0, 0.5, 0.25),
                      noise: float = 0.02, seed: int = 0,
                      attributes=(("skin", ("dark", "pale")), ("gender", ("female", "male")),
                                  ("age_group", ("old", "young")))):
    """Vectors from a Gaussian mixture with a planted attribute hierarchy.

    Each attribute moves a face by +-separation/2 along its own random orthogonal direction, so
    the first attribute is the biggest split, the second the next, ... Returns (X (n, dim) float32,
    {attribute: (n,) object array of values}), n = n_per_group * 2**len(attributes).
    """
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(dim, len(attributes))))
    groups = np.array(np.meshgrid(*[[0, 1]] * len(attributes), indexing="ij")).reshape(len(attributes), -1).T
    codes = np.repeat(groups, n_per_group, axis=0)
    X = rng.normal(scale=noise, size=(len(codes), dim))
    for j, sep in enumerate(separations[: len(attributes)]):
        X += np.outer((codes[:, j] - 0.5) * sep, q[:, j])
    labels = {name: np.array([vals[c] for c in codes[:, j]], dtype=object)
              for j, (name, vals) in enumerate(attributes)}
    return X.astype(np.float32), labels


# --- a whole study, as the CLI runs it -------------------------------------------------------------

@dataclass
class IntraSpec:
    """One intra-class comparison: attribute and the pair of values (None: its only two values)."""

    attribute: str
    pair: tuple[str, str] | None = None

    @classmethod
    def parse_list(cls, text: str) -> list["IntraSpec"]:
        """"glasses,emotion=happiness/neutral" -> [IntraSpec("glasses"), IntraSpec("emotion", (...))]"""
        specs = []
        for item in filter(None, (s.strip() for s in text.split(","))):
            attribute, sep, pair = item.partition("=")
            if sep:
                values = [v.strip() for v in pair.split("/")]
                if len(values) != 2 or not all(values):
                    raise ValueError(f"an intra-class pair is ATTRIBUTE=VALUE/VALUE, not {item!r}")
                specs.append(cls(attribute.strip(), (values[0], values[1])))
            else:
                specs.append(cls(attribute))
        return specs


@dataclass
class StudyConfig:
    attributes: list[str]
    ks: list[int] = field(default_factory=lambda: [2, 4, 8])
    runs: int = 5
    algo: str = "kmeans"
    preprocess: str = "none"
    seed: int = 0
    holdout: float | None = None
    holdout_algos: list[str] = field(default_factory=lambda: ["kmeans", "gmm"])
    intra: list[IntraSpec] = field(default_factory=list)
    intra_views: list[str] = field(default_factory=lambda: ["vector"])
    identity: str = "identity"  # a label column, or "cw" for Chinese whispers on the vectors
    cw_threshold: float = 0.6
    min_per_value: int = 3
    ceiling: bool = True
    efficiency: list[int] = field(default_factory=list)
    efficiency_draws: int = 10


@dataclass
class StudyResult:
    """Everything one study measured. X and labels are kept for the report's plots (not in JSON)."""

    config: StudyConfig
    n: int
    missing: list[tuple[str, str]]
    extra: ExtraClassResult | None = None
    ceilings: dict[str, Scores] = field(default_factory=dict)
    intra: list[IntraClassResult] = field(default_factory=list)
    holdout: HoldoutResult | None = None
    efficiency: dict[str, EfficiencyResult] = field(default_factory=dict)
    X: np.ndarray | None = None
    labels: dict[str, np.ndarray] = field(default_factory=dict)

    def to_dict(self) -> dict:
        cfg = asdict(self.config)
        return {
            "config": cfg, "n": self.n,
            "missing": [{"path": p, "reason": r} for p, r in self.missing],
            "extra_class": self.extra.to_dict() if self.extra else None,
            "supervised_ceiling": {a: s.to_dict() for a, s in self.ceilings.items()},
            "intra_class": [r.to_dict() for r in self.intra],
            "holdout": self.holdout.to_dict() if self.holdout else None,
            "label_efficiency": {a: e.to_dict() for a, e in self.efficiency.items()},
        }


def run_study(faces: LabelledFaces, config: StudyConfig, progress=None) -> StudyResult:
    """The extra-class study on the faces labelled for every attribute, plus whichever of the
    intra-class, holdout, supervised ceiling and label-efficiency experiments `config` asks for.

    progress: optional callable(str) told what is running.
    """
    say = progress or (lambda msg: None)
    result = StudyResult(config, len(faces), list(faces.missing))
    if config.attributes:
        complete = faces.complete(config.attributes)
        if len(complete) < max(config.ks, default=2):
            raise ValueError(f"only {len(complete)} faces are labelled for all of "
                             f"{', '.join(config.attributes)}: too few to cluster")
        labels = complete.labels(config.attributes)
        result.X, result.labels = complete.X, labels
        say(f"extra-class: {len(complete)} faces, k = {config.ks}, {config.runs} runs")
        result.extra = extra_class(complete.X, labels, config.ks, config.runs, config.algo,
                                   config.seed, config.preprocess)
        if config.ceiling:
            for a, y in labels.items():
                try:
                    result.ceilings[a] = supervised_ceiling(complete.X, y, seed=config.seed)
                except ValueError:
                    pass  # too few rows of a value to cross-validate
        if config.holdout:
            say(f"holdout: test share {config.holdout}, {', '.join(config.holdout_algos)}")
            result.holdout = holdout(complete.X, labels, config.holdout, config.holdout_algos,
                                     config.ks, config.runs, config.seed, config.preprocess,
                                     faces.fingerprint)
        for a, y in labels.items() if config.efficiency else ():
            say(f"label efficiency: {a}")
            ks = sorted({None, *config.ks}, key=lambda k: -1 if k is None else k)
            result.efficiency[a] = label_efficiency(
                complete.X, y, [n for n in config.efficiency if n < len(complete)],
                config.efficiency_draws, ks, config.algo, config.seed, config.preprocess,
                attribute=a)
    if config.intra:
        identities = (identities_by_chinese_whispers(faces.X, config.cw_threshold) if config.identity == "cw"
                      else faces.column(config.identity))
        for spec in config.intra:
            for view in config.intra_views:
                say(f"intra-class: {spec.attribute} {spec.pair or ''} ({view})")
                result.intra.append(intra_class(
                    face_view(faces, view), faces.column(spec.attribute), identities,
                    spec.attribute, spec.pair, config.min_per_value, config.runs, config.algo,
                    config.seed, view, standardise_within=view != "vector"))
    return result

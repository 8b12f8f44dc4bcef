"""Naming clusters after attribute values, and scoring the named clusters against labels.

    names = name_clusters(cluster_ids, labels, k)        # {cluster id: "male", ...}
    y_pred = apply_names(cluster_ids, names)
    s = score(labels, y_pred)                            # accuracy, per-value recall, confusion, ...

Labels are arrays of strings where "" or None means "not labelled": those rows are ignored both
when naming and when scoring.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field

import numpy as np


def is_labelled(labels) -> np.ndarray:
    """(n,) bool: the label is a real value (not None, "", or NaN)."""
    out = []
    for v in labels:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            out.append(False)
        else:
            out.append(str(v) != "")
    return np.asarray(out, bool)


def label_values(labels) -> list[str]:
    """The distinct labelled values, sorted."""
    labels = np.asarray(labels, object)
    return sorted({str(v) for v in labels[is_labelled(labels)]})


def contingency(cluster_ids, labels, n_clusters: int, values: list[str]) -> np.ndarray:
    """(n_clusters, len(values)) counts of labelled rows per cluster and value."""
    table = np.zeros((n_clusters, len(values)), int)
    index = {v: j for j, v in enumerate(values)}
    for c, v in zip(np.asarray(cluster_ids), labels):
        if 0 <= c < n_clusters and v is not None and str(v) in index:
            table[c, index[str(v)]] += 1
    return table


def name_clusters(cluster_ids, labels, n_clusters: int, centers: np.ndarray | None = None,
                  values: list[str] | None = None) -> dict[int, str | None]:
    """Give each cluster an attribute value.

    cluster_ids: (n,) int (-1 = no cluster, ignored); labels: (n,) str or None.
    When n_clusters <= the number of values: one-to-one (Hungarian, maximising the labelled rows
    that agree). When n_clusters is larger: many-to-one, each cluster takes its majority value (ties:
    the value rarer overall, then alphabetical); a cluster without labelled members takes the name of
    the nearest named cluster centre when `centers` (k, d) are given, else None.
    """
    from scipy.optimize import linear_sum_assignment

    labels = np.asarray(labels, object)
    values = values or label_values(labels)
    if not values:
        return {c: None for c in range(n_clusters)}
    table = contingency(cluster_ids, labels, n_clusters, values)
    if n_clusters <= len(values):
        rows, cols = linear_sum_assignment(table, maximize=True)
        return {int(r): values[c] for r, c in zip(rows, cols)}

    totals = table.sum(axis=0)
    names: dict[int, str | None] = {}
    for c in range(n_clusters):
        if table[c].sum() == 0:
            names[c] = None
            continue
        # values are sorted, so -j prefers the alphabetically first on a full tie.
        best = max(range(len(values)), key=lambda j: (table[c, j], -totals[j], -j))
        names[c] = values[best]
    named = [c for c in range(n_clusters) if names[c] is not None]
    if centers is not None and named:
        centers = np.asarray(centers, float)
        for c in range(n_clusters):
            if names[c] is None:
                d = ((centers[named] - centers[c]) ** 2).sum(axis=1)
                names[c] = names[named[int(d.argmin())]]
    return names


def apply_names(cluster_ids, names: dict[int, str | None]) -> np.ndarray:
    """(n,) object array of the names of each row's cluster (None for -1 or unnamed)."""
    return np.array([names.get(int(c)) for c in np.asarray(cluster_ids)], dtype=object)


@dataclass
class Scores:
    """How well predicted values match labels, over the labelled rows.

    per_value[v]: recall of value v (the share of rows labelled v predicted v): the study's Table 1
    rows. confusion[i, j]: rows labelled values[i] predicted values[j]; a prediction outside
    `values` (or None) is an error counted in `unassigned[i]`, not in the matrix.
    majority_baseline: accuracy of always answering the most common label of the same rows.
    """

    accuracy: float
    balanced_accuracy: float
    per_value: dict[str, float]
    confusion: np.ndarray
    values: list[str]
    n: int
    majority_baseline: float
    unassigned: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["confusion"] = self.confusion.tolist()
        return d


def score(y_true, y_pred, values: list[str] | None = None) -> Scores:
    """Scores of y_pred against y_true (both (n,) str/None) over the rows where y_true is labelled."""
    y_true = np.asarray(y_true, object)
    y_pred = np.asarray(y_pred, object)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred differ in shape: {y_true.shape} vs {y_pred.shape}")
    keep = is_labelled(y_true)
    t = [str(v) for v in y_true[keep]]
    p = [None if v is None else str(v) for v in y_pred[keep]]
    values = list(values) if values is not None else sorted(set(t))
    index = {v: j for j, v in enumerate(values)}
    confusion = np.zeros((len(values), len(values)), int)
    unassigned = [0] * len(values)
    for a, b in zip(t, p):
        if a not in index:
            raise ValueError(f"label {a!r} is not among values {values}")
        if b in index:
            confusion[index[a], index[b]] += 1
        else:
            unassigned[index[a]] += 1
    n = len(t)
    support = confusion.sum(axis=1) + np.asarray(unassigned, int)
    per_value = {v: float(confusion[j, j] / support[j]) for j, v in enumerate(values) if support[j]}
    correct = int(np.trace(confusion))
    return Scores(
        accuracy=correct / n if n else float("nan"),
        balanced_accuracy=float(np.mean(list(per_value.values()))) if per_value else float("nan"),
        per_value=per_value,
        confusion=confusion,
        values=values,
        n=n,
        majority_baseline=float(support.max() / n) if n else float("nan"),
        unassigned=unassigned,
    )


@dataclass
class Summary:
    """Mean and spread of Scores over runs. per_value maps a value to its mean (and std) recall."""

    runs: int
    accuracy: float
    accuracy_std: float
    accuracy_min: float
    accuracy_max: float
    balanced_accuracy: float
    balanced_accuracy_std: float
    per_value: dict[str, float]
    per_value_std: dict[str, float]
    majority_baseline: float
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


def summarise(runs: list[Scores]) -> Summary:
    """Mean and (population) standard deviation of accuracy, balanced accuracy, per-value recall."""
    if not runs:
        raise ValueError("nothing to summarise")
    acc = np.array([s.accuracy for s in runs])
    bal = np.array([s.balanced_accuracy for s in runs])
    values = list(dict.fromkeys(v for s in runs for v in s.per_value))
    per = {v: np.array([s.per_value[v] for s in runs if v in s.per_value]) for v in values}
    return Summary(
        runs=len(runs),
        accuracy=float(acc.mean()), accuracy_std=float(acc.std()),
        accuracy_min=float(acc.min()), accuracy_max=float(acc.max()),
        balanced_accuracy=float(bal.mean()), balanced_accuracy_std=float(bal.std()),
        per_value={v: float(a.mean()) for v, a in per.items()},
        per_value_std={v: float(a.std()) for v, a in per.items()},
        majority_baseline=float(np.mean([s.majority_baseline for s in runs])),
        n=int(runs[0].n),
    )


# --- hierarchy ---------------------------------------------------------------------------------

@dataclass
class HierarchyLevel:
    """What one clustering with k clusters follows.

    ami[a]: adjusted mutual information between the clusters and attribute a (rows labelled for a);
    purity[a]: share of rows whose cluster's majority value of a is their own value;
    follows: the attribute combination (e.g. ("skin", "gender")) whose joint values the clusters
    match best by AMI, among all combinations of the given attributes; follows_ami its AMI;
    clusters: per cluster, its size and majority value (with its share) of each attribute.
    """

    k: int
    ami: dict[str, float]
    purity: dict[str, float]
    follows: tuple[str, ...]
    follows_ami: float
    combinations: dict[str, float]
    clusters: list[dict]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["follows"] = list(self.follows)
        return d


def _joint(labels_by_attribute: dict[str, np.ndarray], names: tuple[str, ...]) -> np.ndarray:
    cols = [np.asarray(labels_by_attribute[a], object) for a in names]
    ok = np.all([is_labelled(c) for c in cols], axis=0)
    joint = np.array(["|".join(str(c[i]) for c in cols) if ok[i] else None for i in range(len(ok))],
                     dtype=object)
    return joint


def purity(cluster_ids, labels) -> float:
    """Share of labelled rows that carry their cluster's majority value."""
    labels = np.asarray(labels, object)
    keep = is_labelled(labels) & (np.asarray(cluster_ids) >= 0)
    if not keep.any():
        return float("nan")
    ids = np.asarray(cluster_ids)[keep]
    values = label_values(labels[keep])
    table = contingency(ids, labels[keep], int(ids.max()) + 1, values)
    return float(table.max(axis=1).sum() / keep.sum())


def describe_clusters(cluster_ids, labels_by_attribute: dict[str, np.ndarray],
                      n_clusters: int | None = None) -> tuple[dict, dict, list[dict]]:
    """(AMI per attribute, purity per attribute, per-cluster majority values) of one clustering."""
    from sklearn.metrics import adjusted_mutual_info_score

    ids = np.asarray(cluster_ids)
    k = n_clusters if n_clusters is not None else int(ids.max()) + 1
    ami, pur = {}, {}
    for a, labels in labels_by_attribute.items():
        labels = np.asarray(labels, object)
        keep = is_labelled(labels) & (ids >= 0)
        ami[a] = float(adjusted_mutual_info_score(labels[keep].astype(str), ids[keep])) if keep.sum() > 1 else float("nan")
        pur[a] = purity(ids, labels)
    clusters = []
    for c in range(k):
        member = ids == c
        info = {"cluster": c, "size": int(member.sum())}
        for a, labels in labels_by_attribute.items():
            labels = np.asarray(labels, object)[member]
            labels = labels[is_labelled(labels)]
            if len(labels):
                vals, counts = np.unique(labels.astype(str), return_counts=True)
                j = int(counts.argmax())
                info[a] = {"value": str(vals[j]), "share": float(counts[j] / len(labels))}
        clusters.append(info)
    return ami, pur, clusters


def follows(cluster_ids, labels_by_attribute: dict[str, np.ndarray]) -> tuple[tuple[str, ...], float, dict[str, float]]:
    """The attribute combination whose joint values the clusters match best (by AMI).

    Returns (combination, its AMI, AMI of every combination keyed "a x b").
    """
    from sklearn.metrics import adjusted_mutual_info_score

    ids = np.asarray(cluster_ids)
    names = list(labels_by_attribute)
    scores: dict[tuple[str, ...], float] = {}
    for r in range(1, len(names) + 1):
        for combo in itertools.combinations(names, r):
            joint = _joint(labels_by_attribute, combo)
            keep = is_labelled(joint) & (ids >= 0)
            if keep.sum() > 1:
                scores[combo] = float(adjusted_mutual_info_score(joint[keep].astype(str), ids[keep]))
    if not scores:
        return (), float("nan"), {}
    # Ties go to the smaller combination: the simplest explanation of the split.
    best = max(scores, key=lambda c: (round(scores[c], 9), -len(c)))
    return best, scores[best], {" x ".join(c): s for c, s in scores.items()}


def hierarchy(clusterings: dict[int, np.ndarray],
              labels_by_attribute: dict[str, np.ndarray]) -> list[HierarchyLevel]:
    """For each k of `clusterings` ({k: (n,) cluster ids}), which attribute (combination) the k
    clusters follow.

    labels_by_attribute: {attribute: (n,) str/None}. With the study's data, k=2 follows skin,
    k=4 skin x gender, k=8 skin x gender x age.
    """
    levels = []
    for k, ids in clusterings.items():
        ids = np.asarray(ids)
        ami, pur, clusters = describe_clusters(ids, labels_by_attribute, k)
        combo, combo_ami, combos = follows(ids, labels_by_attribute)
        levels.append(HierarchyLevel(k, ami, pur, combo, combo_ami, combos, clusters))
    return levels

"""Choosing, per attribute, the clustering whose named clusters best predict the confirmed labels.

The clusterings are fitted on all the project's faces, without labels. What labels decide is only
the naming: on each cross-validation fold the clusters are named from the training labels
(backend.attributes.scoring.name_clusters) and scored on the held-out labels, so a candidate (algorithm, k) is
judged on labels it was not named with. The reported accuracy of the chosen model is nested: in each
outer fold the choice itself is made again on the outer-training labels only, so the figure is not
flattered by having picked the best of several candidates on the same labels.

    sel = select(candidates, y)       # y: (m,) confirmed values of the labelled faces
    sel.chosen, sel.cv[key], sel.scores (nested held-out Scores)

The same for learners of any kind (backend.attributes.candidates), what a project's model uses:

    choice, learner = choose(factories, views, rows, y)    # learner: the COMMITTEE best, averaged
    choice.chosen, choice.cv[key], choice.scores(), learner.proba_from(views)

Why a committee and not the best alone: with a few dozen confirmations, the best of ~26 candidates by
cross-validation is mostly the luckiest (the winner's curse), and averaging the few best is steadier
than any one of them (bench/loop.py; bench/LOOP_RESULTS.md, "How the gate decides").
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from backend.attributes.candidates import CommitteeLearner
from backend.attributes.scoring import Scores, apply_names, name_clusters, score

#: Values need this many confirmations before clusters are named after them.
MIN_PER_VALUE = 2
MAX_FOLDS = 5


@dataclass
class Candidate:
    """A fitted clustering seen through the labelled faces.

    ids: (m,) cluster of each labelled face; centers: (k, d) to name clusters without labelled
    members after their nearest named neighbour; names: fixed names (a prior), else None (named from
    labels on each fold).
    """

    key: str
    k: int
    ids: np.ndarray
    centers: np.ndarray | None = None
    names: dict[int, str | None] | None = None

    def name(self, ids, y, values) -> dict[int, str | None]:
        if self.names is not None:
            return self.names
        return name_clusters(ids, y, self.k, centers=self.centers, values=values)


@dataclass
class Selection:
    chosen: str
    cv: dict[str, float]                       # plain cross-validated accuracy per candidate
    scores: Scores                             # nested held-out scores of the whole procedure
    folds: int = 0

    def to_dict(self) -> dict:
        return {"chosen": self.chosen, "cv": self.cv, "scores": self.scores.to_dict(),
                "folds": self.folds}


#: Once two values have this many confirmations, values with fewer wait (a value confirmed twice
#: among dozens would cut the cross-validation to two folds and rarely be predicted right).
SETTLED = 5


def ready_values(y, min_count: int = MIN_PER_VALUE) -> list[str]:
    """Values confirmed at least min_count times (sorted); only those with SETTLED once two have."""
    counts = Counter(str(v) for v in y if v is not None and str(v) != "")
    if sum(c >= SETTLED for c in counts.values()) >= 2:
        min_count = max(min_count, SETTLED)
    return sorted(v for v, c in counts.items() if c >= min_count)


def splits(y: np.ndarray, seed: int = 0, max_folds: int = MAX_FOLDS) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified folds (as many as the rarest value allows, at most max_folds); [] if < 2."""
    from sklearn.model_selection import StratifiedKFold

    _, counts = np.unique(y.astype(str), return_counts=True)
    n = int(min(max_folds, counts.min())) if len(counts) > 1 else 0
    if n < 2:
        return []
    return list(StratifiedKFold(n, shuffle=True, random_state=seed).split(np.zeros(len(y)), y.astype(str)))


def held_out(candidate: Candidate, y: np.ndarray, folds, values) -> np.ndarray:
    """Each labelled face's predicted value, from names given without its own label."""
    pred = np.empty(len(y), dtype=object)
    for train, test in folds:
        names = candidate.name(candidate.ids[train], y[train], values)
        pred[test] = apply_names(candidate.ids[test], names)
    return pred


def _best(candidates: list[Candidate], y: np.ndarray, values, folds) -> tuple[str, dict]:
    """(key of the best candidate by accuracy over `folds` of y, {key: accuracy}).

    Ties go to the earlier candidate: callers list simpler models first.
    """
    cv = {c.key: score(y, held_out(c, y, folds, values), values).accuracy for c in candidates}
    best = max(candidates, key=lambda c: cv[c.key])   # max keeps the first of equals
    return best.key, cv


def select(candidates: list[Candidate], y, seed: int = 0) -> Selection:
    """Pick the candidate with the best cross-validated accuracy on the confirmed labels y (m,)."""
    if not candidates:
        raise ValueError("no candidate clustering to choose from")
    y = np.asarray(y, dtype=object)
    values = ready_values(y)
    if len(values) < 2:
        raise ValueError("at least two values need confirmations before clusters can be named")
    keep = np.isin(y.astype(str), values)
    y = y[keep]
    candidates = [Candidate(c.key, c.k, np.asarray(c.ids)[keep], c.centers, c.names) for c in candidates]
    outer = splits(y, seed)
    chosen, cv = _best(candidates, y, values, outer)
    by_key = {c.key: c for c in candidates}
    pred = np.empty(len(y), dtype=object)
    for train, test in outer:
        inner = [Candidate(c.key, c.k, c.ids[train], c.centers, c.names) for c in candidates]
        inner_folds = splits(y[train], seed)
        if inner_folds:
            key, _ = _best(inner, y[train], values, inner_folds)
        else:
            # Too few labels in this outer fold to choose honestly: the simplest candidate, rather
            # than the one that best fits the very labels it is named with.
            key = candidates[0].key
        c = by_key[key]
        pred[test] = apply_names(c.ids[test], c.name(c.ids[train], y[train], values))
    return Selection(chosen, cv, score(y, pred, values), folds=len(outer))


# --- choosing among candidate learners (backend.attributes.candidates) -----------------------------

@dataclass
class Choice:
    """The learner chosen for one attribute, and the honest figures of choosing that way.

    held_out: (m, len(values)) each labelled face's probabilities from the nested procedure (the
    learner chosen on its outer-training labels, fitted on them); pred / conf: its argmax and max.
    own: (m, len(values)) the chosen model's own held-out probabilities (its learners fitted on
    each outer fold's training labels), or None: on the scale of the confidences the chosen model
    gives the project's faces, which the nested ones need not be (a fold may choose other
    learners); own_conf: their max, what a gate calibrates.
    """

    chosen: str
    cv: dict[str, float]
    values: list[str]
    y: np.ndarray
    held_out: np.ndarray
    folds: int = 0
    own: np.ndarray | None = None

    @property
    def own_conf(self) -> np.ndarray:
        return (self.own if self.own is not None else self.held_out).max(1)

    @property
    def pred(self) -> np.ndarray:
        return np.array(self.values, dtype=object)[self.held_out.argmax(1)]

    @property
    def conf(self) -> np.ndarray:
        return self.held_out.max(1)

    def scores(self) -> Scores:
        return score(self.y, self.pred, self.values)


def _fold_proba(make, V, rows, y, values, folds) -> np.ndarray:
    out = np.zeros((len(rows), len(values)))
    for train, test in folds:
        out[test] = make().fit(V, rows[train], y[train], values).predict_proba(V[rows[test]])
    return out


#: How many of the best-cross-validated learners the chosen model averages (CommitteeLearner).
COMMITTEE = 3


def choose(factories: list, views: dict[str, np.ndarray], rows, y, seed: int = 0,
           inner_max: int = 3, committee: int = COMMITTEE) -> tuple["Choice", object]:
    """Nested cross-validated choice among learners (factories: callables -> fresh Learner).

    views: {view: (n, d)} every project face; rows: (m,) the labelled faces; y: (m,) their values
    (only values with MIN_PER_VALUE confirmations take part). Outer folds score every candidate
    (plain CV); the model is the mean of the `committee` best (ties to the earlier = simpler ones;
    committee=1: the best alone). For the nested figure each outer fold chooses again by an inner
    CV of its training labels only, and the held-out face is predicted by that choice fitted on the
    outer-training labels. Returns (Choice, the chosen learners fitted on every label: one
    Learner, or a CommitteeLearner of them).
    """
    y = np.asarray(y, dtype=object)
    values = ready_values(y)
    if len(values) < 2:
        raise ValueError("at least two values need confirmations before a model can be chosen")
    keep = np.isin(y.astype(str), values)
    rows, y = np.asarray(rows)[keep], y[keep]
    learners = [f() for f in factories]
    keys = [l.key for l in learners]
    make = dict(zip(keys, factories))
    V = {k: views[l.view] for k, l in zip(keys, learners)}
    outer = splits(y, seed)
    if not outer:
        raise ValueError("too few confirmations for cross-validation")
    held = {k: _fold_proba(make[k], V[k], rows, y, values, outer) for k in keys}
    vals = np.array(values, dtype=object)
    cv = {k: float(np.mean(vals[held[k].argmax(1)] == y)) for k in keys}

    def best(accuracy: dict) -> list[str]:
        return sorted(keys, key=lambda k: -accuracy[k])[:committee]   # stable: ties keep the order

    nested = np.zeros((len(y), len(values)))
    for train, test in outer:
        inner = splits(y[train], seed, inner_max)
        if inner:
            acc = {}
            for k in keys:
                P = _fold_proba(make[k], V[k], rows[train], y[train], values, inner)
                acc[k] = float(np.mean(vals[P.argmax(1)] == y[train]))
            picks = best(acc)
        else:
            picks = keys[:1]   # too few labels to choose honestly: the simplest
        nested[test] = np.mean([held[k][test] for k in picks], axis=0)
    top = best(cv)
    fitted = [make[k]().fit(V[k], rows, y, values) for k in top]
    final = fitted[0] if len(fitted) == 1 else CommitteeLearner(fitted)
    own = np.mean([held[k] for k in top], axis=0)
    return Choice(final.key, cv, values, y, nested, len(outer), own), final

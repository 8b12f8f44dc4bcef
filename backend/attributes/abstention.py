"""When to show a value: the attribute's gate, and the per-face threshold, from held-out predictions.

    prevalence = population_prevalence(values, confirmed, predicted, strata, labelled)
    gate = Gate.fit(choice.y, choice.pred,    # right or wrong: the nested CV's held-out predictions
                    choice.own_conf,          # confidence: the chosen model's own held-out fits
                    prevalence=prevalence)    # the values' shares among the faces
    gate.open, gate.threshold, gate.cut, gate.calibrated(conf)
    gate.show(conf)          # (m,) bool: open and conf >= gate.cut (the threshold, on raw confidence)

An attribute is pre-annotated only while its chosen model beats always guessing the commonest value
*of the project's faces* with confidence: among the held-out faces it would show (raw confidence
>= t), the one-sided lower Wilson bound (95 %) of the share right must exceed the majority rate,
the larger of the confirmations' and the faces' estimated one (population_prevalence). A teaching
order that balances the values makes the confirmations a balanced sample: glasses 5 no / 3 yes
confirmed (62.5 %) of faces that were 71 % "no", and a model with 6 of 8 held-out faces right was
shown at 57.5 % right. So each held-out face is weighted by its value's estimated share among the
faces over its share among the confirmations (importance weights: the accuracy estimates the
faces', not the balanced sample's) and the bound is taken on Kish's effective number of faces.
A threshold needs MIN_SHOWN held-out faces; where their weights make them fewer effective ones, the
bound is the wider Z_THIN. With confirmations drawn as a random sample the weights are about 1 and
the gate is as before.

The faces' shares (population_prevalence): confirmed faces by their values; the others by their
diversity cluster's confirmed shares (post-stratification over the clusters the teaching order
walks), or the chosen model's prediction in a cluster without confirmations; a cluster counts as
much as its labelled faces carry the attribute (age only on some photos).

Of the thresholds t that pass, the one kept maximises right minus WRONG_COST x wrong shown values
over the (weighted) held-out faces (a wrong value a labeler accepts costs more than a right one
saves), so a value is shown only where the model is about WRONG_COST / (1 + WRONG_COST) sure or
better. The calibrated probability (isotonic regression of held-out correctness on confidence,
weighted alike) is the score Label Studio shows beside the value; the threshold is kept on that
scale. On the raw confidences of the project's faces it becomes a cut (Gate.cut): midway between
the least sure held-out face it shows and the surest one it does not, and no lower than the least
sure held-out face (nothing shown where the model is less sure than on any face it was checked on).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import numpy as np

#: z of the one-sided 95 % bound.
Z = 1.645
#: z of the bound (one-sided 97.5 %) where a threshold's MIN_SHOWN or more held-out faces are,
#: weighted, fewer effective ones. Twelve faces whose values' estimated shares differ from the
#: confirmed ones in the fourth digit are 11.9999 effective ones: excluding them kept skin shut on
#: 12 of 12 right held out; judging them by Z let glasses open on 10 of 12 right and be shown below
#: its majority. This bound opens the first (0.76 against 58 %) and not the second (0.55 against
#: 59 %). Not for every threshold: that shut glasses at 64 tasks on bench/loop.py's collection,
#: shown 97.6 % right (figures: bench/LOOP_RESULTS.md, "How the gate decides").
Z_THIN = 1.96
#: What a wrong value a labeler accepts costs, in right values. 3 (show only where ~75 % sure) left
#: age at 64 confirmations shown on 61 % of the faces at 95.5 % right; 2 (~67 % sure) shows it on
#: 74 % at 93.9 % (offline replay of bench/loop.py, before the midway cut: bench/LOOP_RESULTS.md,
#: "How the gate decides").
WRONG_COST = 2.0
#: Held-out faces a threshold must keep before its bound means anything. A teaching
#: order's confirmations are no random sample (typical faces, likely faces of rare values), so on
#: a dozen of them the held-out accuracy flatters: on two of ten replayed subsets of the loop's
#: photos glasses opened at 32 tasks on 12 confirmed (83 % right held out, majority estimated at
#: 58-59 %) and was shown 54-57 % right where 73 % of the faces are "no". 6 and 8 let that through;
#: 12 keeps every replayed round of both orders above its majority (bench/LOOP_RESULTS.md).
#: Counted in faces; where their weights make them fewer effective ones, the bound is Z_THIN.
MIN_SHOWN = 12


def wilson_lower(right: float, n: float, z: float = Z) -> float:
    """One-sided lower Wilson score bound of a binomial proportion (0 when n = 0); right and n may
    be effective (weighted) counts."""
    if n <= 0:
        return 0.0
    p = right / n
    centre = p + z * z / (2 * n)
    margin = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - margin) / (1 + z * z / n))


@dataclass
class Gate:
    open: bool = False
    threshold: float = 1.0                 # on the calibrated scale
    majority: float = 0.0
    accuracy: float | None = None          # held-out, all faces
    shown_accuracy: float | None = None    # held-out, the faces above the threshold
    coverage: float = 0.0                  # held-out share above the threshold
    lower_bound: float = 0.0
    n: int = 0
    curve_x: list[float] = field(default_factory=list)   # isotonic calibration knots
    curve_y: list[float] = field(default_factory=list)

    def calibrated(self, conf) -> np.ndarray:
        conf = np.asarray(conf, np.float64)
        if not self.curve_x:
            return np.zeros_like(conf)
        return np.interp(conf, self.curve_x, self.curve_y)

    @property
    def cut(self) -> float | None:
        """The raw confidence a face needs to be shown (None while closed): the threshold carried
        from the held-out faces' calibrated levels to their confidences (_cut)."""
        if not self.open or not self.curve_x:
            return None
        return _cut(np.asarray(self.curve_x), np.asarray(self.curve_y), self.threshold)

    def show(self, conf) -> np.ndarray:
        """(m,) bool: which faces get their value shown: open and raw confidence >= cut."""
        conf = np.asarray(conf, np.float64)
        cut = self.cut
        return conf >= cut if cut is not None else np.zeros(conf.shape, bool)

    @classmethod
    def fit(cls, y, pred, conf, wrong_cost: float = WRONG_COST, prevalence=None,
            min_shown: float = MIN_SHOWN) -> "Gate":
        """y, pred, conf: (m,) the held-out confirmations, predictions and raw confidences.
        prevalence: {value: estimated share among the project's faces} (population_prevalence), or
        None to judge by the confirmations alone (as if they were a random sample of the faces)."""
        from sklearn.isotonic import IsotonicRegression

        y, pred = np.asarray(y, dtype=object), np.asarray(pred, dtype=object)
        conf = np.asarray(conf, np.float64)
        n = len(y)
        if n == 0:
            return cls()
        right = (y == pred).astype(float)
        values, inverse, counts = np.unique(y.astype(str), return_inverse=True, return_counts=True)
        majority = float(counts.max() / n)
        weight = np.ones(n)
        if prevalence:
            # A teaching order balances the values among the confirmations: their majority rate
            # under-states the project's (glasses 5 no / 3 yes confirmed, 71 % "no" among the faces)
            # and their accuracy is a balanced sample's. Judge against the larger of the two
            # majorities, and weight each held-out face by its value's share among the faces over
            # its share among the confirmations, so the accuracy estimates the faces' accuracy.
            share = np.array([float(prevalence.get(v, 0.0)) for v in values])
            if share.sum() > 0:
                share = share / share.sum()
                majority = max(majority, float(share.max()))
                weight = (share / (counts / n))[inverse]
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(
            conf, right, sample_weight=weight)
        # Rounded: weighted means of equal values differ in the last bits, which would split one
        # calibrated level (1.0 and 0.9999999999999999) into two thresholds.
        cal = np.round(iso.predict(conf), 12)
        knots = np.unique(conf)
        gate = cls(majority=majority, accuracy=float(np.average(right, weights=weight)), n=n,
                   curve_x=[float(x) for x in knots],
                   curve_y=[float(v) for v in np.round(iso.predict(knots), 12)])
        best = None
        # Thresholds on the calibrated scale: show faces whose calibrated probability >= t.
        for t in np.unique(cal):
            shown = cal >= t - 1e-12
            if shown.sum() < min_shown:
                continue
            w = weight[shown]
            # Weighted share right over Kish's effective number of faces: unequal weights carry
            # less evidence than as many equal ones (equal weights: k right of m, as before); fewer
            # effective faces than min_shown are judged by the wider bound.
            p, m_eff = float(np.average(right[shown], weights=w)), float(w.sum() ** 2 / (w * w).sum())
            lb = wilson_lower(p * m_eff, m_eff, Z if m_eff >= min_shown - 1e-9 else Z_THIN)
            if lb <= majority:
                continue
            k, m = float((w * right[shown]).sum()), float(w.sum())     # in faces' units
            utility = k - wrong_cost * (m - k)
            if best is None or utility > best[0]:
                best = (utility, float(t), p, m / weight.sum(), lb)
        if best is not None and best[0] > 0:
            _, gate.threshold, gate.shown_accuracy, gate.coverage, gate.lower_bound = best
            gate.open = True
        return gate

    def to_dict(self) -> dict:
        return {"open": self.open, "threshold": self.threshold, "majority": self.majority,
                "accuracy": self.accuracy, "shown_accuracy": self.shown_accuracy,
                "coverage": self.coverage, "lower_bound": self.lower_bound, "n": self.n,
                "curve_x": self.curve_x, "curve_y": self.curve_y}

    @classmethod
    def from_dict(cls, d: dict | None) -> "Gate":
        # Only the fields a gate has: a stored key it no longer has (a derived `cut` was stored
        # for a while) is not a reason to fail loading the project's model.
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names}) if d else cls()


def _cut(knots: np.ndarray, levels: np.ndarray, threshold: float) -> float:
    """The raw confidence from which faces are shown, given the held-out confidences (knots, sorted)
    and their calibrated levels: midway between the least sure held-out face whose level clears
    the threshold and the surest one below it. The held-out faces say nothing about where in that
    gap the cut lies, and its middle is the choice that assumes least (a decision stump's); the
    calibration curve, interpolated, would put it at the gap's top. With none below, the least sure
    held-out face: no value is shown where the model is less sure than on any face it was checked on.
    Replayed (bench/loop_replay.py), as many right values as the curve's cut, 12 % fewer wrong ones.
    """
    above = levels >= threshold - 1e-12
    low = float(knots[above].min())
    below = knots[knots < low]
    return (float(below.max()) + low) / 2 if len(below) else low


def population_prevalence(values, confirmed, predicted, strata=None, labelled=None) -> dict:
    """{value: estimated share among the project's faces that carry the attribute}.

    values: the gate's values; confirmed: (n,) each face's confirmed value or None; predicted: (n,)
    the chosen model's value for every face; strata: (n,) a label-free clustering of the faces;
    labelled: (n,) bool, faces of tasks someone labelled (any attribute).

    A confirmed face counts with its value. An unconfirmed one counts by its cluster's confirmed
    shares (post-stratification: the teaching order spreads the confirmations over these clusters,
    so each cluster's share of the faces, not of the confirmations, decides), or by the model's
    predicted value in a cluster without confirmations. With strata each unconfirmed face counts as
    much as its cluster's labelled faces carry this attribute (one only some photos have, e.g. age
    in one source, is judged on faces like those); a labelled face without it not at all.
    """
    values = [str(v) for v in values]
    confirmed = np.asarray(confirmed, dtype=object)
    ok = np.array([c is not None and str(c) in values for c in confirmed])
    predicted = np.asarray(predicted, dtype=object).astype(str)
    weight = np.ones(len(confirmed))
    if strata is not None and labelled is not None:
        strata, labelled = np.asarray(strata), np.asarray(labelled, bool) | ok
        weight = np.zeros(len(confirmed))
        for c in np.unique(strata):
            mine = strata == c
            if (mine & labelled).any():
                weight[mine & ~labelled] = (mine & ok).sum() / (mine & labelled).sum()
            else:
                weight[mine] = ok.sum() / max(1, labelled.sum())
    weight[ok] = 0.0
    confirmed_counts = np.array([np.sum(confirmed[ok].astype(str) == v) for v in values], float)
    # The unconfirmed faces of a cluster with confirmations count by their shares (post-
    # stratification: a design-based estimate, no model bias); of a cluster without, by the
    # model's predictions.
    onehot = (predicted[:, None] == np.array(values, dtype=object)[None, :]).astype(float)
    if strata is not None:
        for c in np.unique(strata):
            mine = strata == c
            if (mine & ok).any():
                share = np.array([np.sum(confirmed[mine & ok].astype(str) == v) for v in values], float)
                onehot[mine] = share / share.sum()
    rest = weight.sum()
    p_rest = (weight[:, None] * onehot).sum(0) / rest if rest > 0 else np.zeros(len(values))
    total = confirmed_counts + rest * p_rest
    if total.sum() <= 0:
        return {}
    return {v: float(t / total.sum()) for v, t in zip(values, total)}

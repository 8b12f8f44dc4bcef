"""When to show a value: the attribute's gate, and the per-face threshold, from held-out predictions.

    gate = Gate.fit(choice.y, choice.pred, choice.conf)     # the nested CV's held-out predictions
    gate.open, gate.threshold, gate.calibrated(conf)        # show a face's value iff open and
                                                            # calibrated(conf) >= gate.threshold

An attribute is pre-annotated only while its chosen model beats always guessing the commonest value
*with confidence*: among the held-out faces it would show (raw confidence >= t), the one-sided
lower Wilson bound (95 %) of the share right must exceed the majority rate of the confirmations.
Of the thresholds t that pass, the one kept maximises right minus WRONG_COST x wrong shown values
over the held-out faces (a wrong value a labeler accepts costs more than a right one saves), so a
value is shown only where the model is about WRONG_COST / (1 + WRONG_COST) sure or better. The
calibrated probability (isotonic regression of held-out correctness on confidence) is the score
Label Studio shows beside the value; the threshold is kept on that scale.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

#: z of the one-sided 95 % bound.
Z = 1.645
WRONG_COST = 3.0
#: Held-out faces a threshold must keep before its bound means anything.
MIN_SHOWN = 6


def wilson_lower(right: int, n: int, z: float = Z) -> float:
    """One-sided lower Wilson score bound of a binomial proportion (0 when n = 0)."""
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

    def show(self, conf) -> np.ndarray:
        """(m,) bool: which faces get their value shown."""
        return self.open & (self.calibrated(conf) >= self.threshold - 1e-12)

    @classmethod
    def fit(cls, y, pred, conf, wrong_cost: float = WRONG_COST) -> "Gate":
        from sklearn.isotonic import IsotonicRegression

        y, pred = np.asarray(y, dtype=object), np.asarray(pred, dtype=object)
        conf = np.asarray(conf, np.float64)
        n = len(y)
        if n == 0:
            return cls()
        right = (y == pred).astype(float)
        _, counts = np.unique(y.astype(str), return_counts=True)
        majority = float(counts.max() / n)
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(conf, right)
        cal = iso.predict(conf)
        knots = np.unique(conf)
        gate = cls(majority=majority, accuracy=float(right.mean()), n=n,
                   curve_x=[float(x) for x in knots], curve_y=[float(v) for v in iso.predict(knots)])
        best = None
        # Thresholds on the calibrated scale: show faces whose calibrated probability >= t.
        for t in np.unique(cal):
            shown = cal >= t - 1e-12
            k, m = int(right[shown].sum()), int(shown.sum())
            if m < MIN_SHOWN:
                continue
            lb = wilson_lower(k, m)
            if lb <= majority:
                continue
            utility = k - wrong_cost * (m - k)
            if best is None or utility > best[0]:
                best = (utility, float(t), k / m, m / n, lb)
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
        return cls(**d) if d else cls()

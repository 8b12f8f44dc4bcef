"""The order to label in: which faces' confirmations teach the models most, first.

    scores = teaching_scores(cluster_ids, centrality, uncertainty, labelled)   # (n,) in [0, 1]

The score is what the Data Manager sorts on (highest first). Two aims, in this order:
  * diversity: every region of the faces gets labels early and evenly. The faces are split by a
    label-free clustering finer than any attribute (backend.attributes.project_model.DIVERSITY_K);
    each face gets a slot = (labelled faces of its cluster) + (its place among the cluster's
    unlabelled faces). Sorting by slot deals the faces out round-robin over the clusters, the
    least-labelled clusters first, so the next N tasks cover as many clusters as they can before
    any cluster gets a second one.
  * uncertainty: within a cluster, and so between faces of one slot, the face the models are least
    sure of comes first (uncertainty: mean over attributes with a model of 1 - the margin between
    the two likeliest values), the face most likely of a value with few confirmations yet (value
    need: every value gets confirmed early) and the most typical of its cluster (centrality: a
    cluster is first named from its most typical face) first.
"""
from __future__ import annotations

import numpy as np

#: Weights, within a cluster, of centrality, uncertainty and value need beside each other.
CENTRALITY_WEIGHT = 1.0
UNCERTAINTY_WEIGHT = 0.5
NEED_WEIGHT = 1.0


def uncertainty(probas: list[np.ndarray], n: int) -> np.ndarray:
    """(n,) mean over the given (n, c) probability matrices of 1 - (p1 - p2); 0 without any."""
    if not probas:
        return np.zeros(n)
    out = np.zeros(n)
    for P in probas:
        top = np.sort(P, axis=1)
        out += 1.0 - (top[:, -1] - (top[:, -2] if P.shape[1] > 1 else 0.0))
    return out / len(probas)


def value_need(probas: list[np.ndarray], counts: list[np.ndarray], n: int) -> np.ndarray:
    """(n,) mean over attributes of how rarely the face's likeliest value is confirmed yet:
    1 - its confirmations / the commonest value's (counts: per attribute, (c,) per value)."""
    if not probas:
        return np.zeros(n)
    out = np.zeros(n)
    for P, c in zip(probas, counts):
        c = np.asarray(c, float)
        out += 1.0 - c[P.argmax(1)] / max(c.max(), 1.0)
    return out / len(probas)


def teaching_scores(cluster_ids, centrality, uncertainty_, labelled, need=None) -> np.ndarray:
    """(n,) scores, 1 for the first face to label; labelled faces score 0.

    cluster_ids: (n,) a label-free clustering of the faces; centrality: (n,) 0..1 within the
    cluster (1 = most typical); uncertainty_: (n,) 0..1; labelled: (n,) bool; need: (n,) 0..1
    (value_need), or None.
    """
    ids = np.asarray(cluster_ids)
    cen, unc = np.asarray(centrality, float), np.asarray(uncertainty_, float)
    labelled = np.asarray(labelled, bool)
    n = len(ids)
    priority = UNCERTAINTY_WEIGHT * unc + CENTRALITY_WEIGHT * cen
    if need is not None:
        priority = priority + NEED_WEIGHT * np.asarray(need, float)
    slot = np.full(n, np.inf)
    for c in np.unique(ids):
        members = np.flatnonzero((ids == c) & ~labelled)
        done = int(((ids == c) & labelled).sum())
        ranked = members[np.lexsort((members, -priority[members]))]
        slot[ranked] = done + np.arange(len(ranked))
    todo = np.flatnonzero(~labelled)
    order = todo[np.lexsort((todo, -priority[todo], slot[todo]))]
    scores = np.zeros(n)
    if len(order):
        scores[order] = 1.0 - np.arange(len(order)) / len(order)
    return scores

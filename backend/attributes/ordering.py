"""The order to label in: which faces' confirmations teach the models most, first.

    scores = teaching_scores(cluster_ids, centrality, uncertainty, labelled)   # (n,) in [0, 1]

The score is what the Data Manager sorts on (highest first). Two aims, in this order:
  * diversity: every region of the faces gets labels early and evenly, at every level of their
    structure. The faces are split by a label-free clustering finer than any attribute
    (backend.attributes.project_model.DIVERSITY_K), whose cluster centres are joined into a tree
    (Ward). Each next face is found by walking down from the root, always into the branch with
    fewer labels so far (labelled and already placed, per face of the branch), so
    the top split (skin, in the seed study's hierarchy) is balanced first, then the next (gender),
    and so on: the first tasks hold every value of any attribute that follows the tree before any
    value comes twice; every cluster gets one before any gets two, then they share in proportion.
  * within a cluster, and so between faces of one slot: a systematic sample of the cluster
    (its most typical face, then its median one, then the quartiles... by distance to its centre:
    `systematic`), so a cluster's labels span it as a random sample's would, plus value need (the
    face most likely of a value with few confirmations yet, over attributes with a model: every
    value gets confirmed early). Starting at the most typical face names each cluster from a
    clear example, but tilts the first labels towards well-imaged faces: on bench/loop.py's
    collection the most typical eighth of the clusters is 38 % UTK photos (50 % overall), so age
    and skin, which only those carry, got fewer confirmations early on ten replayed datasets
    (12-16 in 32 tasks; on ten more, as many as a random order). Starting at the median face did
    worse; the densest face first, or kernel herding, fewer cells behind random on the datasets
    they were tried on but not clearly on new ones (bench/LOOP_RESULTS.md, "Tried and not adopted").
    Measured on bench/loop.py (bench/LOOP_RESULTS.md): picking the faces the models are
    least sure of first (uncertainty, now weight 0) gave the attributes held-out folds of hard faces
    only, so their gates judged them by the hardest faces and stayed shut (age at 64 tasks: 16/16
    confirmations, 69 % held out, silent, where random's 14/17 opened at 81 %); the faces at the
    centre only (centrality alone) under-collected rare values (glasses). `uncertainty` stays
    available for other weights.
"""
from __future__ import annotations

import numpy as np

#: Weights, within a cluster, of the systematic rank, uncertainty and value need.
CENTRALITY_WEIGHT = 1.0
UNCERTAINTY_WEIGHT = 0.0
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


def _van_der_corput(j: int) -> float:
    """j-th point of the base-2 van der Corput sequence in [0, 1): 0, .5, .25, .75, .125..."""
    out, f = 0.0, 0.5
    while j:
        out += f * (j & 1)
        j >>= 1
        f /= 2
    return out


def systematic(cluster_ids, centrality) -> np.ndarray:
    """(n,) 0..1 per face: 1 for its cluster's most typical face, then the faces a systematic
    sample of the cluster takes next (its median face, then the quartiles, ...): a cluster's labels
    spread over it from centre to edge, as a random sample's would, without chance."""
    ids, cen = np.asarray(cluster_ids), np.asarray(centrality, float)
    out = np.zeros(len(ids))
    for c in np.unique(ids):
        members = np.flatnonzero(ids == c)
        ranked = members[np.lexsort((members, -cen[members]))]    # most typical first
        m = len(ranked)
        taken, seq, j = np.zeros(m, bool), [], 0
        while len(seq) < m:
            pos = int(_van_der_corput(j) * m)
            j += 1
            while taken[pos]:
                pos = (pos + 1) % m
            taken[pos] = True
            seq.append(pos)
        out[ranked[seq]] = 1.0 - np.arange(m) / m
    return out


def _tree(centers: np.ndarray):
    """Ward tree over the clusters: {node: (left, right)} and the root (leaves are 0..k-1)."""
    from scipy.cluster.hierarchy import linkage

    k = len(centers)
    if k < 2:
        return {}, 0
    Z = linkage(np.asarray(centers, np.float64), method="ward")
    children = {k + i: (int(a), int(b)) for i, (a, b, _, _) in enumerate(Z)}
    return children, 2 * k - 2


def teaching_scores(cluster_ids, centrality, uncertainty_, labelled, need=None,
                    centers=None) -> np.ndarray:
    """(n,) scores, 1 for the first face to label; labelled faces score 0.

    cluster_ids: (n,) a label-free clustering of the faces (k clusters); centrality: (n,) 0..1
    within the cluster (1 = most typical); uncertainty_: (n,) 0..1; labelled: (n,) bool; need:
    (n,) 0..1 (value_need) or None; centers: (k, d) the clusters' centres (the tree), or None
    for a flat round-robin.
    """
    ids = np.asarray(cluster_ids)
    cen, unc = np.asarray(centrality, float), np.asarray(uncertainty_, float)
    labelled = np.asarray(labelled, bool)
    n = len(ids)
    k = int(ids.max()) + 1 if n else 0
    # Equal ranks in different clusters (each one's most typical face...) go to the more typical.
    cen = systematic(ids, cen) + 1e-6 * cen
    priority = UNCERTAINTY_WEIGHT * unc + CENTRALITY_WEIGHT * cen
    if need is not None:
        priority = priority + NEED_WEIGHT * np.asarray(need, float)
    queues = {}
    for c in range(k):
        members = np.flatnonzero((ids == c) & ~labelled)
        queues[c] = list(members[np.lexsort((members, -priority[members]))])
    if centers is not None and k >= 2:
        children, root = _tree(np.asarray(centers)[:k])
    else:   # flat: every cluster a child of one root
        children, root = {k: tuple(range(k))}, k
    size, count, left = {}, {}, {}

    def fill(node):
        if node < k:
            size[node] = float((ids == node).sum())
            count[node] = float((labelled & (ids == node)).sum())
            left[node] = len(queues[node])
        else:
            for ch in children[node]:
                fill(ch)
            size[node] = sum(size[ch] for ch in children[node])
            count[node] = sum(count[ch] for ch in children[node])
            left[node] = sum(left[ch] for ch in children[node])
    fill(root)
    order = []
    while left.get(root, 0) > 0:
        node, path = root, [root]
        while node >= k or node not in queues:
            options = [ch for ch in children[node] if left[ch] > 0]
            # Fewest labels per face (a branch without any first); ties to the branch whose best
            # face ranks higher.
            node = min(options, key=lambda ch: (count[ch] / max(size[ch], 1.0),
                                                -_best(ch, children, queues, k, priority)))
            path.append(node)
        order.append(queues[node].pop(0))
        for p in path:
            count[p] += 1
            left[p] -= 1
    scores = np.zeros(n)
    if order:
        scores[np.array(order)] = 1.0 - np.arange(len(order)) / len(order)
    return scores


def _best(node, children, queues, k, priority) -> float:
    """The priority of the best face left under a node (queues are sorted best first)."""
    if node < k:
        return priority[queues[node][0]] if queues[node] else -np.inf
    return max(_best(ch, children, queues, k, priority) for ch in children[node])

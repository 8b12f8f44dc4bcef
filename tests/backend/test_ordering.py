"""The teaching order: every cluster (and so every value it stands for) before any repeats, the
least-labelled clusters first; within a cluster a systematic sample from its most typical face
outwards, faces of values with few confirmations first."""
import numpy as np

from backend.attributes.ordering import teaching_scores, uncertainty, value_need
from backend.attributes.project_model import Clusterings, fit_project
from backend.labeling_config import parse

from tests.backend.helpers import TWO_ATTRIBUTES


def test_round_robin_over_clusters_least_labelled_first():
    ids = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    cen = np.array([0.2, 0.9, 0.5, 0.1, 0.3, 0.8, 0.6, 0.4, 0.7])
    labelled = np.zeros(9, bool)
    labelled[[6]] = True                     # cluster 2 has a label already
    s = teaching_scores(ids, cen, np.zeros(9), labelled)
    order = list(np.argsort(-s, kind="stable"))
    assert s[6] == 0.0 and order[-1] == 6
    # The most typical face of clusters 0 and 1 (no label yet), then cluster 2's, then the
    # second faces of 0 and 1 (their median ones), then the last ones (every cluster then has as
    # many labels: equal ranks go to the more typical face).
    assert order[:8] == [1, 5, 8, 2, 4, 7, 0, 3]


def test_the_tree_balances_the_top_split_first():
    """Clusters 0, 1 close together (one branch), 2 and 3 the other: the first two picks take one
    of each branch, whichever clusters hold the most typical faces."""
    centers = np.array([[0.0, 0.0], [0.0, 1.0], [10.0, 0.0], [10.0, 1.0]])
    ids = np.repeat(np.arange(4), 3)
    cen = np.array([0.9, 0.8, 0.7, 0.95, 0.6, 0.5, 0.1, 0.2, 0.3, 0.4, 0.35, 0.3])
    s = teaching_scores(ids, cen, np.zeros(12), np.zeros(12, bool), centers=centers)
    first = np.argsort(-s, kind="stable")
    assert ids[first[0]] == 1 and ids[first[1]] in (2, 3)       # 1 holds the best face (0.95)
    assert sorted(ids[first[:4]]) == [0, 1, 2, 3]


def test_uncertainty_and_value_need():
    P = [np.array([[0.5, 0.5], [1.0, 0.0]])]
    np.testing.assert_allclose(uncertainty(P, 2), [1.0, 0.0])
    # value 0 confirmed 10 times, value 1 twice: a face likely of value 1 is needed more.
    np.testing.assert_allclose(value_need([np.array([[0.9, 0.1], [0.2, 0.8]])], [[10, 2]], 2), [0.0, 0.8])


def test_the_order_covers_every_value_before_repeating_one():
    """Four planted groups = four values of an attribute; before any label and after a few, the
    first tasks in score order hold every value once before any value comes twice."""
    rng = np.random.default_rng(2)
    n = 80
    centres = rng.normal(0, 1, (4, 128)) * 0.4
    group = np.arange(n) % 4
    X = centres[group] + rng.normal(0, 0.03, (n, 128))
    keys = [f"{i}:0" for i in range(n)]
    config = parse(TWO_ATTRIBUTES)
    labels = {}
    for round_ in range(3):
        model = fit_project({"vector": X}, labels, config, Clusterings(n_faces=n), keys=keys)
        faces = model.predict({"vector": X}, keys)
        ranks = np.array([f.rank for f in faces])
        labelled = np.array([labels.get("gender", np.full(n, None))[i] is not None for i in range(n)])
        todo = [i for i in np.argsort(-ranks, kind="stable") if not labelled[i]]
        assert sorted(group[todo[:4]]) == [0, 1, 2, 3], round_
        # The labeler confirms the next four (their groups' values stand in for any attribute).
        y = labels.get("gender", np.full(n, None, dtype=object)).copy()
        for i in todo[:4]:
            y[i] = "male" if group[i] < 2 else "female"
        labels = {"gender": y}


def test_systematic_spreads_a_cluster_from_centre_to_edge():
    """Within a cluster the most typical face comes first, then the median one, then the
    quartiles: the first labels of a cluster span it as a random sample would, not only its centre
    (nor only its unsure edge)."""
    from backend.attributes.ordering import systematic

    ids = np.zeros(8, int)
    cen = np.linspace(1.0, 0.0, 8)          # face 0 the most typical, face 7 the least
    s = systematic(ids, cen)
    order = list(np.argsort(-s, kind="stable"))
    assert order[0] == 0 and order[1] == 4 and sorted(order[2:4]) == [2, 6]
    assert sorted(order) == list(range(8))
    # Per cluster: a second cluster's ranks do not depend on the first's.
    ids2 = np.array([0] * 8 + [1] * 4)
    s2 = systematic(ids2, np.concatenate([cen, [0.9, 0.1, 0.5, 0.3]]))
    np.testing.assert_allclose(s2[:8], s)
    assert list(np.argsort(-s2[8:], kind="stable"))[:2] == [0, 3]   # most typical, then median


def test_within_a_cluster_the_order_is_systematic_not_edge_first():
    """With uncertainty at its edge (the usual case: unsure faces lie between clusters), the
    second label of a cluster is still its median face, not its least typical one."""
    ids = np.zeros(9, int)
    cen = np.linspace(1.0, 0.0, 9)
    unc = 1.0 - cen
    s = teaching_scores(ids, cen, unc, np.zeros(9, bool))
    order = list(np.argsort(-s, kind="stable"))
    assert order[:2] == [0, 4], order

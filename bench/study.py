"""Benchmark: the seed study's experiments on the labelled dev photos, our figures beside the study's.

    python3 bench/study.py [--vectors /tmp/subdisc-dev/dev_vectors.npz] [--faces ../shared/faces/dev]

Needs a vectors file of the dev photos (`subdisc embed --fallback --list DEV/labels.csv --out
FILE.npz`). Prints: extra-class (Table 1) on the balanced UTK groups, the study's single-skin
tests, the hierarchy, the supervised ceiling, the label-efficiency curve and our bar (clusters named
with 20 labels within 2 points of the ceiling), LFW rows (gender, glasses, smiling, emotion),
intra-class per identity (LFW happiness vs neutral and smiling, several views of the face; Yale
glasses and emotion), and the section-5 holdout (K-Means and MoG). Writes an HTML/Markdown/JSON
report of the UTK study into --out.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.attributes import study  # noqa: E402
from backend.attributes.report import (efficiency_table, extra_table, format_text, hierarchy_table,  # noqa: E402
                            holdout_table, intra_table, pct, write_report)
from backend.attributes.scoring import apply_names, name_clusters, score  # noqa: E402

#: The study's Table 1 averages (its 200-image set), by (k, attribute, value).
PAPER_TABLE1 = {
    (2, "skin", "dark"): 0.990, (2, "skin", "pale"): 1.000,
    (4, "skin", "dark"): 0.990, (4, "skin", "pale"): 0.994,
    (4, "gender", "male"): 1.000, (4, "gender", "female"): 0.990,
    (8, "gender", "male"): 0.994, (8, "gender", "female"): 0.986,
    (8, "skin", "dark"): 0.986, (8, "skin", "pale"): 0.990,
    (8, "age_group", "young"): 0.910, (8, "age_group", "old"): 0.832,
}
#: The study's first extra-class tests (100 images, k=2, one skin tone for gender and age).
PAPER_FIRST = {"skin": 0.993, "gender": 0.993, "age_group": 0.941}
#: Table 2, happy vs neutral (three identities) and Table 3 glasses (three identities).
PAPER_HAPPY_NEUTRAL = [0.750, 0.440, 1.000]
PAPER_GLASSES = [0.480, 0.880, 0.900]

UTK_ATTRS = ["skin", "gender", "age_group"]


def show(title: str, table) -> None:
    print(f"\n=== {title}\n{format_text(table)}", flush=True)


def paper_beside_table1(extra) -> tuple[list[str], list[list[str]]]:
    header = ["k", "cluster content", "ours (mean of runs)", "spread", "balanced", "majority", "study"]
    rows = []
    for k in extra.ks:
        for a in extra.attributes:
            s = extra.summaries[k][a]
            for v in extra.scores[k][a][0].values:
                paper = PAPER_TABLE1.get((k, a, v))
                rows.append([str(k), f"{a}={v}", pct(s.per_value[v]), pct(s.per_value_std[v]), "", "",
                             pct(paper) if paper is not None else "-"])
            rows.append([str(k), f"{a} (all {s.n})", pct(s.accuracy), pct(s.accuracy_std),
                         pct(s.balanced_accuracy), pct(s.majority_baseline), ""])
    return header, rows


def _split_named(X, y, parent_k: int):
    """(ids, names) of the hierarchy split below parent_k groups, named with all labels y."""
    from backend.attributes.clustering import make_clusterer

    ids = make_clusterer("residual", len(study.label_values(y)), random_state=0, parent_k=parent_k).fit(X).labels_
    return ids, name_clusters(ids, y, int(ids.max()) + 1)


def single_skin_tests(faces, runs: int) -> tuple[list[str], list[list[str]]]:
    """The study's first tests: skin on everyone; gender and age within one skin tone; k=2."""
    header = ["test", "rows", "ours k=2", "balanced", "majority", "study"]
    rows = []
    utk = faces.complete(UTK_ATTRS)
    r = study.extra_class(utk.X, {"skin": utk.column("skin")}, ks=(2,), runs=runs)
    s = r.summaries[2]["skin"]
    rows.append(["skin, all", str(s.n), pct(s.accuracy), pct(s.balanced_accuracy),
                 pct(s.majority_baseline), pct(PAPER_FIRST["skin"])])
    subsets = [(attr, f"{tone} only", utk.column("skin") == tone)
               for attr in ("gender", "age_group") for tone in ("pale", "dark")]
    # Gender is the bigger split inside one skin tone, so age needs one gender too.
    subsets += [("age_group", f"{tone} {g} only", (utk.column("skin") == tone) & (utk.column("gender") == g))
                for tone in ("pale", "dark") for g in ("female", "male")]
    for attr, what, keep in subsets:
        sub = utk.subset(keep)
        r = study.extra_class(sub.X, {attr: sub.column(attr)}, ks=(2,), runs=runs)
        s = r.summaries[2][attr]
        rows.append([f"{attr}, {what}", str(s.n), pct(s.accuracy), pct(s.balanced_accuracy),
                     pct(s.majority_baseline), pct(PAPER_FIRST[attr])])
    return header, rows


def configs_against_ceiling(X, labels, ceilings, draws: int, n_labels: int = 20):
    """Clusters named from n_labels random labels, for several clusterers and preprocessings
    (best of k = number of values, 4, 8, 16 with majority naming; and the label-chosen hierarchy
    split), beside the ceiling. Returns the table and the best method per attribute."""
    configs = [("kmeans", "none"), ("kmeans", "l2"), ("kmeans", "center-l2"), ("kmeans", "whiten"),
               ("kmeans++", "none"), ("gmm", "none"), ("agglomerative", "none")]
    header = ["attribute", "ceiling"] + [f"{a}/{p}" for a, p in configs] + ["hierarchy split", "... l2"]
    rows, best = [], {}
    for attr, y in labels.items():
        row = [attr, pct(ceilings[attr].accuracy)]
        for i, (algo, pre) in enumerate(configs):
            eff = study.label_efficiency(X, y, ns=(n_labels,), draws=draws, ks=(None, 4, 8, 16), algo=algo,
                                         preprocess=pre, baselines=False, attribute=attr,
                                         levels=(1, 2, 4, 8) if i == 0 else ())
            cells = {m: eff.mean(m, n_labels) for m in eff.curves if m.startswith("clusters")}
            m = max(cells, key=cells.get)
            row.append(f"{pct(cells[m])} ({m.split('=')[1]})")
            if cells[m] > best.get(attr, ("", -1))[1]:
                best[attr] = (f"{algo}/{pre} {m}", cells[m])
            if i == 0:
                split = eff.mean("hierarchy split", n_labels)
        eff = study.label_efficiency(X, y, ns=(n_labels,), draws=draws, ks=(), preprocess="l2",
                                     baselines=False, attribute=attr)
        split_l2 = eff.mean("hierarchy split", n_labels)
        row += [pct(split), pct(split_l2)]
        for name, value in (("hierarchy split", split), ("hierarchy split, l2", split_l2)):
            if value > best[attr][1]:
                best[attr] = (name, value)
        rows.append(row)
    return (header, rows), best


def lfw_rows(faces, runs: int):
    """Extra-class on LFW: one photo per identity (the first), k=2 and k=8, with the ceiling; for
    smiling and emotion also the smile view (mouth geometry, standardised over the rows)."""
    lfw = faces.subset([r["source"] == "lfw" for r in faces.rows])
    first = {}
    for i, r in enumerate(lfw.rows):
        first.setdefault(r["identity"], i)
    lfw = lfw.subset(sorted(first.values()))
    header = ["attribute", "view", "rows", "k=2", "bal.", "k=8 (majority)", "bal.", "majority",
              "ceiling", "bal."]
    rows = []
    specs = [("gender", None, "vector"), ("glasses", None, "vector"), ("smiling", None, "vector"),
             ("smiling", None, "smile"), ("emotion", ("happiness", "neutral"), "vector"),
             ("emotion", ("happiness", "neutral"), "smile")]
    for attr, pair, view in specs:
        y = lfw.column(attr)
        if pair:
            y = np.array([v if v in pair else None for v in y], object)
        F = study.face_view(lfw, view)
        keep = study.is_labelled(y) & np.isfinite(F).all(axis=1)
        F, y = F[keep], y[keep]
        if view != "vector":
            F = study.standardise(F)
        r = study.extra_class(F, {attr: y}, ks=(2, 8), runs=runs)
        c = study.supervised_ceiling(F, y)
        s2, s8 = r.summaries[2][attr], r.summaries[8][attr]
        rows.append([attr if not pair else f"{attr} {pair[0]}/{pair[1]}", view, str(len(y)),
                     pct(s2.accuracy), pct(s2.balanced_accuracy), pct(s8.accuracy),
                     pct(s8.balanced_accuracy), pct(s2.majority_baseline), pct(c.accuracy),
                     pct(c.balanced_accuracy)])
    return header, rows


def identity_centred(faces, F: np.ndarray) -> np.ndarray:
    """Each face's features minus the mean of its identity's faces: what varies within a person."""
    ids = faces.column("identity")
    out = np.array(F, np.float64)
    for person in set(ids):
        m = ids == person
        out[m] -= out[m].mean(axis=0)
    return out


def intra_summary(results) -> tuple[list[str], list[list[str]]]:
    header = ["comparison", "view", "identities", "faces", "accuracy", "balanced", "majority",
              "pooled bal.", "study"]
    rows = []
    for label, r, paper in results:
        rows.append([label, r.view, str(len(r.rows)), str(sum(x.n for x in r.rows)), pct(r.accuracy),
                     pct(r.balanced_accuracy), pct(r.majority_baseline),
                     pct(r.pooled().balanced_accuracy) if r.rows else "-",
                     pct(np.mean(paper)) if paper else "-"])
    return header, rows


def intra_ceiling(lfw, pair=("happiness", "neutral"), min_per_value: int = 3):
    """How much of happiness vs neutral the views hold for a supervised model: logistic regression
    on identity-centred features, folds grouped by person (so it never saw the person it tests)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    ids, y = lfw.column("identity"), lfw.column("emotion")
    people = {p for p in set(ids) if all(((ids == p) & (y == v)).sum() >= min_per_value for v in pair)}
    keep = np.array([i in people for i in ids]) & np.isin(y.astype(str), pair)
    sub = lfw.subset(keep)
    yy = sub.column("emotion").astype(str)
    rows = []
    for view in study.VIEWS:
        F = identity_centred(sub, study.face_view(sub, view))
        model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000))
        pred = cross_val_predict(model, F, yy, groups=sub.column("identity"), cv=GroupKFold(5))
        s = score(yy.astype(object), pred.astype(object), list(pair))
        rows.append([view, str(len(people)), str(s.n), pct(s.accuracy), pct(s.balanced_accuracy),
                     pct(s.majority_baseline)])
    return ["view", "identities", "faces", "accuracy", "balanced", "majority"], rows


def cw_table(lfw):
    from sklearn.metrics import adjusted_rand_score, homogeneity_completeness_v_measure

    names = lfw.column("identity").astype(str)
    rows = []
    for threshold in (0.6, 0.55, 0.5, 0.45, 0.4):
        found = study.identities_by_chinese_whispers(lfw.X, threshold).astype(str)
        h, c, _ = homogeneity_completeness_v_measure(names, found)
        rows.append([f"{threshold}", str(len(set(found))), str(len(set(names))),
                     f"{adjusted_rand_score(names, found):.3f}", f"{h:.3f}", f"{c:.3f}"])
    return ["threshold", "clusters", "people", "ARI", "homogeneity", "completeness"], rows


def eye_aspect_ratio(landmarks) -> np.ndarray:
    """Mean eye opening (height / width) of both eyes: cheeks raised in a smile narrow the eyes."""
    A = study.align_landmarks(landmarks)

    def ratio(a, b, c, d, e, f):
        return (np.linalg.norm(A[:, b] - A[:, f], axis=1) + np.linalg.norm(A[:, c] - A[:, e], axis=1)) / (
            2 * np.linalg.norm(A[:, a] - A[:, d], axis=1))

    return (ratio(36, 37, 38, 39, 40, 41) + ratio(42, 43, 44, 45, 46, 47)) / 2


def intra_ablation(lfw, runs: int):
    """Which mouth features carry happiness vs neutral within a person, on two halves of the
    identities (split by a hash of the name), so a choice made on one half can be checked on the other."""
    import zlib

    ids, emo = lfw.column("identity"), lfw.column("emotion")
    half = np.array([zlib.crc32(str(i).encode()) % 2 for i in ids])
    M = study.mouth_features(lfw.landmarks)
    col = {n: M[:, j] for j, n in enumerate(study.MOUTH_FEATURES)}
    col["eye_aspect_ratio"] = eye_aspect_ratio(lfw.landmarks)
    sets = [list(study.MOUTH_FEATURES)] + [[n] for n in col] + [
        [n for n in study.MOUTH_FEATURES if n != drop] for drop in study.MOUTH_FEATURES] + [
        list(study.SMILE_FEATURES), list(study.SMILE_FEATURES) + ["eye_aspect_ratio"]]
    header = ["features", "half A", "half B", "all"]
    rows = []
    for names in sets:
        F = np.stack([col[n] for n in names], axis=1)
        cells = []
        for keep in (half == 0, half == 1, np.ones(len(F), bool)):
            r = study.intra_class(F[keep], emo[keep], ids[keep], "emotion", ("happiness", "neutral"),
                                  runs=runs, standardise_within=True)
            cells.append(f"{pct(r.balanced_accuracy)} ({len(r.rows)})")
        label = "all six" if len(names) == 6 else (
            "without " + next(n for n in study.MOUTH_FEATURES if n not in names) if len(names) == 5
            else "+".join(names))
        rows.append([label] + cells)
    return header, rows


def pooled_within_person(faces, attr, pair, view, runs):
    """Zero-shot across people: identity-centred features of everyone's faces, k=2 on the pool."""
    y = faces.column(attr)
    keep = np.array([v in pair for v in y])
    sub = faces.subset(keep)
    F = study.face_view(sub, view)
    good = np.isfinite(F).all(axis=1)
    sub, F = sub.subset(good), F[good]
    # Only people with both values: centring someone with a single value removes the signal.
    ids, yy = sub.column("identity"), sub.column(attr)
    both = np.array([len(set(yy[ids == p])) == 2 for p in ids])
    sub, F = sub.subset(both), F[both]
    if not both.any():
        return None, 0
    R = identity_centred(sub, F)
    if view != "vector":
        R = study.standardise(R)
    r = study.extra_class(R, {attr: sub.column(attr)}, ks=(2,), runs=runs)
    return r.summaries[2][attr], len(set(sub.column("identity")))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vectors", default=os.environ.get("SUBDISC_DEV_VECTORS", "/tmp/subdisc-dev/dev_vectors.npz"))
    p.add_argument("--faces", default=os.environ.get("SUBDISC_DEV_FACES", str(ROOT.parent / "shared/faces/dev")))
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--draws", type=int, default=20, help="label draws per label-efficiency point")
    p.add_argument("--out", default=str(ROOT / "bench" / "out"))
    p.add_argument("--quick", action="store_true", help="skip the clusterer / preprocessing sweep")
    args = p.parse_args(argv)

    started = time.perf_counter()
    faces_dir = Path(args.faces)
    if not Path(args.vectors).exists():
        print(f"no vectors file at {args.vectors}: run `subdisc embed --fallback --list "
              f"{faces_dir}/labels.csv --out FILE.npz` and pass --vectors FILE.npz", file=sys.stderr)
        return 2
    rows = study.read_labels(faces_dir / "labels.csv")
    faces = study.faces_from_vectors_file(rows, faces_dir, args.vectors)
    print(f"{len(faces)} of {len(rows)} labelled photos have a face in {args.vectors}")

    # --- extra-class on the balanced UTK groups (Table 1) ---
    utk = faces.subset([r["source"] == "utk" for r in faces.rows]).complete(UTK_ATTRS)
    labels = utk.labels(UTK_ATTRS)
    config = study.StudyConfig(UTK_ATTRS, ks=[2, 4, 8], runs=args.runs, holdout=0.3,
                               holdout_algos=["kmeans", "gmm", "residual"],
                               efficiency=[2, 5, 10, 20, 50], efficiency_draws=args.draws)
    result = study.run_study(utk, config)
    groups = {}
    for r in utk.rows:
        key = (r["skin"], r["gender"], r["age_group"])
        groups[key] = groups.get(key, 0) + 1
    print("UTK groups (skin, gender, age):", ", ".join(f"{'/'.join(k)} {n}" for k, n in sorted(groups.items())))
    show("Table 1 (extra-class, UTK balanced groups, K-Means random init, runs as columns)",
         extra_table(result.extra))
    show("Table 1: ours beside the study's", paper_beside_table1(result.extra))
    show("Hierarchy: what each k follows (study: skin, skin x gender, skin x gender x age)",
         hierarchy_table(result.extra.hierarchy))
    show("The study's first tests (k=2; gender and age within one skin tone)", single_skin_tests(faces, args.runs))

    # --- ceiling, label efficiency and the bar ---
    header = ["attribute", "rows", "ceiling (logreg 5-fold)", "balanced", "majority",
              "clusters k=values, 20 labels", "hierarchy split, 20 labels", "gap (points)", "bar (<= 2)",
              "split at the right level, 20 labels"]
    table = []
    for a in UTK_ATTRS:
        c, eff = result.ceilings[a], result.efficiency[a]
        split = eff.mean("hierarchy split", 20)
        # The loss from 20 labels picking the wrong level: name the level all labels pick.
        level = max((1, 2, 4, 8), key=lambda p: score(labels[a], apply_names(*_split_named(utk.X, labels[a], p))).accuracy)
        known = study.label_efficiency(utk.X, labels[a], ns=(20,), draws=args.draws, ks=(), levels=(level,),
                                       baselines=False, attribute=a).mean("hierarchy split", 20)
        table.append([a, str(c.n), pct(c.accuracy), pct(c.balanced_accuracy), pct(c.majority_baseline),
                      pct(eff.mean(f"clusters k={len(c.values)}", 20)), pct(split),
                      f"{100 * (c.accuracy - split):.1f}", "met" if c.accuracy - split <= 0.02 else "NOT met",
                      f"{pct(known)} (parent k={level})"])
    show("Our bar: zero-shot clusters named with 20 labels vs the supervised ceiling (UTK balanced groups)",
         (header, table))
    for a in UTK_ATTRS:
        show(f"Label efficiency: {a} (accuracy (balanced) on all other faces, mean of {args.draws} draws)",
             efficiency_table(result.efficiency[a]))
    if not args.quick:
        sweep, best = configs_against_ceiling(utk.X, labels, result.ceilings, draws=max(3, args.draws // 2))
        show("Why: clusters named with 20 labels, by clusterer / preprocessing (best k in brackets)", sweep)
        header = ["attribute", "ceiling", "best zero-shot + 20 labels", "method", "gap (points)"]
        show("Best of everything tried, 20 labels",
             (header, [[a, pct(result.ceilings[a].accuracy), pct(best[a][1]), best[a][0],
                        f"{100 * (result.ceilings[a].accuracy - best[a][1]):.1f}"] for a in UTK_ATTRS]))

    # --- section 5 ---
    show("Section 5 / Figure 4: centroids fitted on 70%, tested on 30% (study: figure only, no numbers; "
         "residual = hierarchy split, 'chosen k' = its parent level)", holdout_table(result.holdout))

    # --- LFW rows ---
    show("LFW rows, one photo per identity: clusters vs ceiling", lfw_rows(faces, args.runs))

    # --- intra-class ---
    lfw = faces.subset([r["source"] == "lfw" for r in faces.rows])
    ids = lfw.column("identity")
    results = []
    for view in study.VIEWS:
        F = study.face_view(lfw, view)
        r = study.intra_class(F, lfw.column("emotion"), ids, "emotion", ("happiness", "neutral"),
                              runs=args.runs, view=view, standardise_within=view != "vector")
        results.append(("LFW happiness vs neutral", r, PAPER_HAPPY_NEUTRAL))
        if view == "smile":
            show("Intra-class per identity: LFW happiness vs neutral, smile view (mouth geometry)",
                 intra_table(r))
    for attr in ("smiling", "glasses"):
        r = study.intra_class(lfw.X, lfw.column(attr), ids, attr, ("yes", "no"), min_per_value=2,
                              runs=args.runs)
        results.append((f"LFW {attr} yes vs no (2+ of each)", r, PAPER_GLASSES if attr == "glasses" else None))
    for threshold in (0.6, 0.45):
        cw = study.identities_by_chinese_whispers(lfw.X, threshold)
        for view in ("vector", "smile"):
            r = study.intra_class(study.face_view(lfw, view), lfw.column("emotion"), cw, "emotion",
                                  ("happiness", "neutral"), runs=args.runs, view=view,
                                  standardise_within=view != "vector")
            results.append((f"LFW happiness vs neutral, Chinese whispers {threshold}", r, PAPER_HAPPY_NEUTRAL))
    show("Chinese whispers on the LFW vectors: identities found vs the names", cw_table(lfw))
    yale = faces.subset([r["source"] == "yale" for r in faces.rows])
    for attr, pair in (("glasses", ("yes", "no")), ("emotion", ("happiness", "neutral"))):
        for view in ("vector", "smile"):
            r = study.intra_class(study.face_view(yale, view), yale.column(attr), yale.column("identity"),
                                  attr, pair, min_per_value=1, runs=args.runs, view=view,
                                  standardise_within=view != "vector")
            results.append((f"Yale {attr} {pair[0]}/{pair[1]} (1 photo each)", r,
                            PAPER_GLASSES if attr == "glasses" else PAPER_HAPPY_NEUTRAL))
    show("Intra-class summary (k=2 within each identity; study = its Tables 2-3 mean; bar: LFW "
         "happiness vs neutral balanced >= 85%)", intra_summary(results))

    header = ["comparison", "view", "identities", "faces", "accuracy", "balanced", "majority"]
    pooled = []
    for attr, pair in (("emotion", ("happiness", "neutral")), ("smiling", ("yes", "no"))):
        for view in ("vector", "mouth", "smile", "mouth-shape"):
            s, n_ids = pooled_within_person(lfw, attr, pair, view, args.runs)
            if s is None:
                pooled.append([f"LFW {attr} {pair[0]}/{pair[1]}", view, "0", "0", "-", "-", "-"])
                continue
            pooled.append([f"LFW {attr} {pair[0]}/{pair[1]}", view, str(n_ids), str(s.n), pct(s.accuracy),
                           pct(s.balanced_accuracy), pct(s.majority_baseline)])
    show("Within-person variation pooled over people (identity-centred features, one k=2 for all)",
         (header, pooled))
    show("Ablation: balanced accuracy of per-identity k=2 on mouth features (identities in brackets)",
         intra_ablation(lfw, args.runs))
    show("Supervised ceiling of the intra-class views (logistic regression, 5 folds grouped by "
         "person, identity-centred features, LFW happiness vs neutral)", intra_ceiling(lfw))

    paths = write_report(result, args.out, title="subdisc bench: UTK balanced groups")
    print(f"\nreport: {paths['html']}  ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

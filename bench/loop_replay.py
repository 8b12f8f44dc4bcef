"""The labelling loop replayed in-process, many times over: is the advised order ahead of random?

    python bench/loop.py --embed-only --export /tmp/loop-faces.npz     # once: the collection's faces
    python bench/loop_replay.py /tmp/loop-faces.npz [--random-seeds 0,1,2,3] [--subsets 3]
                                [--rounds 16,32,64,128] [--json out.json]

bench/loop.py is the yardstick: the backend's real path (Redis, workers, webhooks, refits), one
advised and one random order, ~30 minutes. One random permutation is one draw, though: on the
default collection four permutations' figures spread by up to 40 points in a cell (age_group at 128
tasks shown on 58 % to 86 % of the faces), so "ahead of random" judged against one draw is mostly
luck. This replays the same protocol on the exported faces (one face per task, the one
bench/loop.py labels) through the same functions the refit worker runs (fit_project, then
ProjectModel.predict), in seconds a round, so the advised order can be set against random's mean
over several permutations, on the full collection and on random 85 % subsets of it.

With the full collection and random seed 0 it reproduces bench/loop.py's table figure for figure
(checked at the code of this commit). Per round and attribute, as bench/loop.py: shown (accuracy
of the values shown), cover (share of the unlabelled labelled faces given a value), and the gain
the comparison is made on, cover x shown (the share of faces rightly pre-annotated).

Its noise floor is printed beside it: the same test between the random permutations themselves
(each against the mean of the others). A cell that a gate opens in one draw and keeps shut in
another swings by up to 95 points, so an order no better than random is behind in a share of the
cells, not none, and counting cells cannot say whether it is ahead. What can: "ahead of random at
every round for every attribute" in expectation. Per round and attribute, each dataset's advised
gain is set against its permutations' mean, and the difference averaged over the datasets with its
standard error (paired: the datasets are the draws); a cell behind by more than two standard
errors is a real deficit, not noise. The same again on the net value, right values less WRONG_COST
times wrong ones (what the gates price a wrong value a labeler accepts at): an order whose values
are fewer but surer is behind on the gain and may be ahead on the net. Last, the right and wrong
values summed over all the cells.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from backend.attributes.abstention import WRONG_COST  # noqa: E402
from backend.attributes.project_model import Clusterings, fit_project  # noqa: E402
from backend.labeling_config import default_config_xml, parse  # noqa: E402
from bench.loop import ATTRIBUTES, _pct, scored, value_figures  # noqa: E402

SUBSET_SHARE = 0.85


def load(path: Path, config):
    """(views {view: (n, d)}, truth {attribute: (n,) value or ""}) of an export of bench/loop.py."""
    with np.load(path, allow_pickle=False) as z:
        views = {k[len("view_"):]: z[k].astype(np.float64) for k in z.files if k.startswith("view_")}
        truth = {a.name: np.array([v if v in a.values else "" for v in z[a.name]], dtype=object)
                 if a.name in z.files else np.full(len(views["vector"]), "", dtype=object)
                 for a in config.attributes}
    return views, truth


def figures(faces, truth: dict, labelled: np.ndarray) -> dict:
    """Per attribute, bench/loop.py's figures over the unlabelled scored faces."""
    out = {}
    for name in ATTRIBUTES:
        rows = [i for i, v in enumerate(truth[name]) if scored(name, v) and not labelled[i]]
        out[name] = value_figures([truth[name][i] for i in rows],
                                  [faces[i].values.get(name, (None, 0.0))[0] for i in rows])
    return out


def behind(gain: float, others: list[float]) -> bool:
    """Is one order's gain in a cell under the mean of the others' (equal within rounding: not)?"""
    return bool(others) and gain < float(np.mean(others)) - 1e-12


def gain(figures: dict) -> float:
    """A cell's share of faces rightly pre-annotated (0 where nothing is shown)."""
    return figures["gain"] or 0.0


def wrong(figures: dict) -> float:
    """A cell's share of faces wrongly pre-annotated."""
    return figures["wrong"] or 0.0


def cell_table(lines: list[dict], measure) -> list[float]:
    """One replay's measure (gain or wrong), round by round and attribute by attribute."""
    return [measure(line["figures"][a]) for line in lines for a in ATTRIBUTES]


def expected_comparison(advised: np.ndarray, randoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per cell, the advised order's gain minus random's expected gain, averaged over the datasets,
    and that mean's standard error. advised: (datasets, cells) gains; randoms: (datasets,
    permutations, cells). On each dataset random's expectation is the mean of its permutations;
    the datasets are the draws (paired: one advised and one random mean each)."""
    diff = advised - randoms.mean(axis=1)
    se = (diff.std(axis=0, ddof=1) / np.sqrt(len(diff)) if len(diff) > 1
          else np.full(diff.shape[1], np.nan))
    return diff.mean(axis=0), se


def replay(views: dict, truth: dict, config, rounds: list[int], order: str, seed: int = 0) -> list[dict]:
    """One project through the rounds: label the next tasks in the order, refit, score the rest.
    order: "score" (the teaching score, highest first, as the Data Manager sorts) or "random"
    (the permutation of `seed`, as bench/loop.py draws it)."""
    n = len(views["vector"])
    keys = [f"{i}:0" for i in range(n)]
    clusterings = Clusterings()
    model = fit_project(views, {}, config, clusterings, keys=keys)
    permutation = list(np.random.default_rng(seed).permutation(n))
    labelled: list[int] = []
    lines = []
    for r in rounds:
        done = set(labelled)
        if order == "score":
            rank = np.array([model.order.get(k, 0.0) for k in keys])
            todo = [int(i) for i in np.lexsort((np.arange(n), -rank)) if int(i) not in done]
        else:
            todo = [int(i) for i in permutation if int(i) not in done]
        labelled += todo[: r - len(labelled)]
        mask = np.zeros(n, bool)
        mask[labelled] = True
        labels = {name: np.array([v if (mask[i] and v) else None for i, v in enumerate(t)], dtype=object)
                  for name, t in truth.items()}
        model = fit_project(views, labels, config, clusterings, keys=keys)
        lines.append({"order": order, "seed": seed, "labelled": r,
                      "figures": figures(model.predict(views, keys), truth, mask)})
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("faces", type=Path, help="an export of bench/loop.py (--export)")
    ap.add_argument("--rounds", default="16,32,64,128")
    ap.add_argument("--random-seeds", default="0,1,2,3")
    ap.add_argument("--subsets", type=int, default=3, help="random 85 %% subsets besides the whole")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    config = parse(default_config_xml())
    views_all, truth_all = load(args.faces, config)
    rounds = [int(x) for x in args.rounds.split(",")]
    seeds = [int(x) for x in args.random_seeds.split(",")]
    n_all = len(views_all["vector"])
    datasets = [("whole", np.arange(n_all))] + [
        (f"subset {s}", np.sort(np.random.default_rng(s).choice(n_all, int(SUBSET_SHARE * n_all),
                                                                 replace=False)))
        for s in range(args.subsets)]
    results, cells, behind_mean, behind_draws, below = [], 0, [], 0, []
    # The comparison's noise floor: how often one permutation is behind the others' mean.
    loo_behind = [0] * len(seeds)
    for name, idx in datasets:
        views = {k: v[idx] for k, v in views_all.items()}
        truth = {k: v[idx] for k, v in truth_all.items()}
        advised = replay(views, truth, config, rounds, "score")
        randoms = [replay(views, truth, config, rounds, "random", s) for s in seeds]
        results.append({"dataset": name, "faces": len(idx), "score": advised, "random": randoms})
        print(f"\n{name} ({len(idx)} faces)\n  tasks attribute advised shown / cover   random mean "
              f"shown / cover   (its gain, min - max over {len(seeds)} permutations)")
        for i, line in enumerate(advised):
            cols = []
            for a in ATTRIBUTES:
                f = line["figures"][a]
                rs = [rnd[i]["figures"][a] for rnd in randoms]
                gains = [x["gain"] for x in rs]
                mean = lambda key: (np.mean([x[key] for x in rs if x[key] is not None])
                                    if any(x[key] is not None for x in rs) else None)
                cols.append(f"{a:9s} {_pct(f['shown'])} / {_pct(f['cover'])}   {_pct(mean('shown'))} / "
                            f"{_pct(mean('cover'))}   ({_pct(min(gains))} - {_pct(max(gains))})")
                cells += 1
                behind_draws += sum(f["gain"] < g for g in gains)
                for j, g in enumerate(gains):
                    loo_behind[j] += behind(g, gains[:j] + gains[j + 1:])
                if behind(f["gain"], gains):
                    behind_mean.append((name, line["labelled"], a, round(100 * f["gain"], 1),
                                        round(100 * float(np.mean(gains)), 1)))
                for order, x in [("score", f)] + [("random", x) for x in rs]:
                    if x["shown"] is not None and x["shown"] < x["majority"]:
                        below.append((name, order, line["labelled"], a))
            print(f"  {line['labelled']:4d}  " + "\n        ".join(cols))
    print(f"\nadvised order behind random's mean gain (cover x shown): {len(behind_mean)} of {cells} "
          f"cells; behind single permutations: {behind_draws} of {cells * len(seeds)}")
    for b in behind_mean:
        print(f"  {b[0]}, {b[1]} tasks, {b[2]}: {b[3]} vs {b[4]}")
    if len(seeds) > 1:
        print(f"the same test between random permutations (each against the others' mean): behind in "
              f"{min(loo_behind)} to {max(loo_behind)} of {cells} cells ({', '.join(map(str, loo_behind))})")
    # Per round and attribute, in expectation: each dataset's advised figure against its random
    # permutations' mean, averaged over the datasets, with the standard error of that average. On
    # the gain (right values), then on the net value (right less WRONG_COST x wrong): an order
    # that shows fewer values more surely can be behind on the first and ahead on the second.
    def cells_where(mask):
        return [(rounds[c // len(ATTRIBUTES)], ATTRIBUTES[c % len(ATTRIBUTES)]) for c in np.flatnonzero(mask)]
    def tables(measure):
        """(datasets, cells) of the advised order and (datasets, permutations, cells) of random."""
        return (np.array([cell_table(r["score"], measure) for r in results]),
                np.array([[cell_table(p, measure) for p in r["random"]] for r in results]))
    table = {"gain": tables(gain), "wrong": tables(wrong)}
    # The net value to a labeler: right values less WRONG_COST x wrong ones (the gates' own price
    # of a wrong value accepted), cell by cell.
    table["net value"] = tuple(g - WRONG_COST * w for g, w in zip(table["gain"], table["wrong"]))
    for name, title in (("gain", "gain"), ("net value", f"net value: gain - {WRONG_COST:g} x wrong")):
        advised, randoms = table[name]
        mean, se = expected_comparison(advised, randoms)
        adv, rnd = advised.mean(axis=0), randoms.mean(axis=(0, 1))
        print(f"\nin expectation over the {len(datasets)} datasets ({title}; advised / random's mean, "
              f"difference +- its standard error):")
        for i, r in enumerate(rounds):
            row = []
            for j, a in enumerate(ATTRIBUTES):
                c = i * len(ATTRIBUTES) + j
                row.append(f"{a} {_pct(adv[c])} / {_pct(rnd[c])} ({100 * mean[c]:+5.1f} +- {100 * se[c]:4.1f})")
            print(f"  {r:4d}  " + "  ".join(row))
        behind_avg = cells_where(mean < -1e-12)
        # One dataset has no standard error: nothing can be called clearly behind.
        clearly = (cells_where(mean < -2 * se) or "none") if len(results) > 1 else "unknown (one dataset)"
        print(f"advised order behind random's expectation ({name}): {len(behind_avg)} of "
              f"{len(mean)} cells {behind_avg}; by more than two standard errors: {clearly}")
    # Summed over datasets and cells: random's as the mean over its permutations.
    (right_a, right_r), (wrong_a, wrong_r) = table["gain"], table["wrong"]
    print(f"summed over the cells (percentage points of faces): right values shown, advised "
          f"{100 * right_a.sum():,.0f}, random's mean {100 * right_r.mean(axis=1).sum():,.0f}; wrong ones "
          f"{100 * wrong_a.sum():,.0f} and {100 * wrong_r.mean(axis=1).sum():,.0f}")
    print(f"shown below the majority baseline: {below or 'never'}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

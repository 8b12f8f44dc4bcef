"""The labelling loop, replayed: how right the pre-annotations are round after round, in two orders.

    python bench/loop.py [--faces ../shared/faces/dev] [--data-dir /tmp/subdisc-loop] [--rounds 16,32,64,128]
                         [--orders score,random] [--workers 1] [--export faces.npz]

What a labelling team does in Label Studio, through the backend's real code path: a redis-server
(append-only in --data-dir, so the faces are embedded once and later runs reuse them) and RQ workers
started by backend/stack.py as `subdisc up` starts them, the SubdiscModel object the HTTP server
wraps (/setup, /predict, webhooks with Label Studio-shaped annotation payloads), refits run by the
workers as the webhooks queue them. The default config; pipeline as `subdisc up --fallback`.

Collection (fixed seed): 640 dev photos, UTK 320 balanced by skin x gender x age_group, LFW 240,
MTFL 80. Each order is its own project over the same photos:
  * score: the Data Manager sorted by prediction score (what the README advises), highest first;
  * random: a fixed random permutation.
A round takes the next tasks until N are labelled (N = 16, 32, 64, 128): the labeler accepts the
face box of the photo's labelled face (the one nearest the photo's centre) and sets every attribute
the photo has a label for. After the round's refit has run, "Retrieve predictions" is asked again
and the predictions of the tasks not yet labelled are scored, per attribute, against the labels:
  * shown: accuracy of the values shown (on faces with a label for that attribute);
  * cover: share of those faces given a value at all (an empty choice = the model abstained);
  * wrong: share of those faces shown a wrong value (= cover x (1 - shown)).
Emotion is scored on faces labelled happiness or neutral (any other value shown counts as wrong).
Beside them: the majority baseline (share of the commonest value among those faces) and a
supervised ceiling on the same faces (5-fold logistic regression grouped by person, C chosen inside
each training fold, on the best view).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import redis  # noqa: E402

from backend.labeling_config import default_config_xml, parse  # noqa: E402
from backend.stack import Stack, free_port, stop_on_sigterm  # noqa: E402
from tests.support import DEV_FACES  # noqa: E402
from workers.pipeline import PipelineOptions  # noqa: E402

QUEUE = "bench-loop"
ATTRIBUTES = ("gender", "age_group", "skin", "glasses", "emotion")
EMOTION_SCORED = ("happiness", "neutral")
SEED = 0


def collection(faces: Path, utk: int = 320, lfw: int = 240, mtfl: int = 80, seed: int = SEED) -> list[dict]:
    """The default mixed collection: rows of labels.csv (fixed seed), UTK balanced by groups."""
    rows = list(csv.DictReader((faces / "labels.csv").open()))
    rng = np.random.default_rng(seed)
    out = []
    groups = defaultdict(list)
    for r in rows:
        if r["source"] == "utk" and r["skin"] and r["gender"] and r["age_group"]:
            groups[(r["skin"], r["gender"], r["age_group"])].append(r)
    # As even as the groups allow: a group short of its share gives the rest to the others.
    quota, left = {}, utk
    for i, key in enumerate(sorted(groups, key=lambda k: len(groups[k]))):
        quota[key] = min(len(groups[key]), left // (len(groups) - i))
        left -= quota[key]
    for key in sorted(groups):
        g = groups[key]
        out += [g[i] for i in sorted(rng.choice(len(g), quota[key], replace=False))]
    for source, n in (("lfw", lfw), ("mtfl", mtfl)):
        pool = [r for r in rows if r["source"] == source]
        out += [pool[i] for i in sorted(rng.choice(len(pool), min(n, len(pool)), replace=False))]
    return out


def truth_of(row: dict, config) -> dict[str, str]:
    """The values a labeler sets for this photo: every attribute with a label the config knows."""
    out = {}
    for a in config.attributes:
        v = row.get(a.name) or ""
        if v and v in a.values:
            out[a.name] = v
    return out


def scored(name: str, value: str | None) -> bool:
    return bool(value) and (name != "emotion" or value in EMOTION_SCORED)


def labelled_region(prediction: dict):
    """(region id, rectangle value) of the face nearest the photo's centre, or (None, None)."""
    boxes = [r for r in prediction.get("result", []) if r["type"] == "rectanglelabels"]
    if not boxes:
        return None, None

    def off(r):
        v = r["value"]
        return (v["x"] + v["width"] / 2 - 50) ** 2 + (v["y"] + v["height"] / 2 - 50) ** 2
    best = min(boxes, key=off)
    return best["id"], best


def shown_values(prediction: dict, region: str | None) -> dict[str, str]:
    return {r["from_name"]: r["value"]["choices"][0] for r in prediction.get("result", [])
            if r["type"] == "choices" and r["id"] == region}


def annotation_payload(aid: int, task: dict, box: dict | None, values: dict[str, str]) -> dict:
    """A Label Studio annotation of one face: its box accepted, the attribute values set."""
    result = []
    if box is not None:
        geom = {k: box[k] for k in ("original_width", "original_height", "image_rotation")}
        rid = f"a{aid}"
        v = {k: box["value"][k] for k in ("x", "y", "width", "height", "rotation")}
        result.append({"id": rid, "from_name": box["from_name"], "to_name": box["to_name"],
                       "type": "rectanglelabels", "origin": "prediction", **geom,
                       "value": {**v, "rectanglelabels": box["value"]["rectanglelabels"]}})
        for name, value in values.items():
            result.append({"id": rid, "from_name": name, "to_name": box["to_name"], "type": "choices",
                           "origin": "manual", **geom, "value": {**v, "choices": [value]}})
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
    return {"id": aid, "result": result, "task": task["id"], "project": task["project"],
            "created_at": stamp, "updated_at": stamp, "was_cancelled": False, "completed_by": 1,
            "lead_time": 5.0, "ground_truth": False, "parent_prediction": None,
            "result_count": len(result)}


def wait_jobs(r: redis.Redis, ids: list[str], stack: Stack, timeout: float = 900) -> None:
    from rq.job import Job, JobStatus

    deadline = time.time() + timeout
    for jid in ids:
        while True:
            status = Job.fetch(jid, connection=r).get_status()
            if status in (JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED):
                if status != JobStatus.FINISHED:
                    raise RuntimeError(f"refit job {jid} ended {status}")
                break
            stack.check_alive()
            if time.time() > deadline:
                raise RuntimeError(f"refit job {jid} still {status} after {timeout}s")
            time.sleep(0.2)


def value_figures(truths: list[str], shown: list[str | None]) -> dict:
    """Figures of one attribute over its scored faces: truths, and the value shown on each face
    (None = abstained): see the module doc; gain = right / n (the share rightly pre-annotated)."""
    n = len(truths)
    cover = sum(v is not None for v in shown)
    right = sum(v is not None and v == t for t, v in zip(truths, shown))
    return {"n": n, "shown": right / cover if cover else None, "cover": cover / n if n else None,
            "wrong": (cover - right) / n if n else None, "gain": right / n if n else None,
            "majority": Counter(truths).most_common(1)[0][1] / n if n else None}


def evaluate(predictions: dict, rows: dict, labelled: set, config) -> dict:
    """Per attribute, figures over the unlabelled tasks' labelled faces (see the module doc)."""
    out = {}
    for name in ATTRIBUTES:
        truths, shown = [], []
        for tid, pred in predictions.items():
            t = rows[tid].get(name) or ""
            if tid in labelled or not scored(name, t):
                continue
            region, _ = labelled_region(pred)
            truths.append(t)
            shown.append(shown_values(pred, region).get(name))
        out[name] = value_figures(truths, shown)
    return out


def run_order(model, r, stack, order: str, project: int, tasks_all: list[dict], rows: dict,
              rounds: list[int], config, xml: str, seed: int = SEED) -> list[dict]:
    from backend.state import ProjectState

    tasks = [dict(t, project=project) for t in tasks_all]
    model.setup(str(project), xml, "http://label-studio.invalid", "bench")
    predictions = {}

    def retrieve():
        res = model.predict(tasks, str(project))
        return {str(t["id"]): p for t, p in zip(tasks, res)}

    predictions = retrieve()
    if not any(labelled_region(p)[0] for p in predictions.values()):
        raise RuntimeError("no task was given a face box: the backend refused or could not read the "
                           f"photos (first answer: {json.dumps(next(iter(predictions.values())))[:300]})")
    labelled: list[str] = []
    permutation = [str(t["id"]) for t in np.random.default_rng(seed).permutation(tasks)]
    by_id = {str(t["id"]): t for t in tasks}
    lines = []
    aid = project * 100000
    counts = Counter()
    for n in rounds:
        if order == "score":
            todo = sorted((t for t in predictions if t not in set(labelled)),
                          key=lambda t: (-(predictions[t]["score"] or 0.0), int(t)))
        else:
            todo = [t for t in permutation if t not in set(labelled)]
        jobs = []
        for tid in todo[: n - len(labelled)]:
            region, box = labelled_region(predictions[tid])
            values = truth_of(rows[tid], config)
            for k, v in values.items():
                counts[(k, v)] += 1
            aid += 1
            ann = annotation_payload(aid, by_id[tid], box, values if box is not None else {})
            summary = model.record_event("ANNOTATION_CREATED", {
                "action": "ANNOTATION_CREATED", "annotation": ann, "task": by_id[tid],
                "project": {"id": project}})
            if summary.get("refit"):
                jobs.append(summary["refit"])
            labelled.append(tid)
        started = time.time()
        wait_jobs(r, jobs, stack)
        refit_s = time.time() - started
        predictions = retrieve()
        figures = evaluate(predictions, rows, set(labelled), config)
        meta = (ProjectState(r, str(project)).load_model() or (None, {}))[1]
        status = {a: (i.get("status"), (i.get("selection") or {}).get("chosen"))
                  for a, i in meta.get("info", {}).items()}
        gates = {a: i.get("gate") or {} for a, i in meta.get("info", {}).items()}
        lines.append({"order": order, "labelled": len(labelled), "figures": figures,
                      "confirmations": {k: dict((v, c) for (a, v), c in counts.items() if a == k)
                                        for k in ATTRIBUTES},
                      "status": status, "refit_seconds": round(refit_s, 1)})
        print(f"  {order} {len(labelled):4d} labelled: "
              + "  ".join(f"{a} {_pct(f['shown'])}/{_pct(f['cover'])}" for a, f in figures.items())
              + f"  (refit wait {refit_s:.1f}s)", flush=True)
        # What the table follows from: the confirmations this order collected so far, and what
        # each attribute's gate made of them (held-out accuracy vs the confirmations' majority).
        for a in ATTRIBUTES:
            got = ", ".join(f"{v} {c}" for v, c in sorted(lines[-1]["confirmations"][a].items()))
            st, chosen = status.get(a, (None, None))
            g = gates.get(a) or {}
            gate = (f"; {chosen}, held out {_pct(g.get('accuracy'))} vs majority "
                    f"{_pct(g.get('majority'))}, shown {_pct(g.get('coverage'))} of them"
                    if g else "")
            print(f"      {a:9s} {st or '-':10s} confirmed: {got or 'none'}{gate}", flush=True)
    return lines


def _pct(v) -> str:
    return "  —  " if v is None else f"{100 * v:5.1f}"


def ceiling(X: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int = SEED) -> float | None:
    """5-fold (grouped by person) logistic regression accuracy, C chosen inside each training fold."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    keep = np.array([bool(v) for v in y])
    X, y, groups = X[keep], y[keep], groups[keep]
    if len(set(y)) < 2 or len(y) < 20:
        return None
    pred = np.empty(len(y), dtype=object)
    for train, test in GroupKFold(5).split(X, y, groups):
        clf = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=[0.001, 0.01, 0.1, 1], cv=3,
                                                                   max_iter=2000))
        clf.fit(X[train], y[train])
        pred[test] = clf.predict(X[test])
    return float(np.mean(pred == y))


def export(path: Path, rows: list[dict], results: list) -> None:
    """The collection's labelled faces (vector, views, landmarks, labels) for offline work."""
    from backend.attributes.views import face_views

    keep, faces = [], []
    for row, res in zip(rows, results):
        if res is None or not res.ok or not res.faces:
            continue
        w, h = res.width, res.height
        face = min(res.faces, key=lambda f: ((f.box[0] + f.box[2]) / 2 - w / 2) ** 2
                   + ((f.box[1] + f.box[3]) / 2 - h / 2) ** 2)
        keep.append(row)
        faces.append(face)
    views = [face_views(f) for f in faces]
    names = sorted(set.intersection(*(set(v) for v in views))) if views else []
    arrays = {f"view_{k}": np.stack([v[k] for v in views]) for k in names}
    cols = {c: np.array([r.get(c) or "" for r in keep]) for c in
            ("path", "source", "identity", *ATTRIBUTES, "smiling")}
    np.savez(path, **arrays, **cols)
    print(f"exported {len(keep)} faces ({', '.join(names)}) to {path}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--faces", type=Path, default=DEV_FACES)
    ap.add_argument("--data-dir", type=Path, default=Path("/tmp/subdisc-loop"),
                    help="Redis' folder: the embedded faces persist there between runs")
    ap.add_argument("--rounds", default="16,32,64,128")
    ap.add_argument("--orders", default="score,random")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--no-fallback", action="store_true")
    ap.add_argument("--export", type=Path, help="also save the collection's faces to this .npz")
    ap.add_argument("--embed-only", action="store_true", help="embed (and export), no loop")
    ap.add_argument("--json", type=Path, help="write every round's figures to this file")
    args = ap.parse_args()
    if not (args.faces / "labels.csv").exists():
        print(f"no labelled photos at {args.faces}")
        return 2
    stop_on_sigterm()
    for name in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "SUBDISC_PRIOR", "BASIC_AUTH_USER",
                 "BASIC_AUTH_PASS", "SUBDISC_EXTRA_ROOTS"):
        os.environ.pop(name, None)
    options = PipelineOptions(fallback=not args.no_fallback)
    # The photos' folder is the backend's local-files root, as a user's Label Studio storage would
    # be: the backend reads no local path outside the roots it is given.
    env = {"SUBDISC_QUEUE": QUEUE, "SUBDISC_FALLBACK": "0" if args.no_fallback else "1",
           "SUBDISC_LOCAL_FILES_ROOT": str(args.faces.resolve())}
    os.environ.update(env)
    rows = collection(args.faces, seed=args.seed)
    xml = default_config_xml()
    config = parse(xml)
    rounds = [int(x) for x in args.rounds.split(",")]
    sources = [str((args.faces / r["path"]).resolve()) for r in rows]
    tasks = [{"id": i + 1, "data": {"image": s}, "annotations": [], "predictions": []}
             for i, s in enumerate(sources)]
    by_tid = {str(i + 1): r for i, r in enumerate(rows)}
    print(f"collection: {len(rows)} photos ({dict(Counter(r['source'] for r in rows))}), seed {args.seed}")

    args.data_dir.mkdir(parents=True, exist_ok=True)
    with Stack(args.data_dir / "logs") as stack:
        url = stack.start_redis(free_port(), args.data_dir / "redis")
        env["SUBDISC_REDIS_URL"] = url
        os.environ.update(env)
        r = redis.Redis.from_url(url)
        from backend.state import ProjectState

        for p in range(1, 1 + len(args.orders.split(","))):
            for key in r.scan_iter(ProjectState(r, p).prefix + "*"):
                r.delete(key)   # this project's state from an earlier run; the embedding cache stays
        stack.start_workers(args.workers, url, QUEUE, env)
        from backend.model import SubdiscModel
        from workers.client import embed

        started = time.time()
        results = embed(sources, redis=r, options=options, queue_name=QUEUE, progress=False)
        print(f"embedded: {results.summary} in {time.time() - started:.1f}s", flush=True)
        if args.export:
            export(args.export, rows, [results[s] for s in sources])
        if args.embed_only:
            return 0
        model = SubdiscModel(r, queue_name=QUEUE, options=options)
        lines = []
        for p, order in enumerate(args.orders.split(","), start=1):
            lines += run_order(model, r, stack, order, p, tasks, by_tid, rounds, config, xml, args.seed)
        ceilings = ceilings_of(rows, [results[s] for s in sources])
    print_table(lines, ceilings)
    if args.json:
        args.json.write_text(json.dumps({"rounds": lines, "ceiling": ceilings}, indent=1, default=str))
    return 0


def ceilings_of(rows, results) -> dict:
    """Per attribute, the best view's supervised ceiling on the collection's faces."""
    from backend.attributes.views import face_views

    X, keep = {}, []
    for row, res in zip(rows, results):
        if res is None or not res.ok or not res.faces:
            continue
        keep.append((row, res.faces[0] if len(res.faces) == 1 else min(
            res.faces, key=lambda f: ((f.box[0] + f.box[2]) / 2 - res.width / 2) ** 2
            + ((f.box[1] + f.box[3]) / 2 - res.height / 2) ** 2)))
    views = [face_views(f) for _, f in keep]
    names = sorted(set.intersection(*(set(v) for v in views)))
    groups = np.array([row["identity"] or row["path"] for row, _ in keep])
    out = {}
    for name in ATTRIBUTES:
        y = np.array([(row.get(name) or "") if scored(name, row.get(name)) else "" for row, _ in keep],
                     dtype=object)
        best = None
        for view in names:
            X = np.stack([v[view] for v in views])
            acc = ceiling(X, y, groups)
            if acc is not None and (best is None or acc > best[1]):
                best = (view, acc)
        out[name] = best
    return out


def print_table(lines: list[dict], ceilings: dict) -> None:
    head = "| labelled | order | " + " | ".join(f"{a} shown / cover / wrong" for a in ATTRIBUTES) + " |"
    print()
    print(head)
    print("|" + "---|" * (2 + len(ATTRIBUTES)))
    for line in sorted(lines, key=lambda l: (l["order"] != "score", l["labelled"])):
        f = line["figures"]
        print(f"| {line['labelled']} | {line['order']} | " + " | ".join(
            f"{_pct(f[a]['shown'])} / {_pct(f[a]['cover'])} / {_pct(f[a]['wrong'])}" for a in ATTRIBUTES)
            + " |")
    first = lines[0]["figures"]
    print("| majority baseline | | " + " | ".join(_pct(first[a]["majority"]) for a in ATTRIBUTES) + " |")
    print("| supervised ceiling (view) | | " + " | ".join(
        f"{_pct(ceilings[a][1])} ({ceilings[a][0]})" if ceilings.get(a) else "—" for a in ATTRIBUTES) + " |")
    below = [(l["order"], l["labelled"], a) for l in lines for a in ATTRIBUTES
             if l["figures"][a]["shown"] is not None and l["figures"][a]["majority"] is not None
             and l["figures"][a]["shown"] < l["figures"][a]["majority"]]
    print(f"shown below the majority baseline: {below or 'never'}")
    by = {(l["order"], l["labelled"]): l["figures"] for l in lines}
    behind = []
    for (order, n), f in by.items():
        if order != "score" or ("random", n) not in by:
            continue
        for a in ATTRIBUTES:
            s, rr = f[a], by[("random", n)][a]
            # "Ahead": more faces rightly shown (accuracy x coverage), the labeler's gain.
            gain = lambda x: (x["cover"] or 0) * (x["shown"] or 0)
            if gain(s) < gain(rr):
                behind.append((n, a, round(100 * gain(s), 1), round(100 * gain(rr), 1)))
    print(f"advised order behind random (right shown %, score vs random): {behind or 'never'}")


if __name__ == "__main__":
    sys.exit(main())

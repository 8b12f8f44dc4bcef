"""/predict as Label Studio sees it: latency on cached tasks, and a big uncached batch end to end.

    python bench/predict.py [--faces ../shared/faces/dev] [--n 1000] [--workers 1,2] [--repeat 50]

Starts its own redis-server, the backend (`subdisc serve`, gunicorn) and workers through
backend/stack.py (as `subdisc up` does), and a stand-in for Label Studio (tests/backend/standin.py),
all on free ports. For each worker count, on a cold cache:
one /predict with N LFW dev photos ("Retrieve predictions" on N tasks) and the time until the last
prediction is posted to the stand-in (one bulk import per batch of SUBDISC_BATCH_SIZE). After the first run the photos are cached,
and /predict latency is measured for 1 and 100 cached tasks (p50, p99 over --repeat calls).
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import redis  # noqa: E402
import requests  # noqa: E402

from backend.labeling_config import default_config_xml  # noqa: E402
from backend.model import PENDING_SUFFIX  # noqa: E402
from backend.stack import Stack, free_port, stop_on_sigterm  # noqa: E402
from tests.backend.standin import StandInLabelStudio  # noqa: E402
from tests.support import DEV_FACES  # noqa: E402
from workers.pipeline import describe_dlib  # noqa: E402

PROJECT = "1.1714000000"
QUEUE = "bench-predict"


def task(task_id: int, path: str) -> dict:
    return {"id": task_id, "data": {"image": path}, "project": 1, "annotations": [], "predictions": [],
            "meta": {}, "is_labeled": False, "overlap": 1, "inner_id": task_id}


def body(tasks, config) -> dict:
    return {"tasks": tasks, "project": PROJECT, "label_config": config,
            "params": {"login": None, "password": None, "context": None}}


def percentile(xs, q) -> float:
    return float(np.percentile(np.asarray(xs) * 1000, q))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--faces", type=Path, default=DEV_FACES)
    ap.add_argument("--n", type=int, default=1000, help="uncached tasks per run (default 1000)")
    ap.add_argument("--workers", default="1,2", help="worker counts (default 1,2)")
    ap.add_argument("--repeat", type=int, default=50, help="cached /predict calls per size")
    ap.add_argument("--timeout", type=float, default=1800,
                    help="seconds to wait for all predictions of a run (default 1800)")
    args = ap.parse_args()
    stop_on_sigterm()   # a killed bench stops its Redis, backend and workers too
    rows = [r for r in csv.DictReader((args.faces / "labels.csv").open()) if r["source"] == "lfw"]
    paths = [str((args.faces / r["path"]).resolve()) for r in rows][: args.n]
    if len(paths) < args.n:
        print(f"only {len(paths)} LFW photos under {args.faces}")
    config = default_config_xml()

    tmp = Path(tempfile.mkdtemp(prefix="bench-predict-"))
    # The photos' folder is the backend's local-files root, as a user's Label Studio storage would
    # be: the backend reads no local path outside the roots it is given.
    env = {"SUBDISC_QUEUE": QUEUE, "SUBDISC_LOCAL_FILES_ROOT": str(args.faces.resolve())}
    # What the backend must not take from this shell: the bench is its own Label Studio.
    for name in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "SUBDISC_PRIOR", "SUBDISC_FALLBACK",
                 "BASIC_AUTH_USER", "BASIC_AUTH_PASS", "SUBDISC_EXTRA_ROOTS"):
        os.environ.pop(name, None)
    latency = None
    with StandInLabelStudio(token="bench") as ls:
        for run, n_workers in enumerate(int(w) for w in args.workers.split(",")):
            ls.predictions.clear()
            # A fresh stack per run (Redis, backend, workers) in its own folder: runs share no
            # cache and no state (Redis keeps its data on disk, so one folder would carry it over).
            workdir = tmp / f"run-{run}-{n_workers}-workers"
            with Stack(workdir) as stack:
                redis_url = stack.start_redis(free_port(), workdir / "redis")
                env["SUBDISC_REDIS_URL"] = redis_url
                url = stack.start_backend(free_port(), env, workers=2)
                r = redis.Redis.from_url(redis_url)
                http = requests.Session()
                if latency is None:
                    print(f"{describe_dlib()}; {os.cpu_count()} CPUs; backend: gunicorn 2 workers")
                stack.start_workers(n_workers, redis_url, QUEUE, env)
                while len(r.smembers("rq:workers")) < n_workers:  # models loaded: time the work only
                    stack.check_alive()
                    time.sleep(0.1)
                http.post(url + "/setup", json={"project": PROJECT, "schema": config,
                                                "hostname": ls.url, "access_token": "bench"})
                tasks = [task(i + 1, p) for i, p in enumerate(paths)]
                t0 = time.time()
                resp = http.post(url + "/predict", json=body(tasks, config), timeout=100)
                answered = time.time() - t0
                pending = sum(p["model_version"].endswith(PENDING_SUFFIX) for p in resp.json()["results"])
                if pending < len(tasks):   # answered at once: refused or unreadable, nothing to time
                    print(f"only {pending} of {len(tasks)} tasks were queued; the others' errors: "
                          f"{http.get(url + '/report', params={'project': PROJECT}).text[:500]}")
                    return 1
                got = ls.wait_for(len(tasks), timeout=args.timeout)
                first = min(p["_received"] for p in got) - t0
                last = max(p["_received"] for p in got) - t0
                with_faces = sum(bool(p["result"]) for p in got)
                imports = sum(1 for r in ls.requests if r[0] == "POST" and r[1].endswith("/import/predictions"))
                singles = sum(1 for r in ls.requests if r[:2] == ("POST", "/api/predictions"))
                ls.requests.clear()
                # Every task exactly once: a lost or doubled batch would be a bug, not a figure.
                assert sorted(p["task"] for p in got) == [t["id"] for t in tasks], "tasks lost or doubled"
                print(f"uncached, {n_workers} worker(s): /predict of {len(tasks)} tasks answered in "
                      f"{answered:.2f}s ({pending} pending); first prediction posted after "
                      f"{first:.1f}s, last of {len(got)} after {last:.1f}s "
                      f"({len(tasks) / last:.1f} tasks/s; {with_faces} with a face; "
                      f"{imports} bulk imports, {singles} single posts)", flush=True)
                if latency is None:
                    latency = {}
                    for size in (1, 100):
                        calls = []
                        for rep in range(args.repeat):
                            start_t = time.perf_counter()
                            out = http.post(url + "/predict", json=body(tasks[rep:rep + size], config))
                            calls.append(time.perf_counter() - start_t)
                            assert out.status_code == 200 and not any(
                                p["model_version"].endswith(PENDING_SUFFIX) for p in out.json()["results"])
                        latency[size] = calls
                        print(f"cached, {size} task(s): /predict p50 {percentile(calls, 50):.1f} ms, "
                              f"p99 {percentile(calls, 99):.1f} ms over {len(calls)} calls", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

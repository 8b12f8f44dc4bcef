"""Embedding throughput on the labelled dev photos: 1 and 2 RQ workers, cold cache and warm cache.

    python bench/embed.py [--faces ../shared/faces/dev] [--n 400] [--workers 1,2]
                          [--python .venv/bin/python --python /usr/bin/python3]

Prints, per interpreter (each may carry another dlib build) and worker count: images/s and faces/s
on a cold cache, time per image on a warm cache (all hits), and the peak memory (PSS, so pages
shared by fork are not counted twice) of each worker with its work-horse. Every run starts a fresh
stack (backend/stack.py: redis-server and workers, as `subdisc up` does) on a free port, so runs
never share a cache.
"""
from __future__ import annotations

import argparse
import csv
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from backend.stack import Stack, free_port, stop_on_sigterm  # noqa: E402
from tests.support import DEV_FACES  # noqa: E402
from workers.client import embed  # noqa: E402
from workers.pipeline import PipelineOptions  # noqa: E402


def pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [pid] + [int(p) for p in out.stdout.split()]


class MemoryWatch(threading.Thread):
    """Samples the PSS of each worker's process tree (worker + work-horse) every 100 ms."""

    def __init__(self, pids):
        super().__init__(daemon=True)
        self.pids, self.peak, self.stop = pids, {p: 0 for p in pids}, threading.Event()

    def run(self):
        while not self.stop.is_set():
            for pid in self.pids:
                self.peak[pid] = max(self.peak[pid], sum(pss_kb(p) for p in tree(pid)))
            time.sleep(0.1)


def run_once(python: str, n_workers: int, sources: list[str], options: PipelineOptions) -> dict:
    workdir = tempfile.mkdtemp(prefix="subdisc-bench-")
    with Stack(workdir) as stack:
        url = stack.start_redis(free_port(), workdir)
        conn = redis.Redis.from_url(url)
        workers = stack.start_workers(n_workers, url, "bench", python=python)
        # Wait until the workers have loaded their models, so start-up is not timed.
        while len(conn.smembers("rq:workers")) < n_workers:
            stack.check_alive()
            time.sleep(0.1)
        watch = MemoryWatch([w.proc.pid for w in workers])
        watch.start()
        cold = embed(sources, redis=conn, options=options, queue_name="bench", progress=False,
                     batch_size=8)
        watch.stop.set()
        warm = embed(sources, redis=conn, options=options, queue_name="bench", progress=False)
    shutil.rmtree(workdir, ignore_errors=True)
    dlib = subprocess.run([python, "-c", "from workers.pipeline import describe_dlib as d; "
                           "print(d().split(' -- ')[0])"], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                          text=True).stdout.strip()
    s = cold.summary
    return {
        "dlib": dlib, "workers": n_workers, "images": s["images"], "faces": s["faces"],
        "errors": sum(s["errors"].values()), "seconds": s["seconds"],
        "images_per_s": s["images"] / s["seconds"], "faces_per_s": s["faces"] / s["seconds"],
        "hit_ms": 1000 * warm.summary["seconds"] / warm.summary["images"],
        "peak_mb": max(watch.peak.values()) / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=Path, default=DEV_FACES)
    parser.add_argument("--n", type=int, default=400, help="photos sampled from the dev set")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--python", action="append", help="interpreter(s) to run workers with")
    parser.add_argument("--fallback", action=argparse.BooleanOptionalAction, default=True,
                        help="take a photo with no detected face as one face (default on: dev photos are crops)")
    args = parser.parse_args()
    stop_on_sigterm()   # a killed bench stops its Redis and workers too
    labels = args.faces / "labels.csv"
    if not labels.exists():
        sys.exit(f"no labelled photos at {args.faces} (give --faces DIR)")
    with labels.open() as f:
        rows = list(csv.DictReader(f))
    random.Random(0).shuffle(rows)  # a mix of sources: LFW news photos, UTK crops, MTFL, Yale
    sources = [str(args.faces / r["path"]) for r in rows[: args.n]]
    options = PipelineOptions(fallback=args.fallback)

    print(f"{len(sources)} photos from {args.faces}, options: {options}\n")
    header = (f"{'dlib build':52} {'workers':>7} {'images/s':>9} {'faces/s':>8} "
              f"{'hit ms/img':>10} {'peak MB/worker':>14}")
    print(header)
    print("-" * len(header))
    rows_out = []
    for python in args.python or [sys.executable]:
        for n in [int(x) for x in args.workers.split(",")]:
            r = run_once(python, n, sources, options)
            rows_out.append(r)
            print(f"{r['dlib']:52} {n:>7} {r['images_per_s']:>9.2f} {r['faces_per_s']:>8.2f} "
                  f"{r['hit_ms']:>10.3f} {r['peak_mb']:>14.0f}", flush=True)
    by = {(r["dlib"], r["workers"]): r for r in rows_out}
    builds = list(dict.fromkeys(r["dlib"] for r in rows_out))
    if len(builds) == 2:
        for n in sorted({r["workers"] for r in rows_out}):
            a, b = by.get((builds[0], n)), by.get((builds[1], n))
            if a and b:
                print(f"\n{n} worker(s): {builds[0]} is {a['images_per_s'] / b['images_per_s']:.2f}x "
                      f"the images/s of {builds[1]}")


if __name__ == "__main__":
    main()

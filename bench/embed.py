"""Embedding throughput on the labelled dev photos: this pipeline (onnxruntime or dlib's descriptor)
against face_recognition.face_encodings, per worker and per core, and the throughput knobs.

    python bench/embed.py [--faces ../shared/faces/dev] [--lfw 300] [--mtfl 100]
                          [--knob-photos 160] [--batch-sizes 8,32,64] [--workers 1,2,3,4]

1. The same photos (LFW then MTFL, seeded sample) through: one RQ worker of this pipeline (fresh
   stack from backend/stack.py, as `subdisc up` runs it, fresh cache; jobs of the default batch size, 32); the same with
   SUBDISC_DESCRIPTOR=dlib; and face_recognition.face_encodings(photo) in one process (`pip install
   --no-deps face_recognition`: a bench-only dependency). Per row: photos/s and faces/s of wall time,
   photos per CPU-second of the worker (work-horses included: what one core gives, whatever else the
   machine runs), and peak memory per worker (PSS of worker + work-horse; RSS for face_recognition).
   The LFW photos are also timed on their own (photos per CPU-second on one core).
2. The knobs, on the first --knob-photos photos: batch size per job (with one worker per core) and
   workers per core (jobs of 32): photos/s of wall time for the whole stack.
Figures are noisy on a shared machine: compare rows of one run, and prefer the CPU-second columns.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import resource
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
from workers.client import BATCH_SIZE, embed  # noqa: E402
from workers.pipeline import PipelineOptions, describe_dlib  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


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


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and of its children it has waited for (finished work-horses)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15]) / TICKS   # utime, stime, cutime, cstime


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


def run_stack(groups: dict[str, list[str]], n_workers: int, options: PipelineOptions,
              batch_size: int = BATCH_SIZE, env: dict | None = None) -> dict:
    """Each group of photos through a fresh stack of n_workers, one after the other."""
    workdir = tempfile.mkdtemp(prefix="subdisc-bench-")
    out = {}
    with Stack(workdir) as stack:
        url = stack.start_redis(free_port(), workdir)
        conn = redis.Redis.from_url(url)
        workers = stack.start_workers(n_workers, url, "bench", env=env)
        while len(conn.smembers("rq:workers")) < n_workers:   # models loaded: start-up not timed
            stack.check_alive()
            time.sleep(0.1)
        pids = [w.proc.pid for w in workers]
        watch = MemoryWatch(pids)
        watch.start()
        for name, sources in groups.items():
            cpu0, wall0 = sum(cpu_seconds(p) for p in pids), time.perf_counter()
            result = embed(sources, redis=conn, options=options, queue_name="bench",
                           progress=False, batch_size=batch_size)
            wall = time.perf_counter() - wall0
            time.sleep(0.3)   # the last work-horse reaped, so its CPU time is counted
            s = result.summary
            out[name] = {"photos": s["images"], "faces": s["faces"], "wall": wall,
                         "cpu": sum(cpu_seconds(p) for p in pids) - cpu0,
                         "errors": sum(s["errors"].values())}
        watch.stop.set()
        out["peak_mb"] = max(watch.peak.values()) / 1024
    shutil.rmtree(workdir, ignore_errors=True)
    return out


def face_recognition_child(list_file: str) -> None:
    """In its own process: face_recognition.face_encodings on each photo of each group."""
    import face_recognition
    import numpy as np
    from PIL import Image

    groups = json.loads(Path(list_file).read_text())
    out = {}
    for name, sources in groups.items():
        usage0, wall0, faces = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(), 0
        for source in sources:
            rgb = np.asarray(Image.open(source).convert("RGB"))
            faces += len(face_recognition.face_encodings(rgb))
        usage = resource.getrusage(resource.RUSAGE_SELF)
        out[name] = {"photos": len(sources), "faces": faces, "wall": time.perf_counter() - wall0,
                     "cpu": usage.ru_utime + usage.ru_stime - usage0.ru_utime - usage0.ru_stime,
                     "errors": 0}
    out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def run_face_recognition(groups: dict[str, list[str]]) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(groups, f)
    try:
        done = subprocess.run([sys.executable, __file__, "--face-recognition-child", f.name],
                              capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    finally:
        os.unlink(f.name)
    if done.returncode:
        sys.exit(f"face_recognition failed (pip install --no-deps face_recognition?):\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def merged(run: dict) -> dict:
    total = {k: sum(run[g][k] for g in ("lfw", "mtfl")) for k in ("photos", "faces", "wall", "cpu", "errors")}
    return {**total, "lfw": run["lfw"], "peak_mb": run["peak_mb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=Path, default=DEV_FACES)
    parser.add_argument("--lfw", type=int, default=300)
    parser.add_argument("--mtfl", type=int, default=100)
    parser.add_argument("--knob-photos", type=int, default=160)
    parser.add_argument("--batch-sizes", default="8,32,64")
    parser.add_argument("--workers", default="1,2,3,4", help="worker counts for the knob table")
    parser.add_argument("--face-recognition-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.face_recognition_child:
        return face_recognition_child(args.face_recognition_child)
    stop_on_sigterm()   # a killed bench stops its Redis and workers too
    labels = args.faces / "labels.csv"
    if not labels.exists():
        sys.exit(f"no labelled photos at {args.faces} (give --faces DIR)")
    with labels.open() as f:
        rows = list(csv.DictReader(f))
    random.Random(0).shuffle(rows)
    groups = {s: [str(args.faces / r["path"]) for r in rows if r["source"] == s][:n]
              for s, n in (("lfw", args.lfw), ("mtfl", args.mtfl))}
    from PIL import Image

    sizes = sorted({"x".join(map(str, Image.open(p).size)) for p in groups["lfw"]})
    cores = os.cpu_count()
    print(f"{args.lfw} LFW ({', '.join(sizes)}) + {args.mtfl} MTFL photos from {args.faces}; "
          f"{cores} CPUs, shared (noisy); {describe_dlib()}")
    print(f"load average at start: {os.getloadavg()[0]:.1f}\n")

    onnx = PipelineOptions(descriptor="onnx")
    runs = {
        "subdisc (onnxruntime descriptor)": merged(run_stack(groups, 1, onnx)),
        "subdisc, SUBDISC_DESCRIPTOR=dlib": merged(run_stack(
            groups, 1, PipelineOptions(descriptor="dlib"), env={"SUBDISC_DESCRIPTOR": "dlib"})),
        "face_recognition.face_encodings": merged(run_face_recognition(groups)),
    }
    header = (f"{'1 worker, same photos':34} {'photos':>6} {'faces':>6} {'photos/s':>8} {'faces/s':>8} "
              f"{'photos/CPU-s':>12} {'LFW photos/CPU-s':>16} {'peak MB':>7}")
    print(header)
    print("-" * len(header))
    for name, r in runs.items():
        print(f"{name:34} {r['photos']:>6} {r['faces']:>6} {r['photos'] / r['wall']:>8.2f} "
              f"{r['faces'] / r['wall']:>8.2f} {r['photos'] / r['cpu']:>12.2f} "
              f"{r['lfw']['photos'] / r['lfw']['cpu']:>16.2f} {r['peak_mb']:>7.0f}")
    ours, dlib_own, fr = runs.values()
    per_core = (ours["photos"] / ours["cpu"]) / (fr["photos"] / fr["cpu"])
    print(f"\nper core (photos per CPU-second): subdisc is {per_core:.1f}x face_recognition "
          f"(wall: {(ours['photos'] / ours['wall']) / (fr['photos'] / fr['wall']):.1f}x), "
          f"{(ours['photos'] / ours['cpu']) / (dlib_own['photos'] / dlib_own['cpu']):.1f}x "
          f"SUBDISC_DESCRIPTOR=dlib; LFW on one core: "
          f"{ours['lfw']['photos'] / ours['lfw']['cpu']:.1f} photos/CPU-s "
          f"({ours['lfw']['photos'] / ours['lfw']['wall']:.1f} photos/s wall)")
    print(f"load average now: {os.getloadavg()[0]:.1f}\n")

    knob = {"knob": (groups["lfw"] + groups["mtfl"])[: args.knob_photos]}
    header = f"{'knob':28} {'workers':>7} {'batch':>5} {'photos/s':>8} {'per worker':>10} {'peak MB':>7}"
    print(f"knobs on {len(knob['knob'])} of those photos (fresh stack and cache each; wall time)")
    print(header)
    print("-" * len(header))
    settings = [("batch size per job", cores, int(b)) for b in args.batch_sizes.split(",")]
    settings += [("workers per core", int(w), BATCH_SIZE) for w in args.workers.split(",") if int(w) != cores]
    for name, workers, batch in settings:
        r = run_stack(knob, workers, onnx, batch_size=batch)
        rate = r["knob"]["photos"] / r["knob"]["wall"]
        print(f"{name:28} {workers:>7} {batch:>5} {rate:>8.2f} {rate / workers:>10.2f} "
              f"{r['peak_mb']:>7.0f}", flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

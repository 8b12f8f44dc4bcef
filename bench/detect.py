"""Adaptive detection (upsample="auto") against upsample 1 on the labelled dev photos: faces and time.

    python bench/detect.py [--faces ../shared/faces/dev] [--lfw 400] [--mtfl 200] [--yale 54]

For each photo, in one process and interleaved (so machine load hits both alike), it runs the face
search (detection, landmarks and chips: FacePipeline.find) with upsample=1 and with each other policy
(--policies, default auto and 0), and prints per source: faces found, the share of upsample 1's faces
the policy also finds (a face is the same when one box covers >= 50 % of the other), photos where auto
looked again, and the search's ms per photo.
"""
from __future__ import annotations

import argparse
import csv
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support import DEV_FACES  # noqa: E402
from workers.images import FetchSettings, decode  # noqa: E402
from workers.pipeline import PipelineOptions, _overlap, get_pipeline, parse_upsample  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=Path, default=DEV_FACES)
    parser.add_argument("--lfw", type=int, default=400)
    parser.add_argument("--mtfl", type=int, default=200)
    parser.add_argument("--yale", type=int, default=54)
    parser.add_argument("--policies", default="auto,0", help="compared with upsample 1")
    args = parser.parse_args()
    labels = args.faces / "labels.csv"
    if not labels.exists():
        sys.exit(f"no labelled photos at {args.faces} (give --faces DIR)")
    with labels.open() as f:
        rows = list(csv.DictReader(f))
    random.Random(0).shuffle(rows)
    wanted = {"lfw": args.lfw, "mtfl": args.mtfl, "yale": args.yale}
    photos = []
    for source, n in wanted.items():
        photos += [(source, args.faces / r["path"]) for r in rows if r["source"] == source][:n]
    policies = [parse_upsample(p) for p in args.policies.split(",")]
    reference = get_pipeline(PipelineOptions(upsample=1))
    pipelines = {p: get_pipeline(PipelineOptions(upsample=p)) for p in policies}
    fetch = FetchSettings()
    stats = defaultdict(lambda: defaultdict(float))
    sizes = defaultdict(set)
    for source, path in photos:
        rgb = decode(path.read_bytes(), fetch)
        sizes[source].add(f"{rgb.shape[1]}x{rgb.shape[0]}")
        started = time.perf_counter()
        ref = reference.find(rgb)
        stats[(source, 1)]["seconds"] += time.perf_counter() - started
        stats[(source, 1)]["faces"] += len(ref)
        stats[(source, 1)]["photos"] += 1
        for policy, pipeline in pipelines.items():
            started = time.perf_counter()
            found = pipeline.find(rgb)
            st = stats[(source, policy)]
            st["seconds"] += time.perf_counter() - started
            st["faces"] += len(found)
            st["photos"] += 1
            st["of_ref"] += sum(any(_overlap(a, b) >= 0.5 for b in found.boxes) for a in ref.boxes)
            if policy == "auto":
                # (not timed) what auto decided: nothing at upsample 0, or a large photo
                st["again"] += (not pipeline._detect_at(rgb, 0)
                                or min(rgb.shape[:2]) >= pipeline.options.small_faces_from)
    print(f"{len(photos)} dev photos from {args.faces}; sizes: "
          + "; ".join(f"{s} {', '.join(sorted(v)[:4])}{' ...' if len(v) > 4 else ''}"
                      for s, v in sizes.items()))
    header = (f"{'source':6} {'upsample':>8} {'photos':>6} {'faces':>6} {'of up-1 faces':>14} "
              f"{'looked again':>12} {'ms/photo':>9} {'vs up 1':>8}")
    print(header)
    print("-" * len(header))
    for source in [*wanted, "all"]:
        keys = [k for k in stats if source in (k[0], "all")]
        for policy in [1, *policies]:
            st = defaultdict(float)
            for k in keys:
                if k[1] == policy:
                    for name, v in stats[k].items():
                        st[name] += v
            if not st["photos"]:
                continue
            ref_st = defaultdict(float)
            for k in keys:
                if k[1] == 1:
                    for name, v in stats[k].items():
                        ref_st[name] += v
            share = "" if policy == 1 else f"{100 * st['of_ref'] / max(1, ref_st['faces']):.1f} %"
            again = f"{int(st['again'])}" if policy == "auto" else ""
            ms = 1000 * st["seconds"] / st["photos"]
            ratio = ref_st["seconds"] / st["seconds"]
            print(f"{source:6} {str(policy):>8} {int(st['photos']):>6} {int(st['faces']):>6} "
                  f"{share:>14} {again:>12} {ms:>9.1f} {ratio:>7.2f}x")


if __name__ == "__main__":
    main()

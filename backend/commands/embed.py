"""`subdisc embed PATHS... | --list FILE.csv`: faces and vectors for many photos, via the workers."""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import redis as redis_lib

from backend.cli import CommandError
from workers.client import BATCH_SIZE
from workers.connection import queue_name, redis_url
from workers.images import image_files
from workers.pipeline import parse_upsample



def register(sub) -> None:
    p = sub.add_parser("embed", help="find faces and compute their vectors (cached in Redis)",
                       description=__doc__)
    p.add_argument("paths", nargs="*", help="image files, folders (searched recursively) or URLs")
    p.add_argument("--list", metavar="FILE.csv", type=Path,
                   help="a CSV whose 'path' column (else first column) names the images, "
                        "relative to the CSV's folder")
    p.add_argument("--inline", action="store_true",
                   help="compute in this process instead of on RQ workers (still cached in Redis)")
    p.add_argument("--out", metavar="FILE", type=Path, help="export faces to FILE.npz or FILE.jsonl")
    p.add_argument("--limit", type=int, help="only the first N images")
    add_pipeline_arguments(p)
    add_connection_arguments(p)
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE,
                   help=f"images per RQ job (default {BATCH_SIZE})")
    p.add_argument("--timeout", type=float, help="seconds to wait for the workers")
    p.add_argument("--retry-errors", action="store_true",
                   help="try again the photos whose earlier attempt is cached as an error")
    p.add_argument("--allow-host", action="append", default=[], metavar="HOST",
                   help="a host http(s) URLs may be fetched from ('*' for any)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def add_pipeline_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("face pipeline")
    g.add_argument("--detector", choices=["hog", "cnn"], default="hog",
                   help="hog: dlib's frontal detector (the study's); cnn: MMOD, slower, more poses")
    g.add_argument("--upsample", type=parse_upsample, default="auto",
                   help="detector upsampling: 0-4, or auto (default: 0, then 1 where it can pay)")
    g.add_argument("--landmarks", type=int, choices=[68, 5], default=68)
    g.add_argument("--jitter", type=int, default=0, help="descriptor jitter passes (default 0)")
    g.add_argument("--fallback", action="store_true",
                   help="treat the whole image as the face when none is detected (pre-cropped photos)")
    g.add_argument("--max-side", type=int, default=1600,
                   help="downscale larger photos for detection only (default 1600 px)")


def add_connection_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis", default=redis_url(),
                   help="Redis URL (default $SUBDISC_REDIS_URL or redis://127.0.0.1:6379/0)")
    p.add_argument("--queue", default=queue_name(),
                   help="RQ queue of the workers (default 'subdisc')")


def pipeline_options(args):
    from workers.pipeline import PipelineOptions

    try:
        return PipelineOptions(detector=args.detector, upsample=args.upsample,
                               landmarks=args.landmarks, jitter=args.jitter,
                               fallback=args.fallback, max_side=args.max_side)
    except ValueError as exc:
        raise CommandError(str(exc)) from exc


def connect(url: str) -> redis_lib.Redis:
    client = redis_lib.Redis.from_url(url)
    try:
        client.ping()
    except redis_lib.ConnectionError as exc:
        raise CommandError(f"cannot reach Redis at {url} ({exc}); start it, or pass --redis URL") from exc
    return client


def collect_sources(paths: list[str], list_file: Path | None) -> list[str]:
    """Image sources from arguments (folders expanded, sorted) and from a CSV list."""
    sources: list[str] = []
    for item in paths:
        path = Path(item)
        if "://" in item or not path.is_dir():
            sources.append(item)  # a file, a URL, or a missing path (reported as not_found)
        else:
            sources.extend(str(p) for p in image_files(path))
    if list_file is not None:
        if not list_file.exists():
            raise CommandError(f"no such list file: {list_file}")
        with list_file.open(newline="") as f:
            reader = csv.DictReader(f)
            column = "path" if "path" in (reader.fieldnames or []) else (reader.fieldnames or [None])[0]
            if column is None:
                raise CommandError(f"{list_file} has no columns")
            for row in reader:
                value = row[column]
                if value:
                    sources.append(value if "://" in value else str(list_file.parent / value))
    return sources


def run(args) -> int:
    from workers import export
    from workers.client import embed
    from workers.images import FetchSettings
    from workers.pipeline import describe_dlib

    sources = collect_sources(args.paths, args.list)
    if args.limit is not None:
        sources = sources[: args.limit]
    if not sources:
        raise CommandError("no images: give paths, folders, URLs or --list FILE.csv")
    options = pipeline_options(args)
    redis = connect(args.redis)
    if args.inline:
        print(describe_dlib())
    fetch = FetchSettings.from_env(allowed_hosts=tuple(args.allow_host) or None)
    results = embed(sources, redis=redis, options=options, inline=args.inline, fetch=fetch,
                    retry_errors=args.retry_errors, queue_name=args.queue,
                    batch_size=args.batch_size, timeout=args.timeout)
    summary = dict(results.summary)
    if args.out:
        summary["out"] = str(export.save(results, args.out))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
    return 0


def format_summary(s: dict) -> str:
    errors = ", ".join(f"{kind}: {n}" for kind, n in sorted(s["errors"].items())) or "none"
    lines = [
        f"images: {s['images']}  faces: {s['faces']}  cache hits: {s['hits']}  computed: {s['computed']}",
        f"errors: {errors}",
        f"time: {s['seconds']:.1f} s  ({s['images_per_second']} images/s)",
    ]
    if "out" in s:
        lines.append(f"exported to {s['out']}")
    return "\n".join(lines)

"""`subdisc study`: the seed study's experiments on your own labelled photos.

    subdisc study --labels labels.csv --images DIR --attributes skin,gender,age_group --k 2,4,8 \\
        --runs 5 --where source=utk --holdout 0.3 --algo kmeans,gmm --out report/

Prints the tables (one row per attribute value, one column per run, then the average, beside the
majority baseline and the balanced accuracy) and writes study.md / study.json / study.html (and the
held-out centroid models, model-<algo>.npz) into --out.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from backend.cli import CommandError


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, not {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, not {text!r}")
    return values


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def register(sub) -> None:
    from backend.attributes.clustering import CLUSTERERS, PREPROCESS
    from backend.commands.embed import add_connection_arguments, add_pipeline_arguments

    p = sub.add_parser("study", help="cluster labelled faces and score the clusters (the seed study)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labels", type=Path, required=True, metavar="CSV",
                   help="labels CSV: a 'path' column (relative to --images), one column per attribute")
    p.add_argument("--images", type=Path, metavar="DIR",
                   help="folder the label paths are relative to (default: the CSV's folder)")
    p.add_argument("--attributes", type=_names, default=[],
                   help="extra-class attributes, e.g. skin,gender,age_group")
    p.add_argument("--k", type=_int_list, default=[2, 4, 8], help="cluster counts (default 2,4,8)")
    p.add_argument("--runs", type=int, default=5, help="clusterings per k, seeds seed.. (default 5)")
    p.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE[,VALUE]",
                   help="keep only rows matching (repeatable), e.g. source=utk")
    p.add_argument("--cluster-algo", default="kmeans", choices=sorted(CLUSTERERS),
                   help="clusterer of the extra- and intra-class studies (default kmeans)")
    p.add_argument("--preprocess", default="none", choices=PREPROCESS,
                   help="vector preprocessing before clustering (default none, as the study)")
    p.add_argument("--holdout", type=float, metavar="SHARE",
                   help="also fit centroids on a training split and test on this share (e.g. 0.3)")
    p.add_argument("--algo", type=_names, default=["kmeans", "gmm"],
                   help="algorithms of the holdout experiment (default kmeans,gmm)")
    p.add_argument("--intra", default="", metavar="SPEC",
                   help="intra-class comparisons, e.g. glasses,emotion=happiness/neutral")
    p.add_argument("--intra-view", type=_names, default=["vector"],
                   help="face views for intra-class: vector, mouth, smile, mouth-shape, vector+mouth")
    p.add_argument("--identity", default="identity",
                   help="identity column for intra-class, or 'cw' to find identities by Chinese whispers")
    p.add_argument("--cw-threshold", type=float, default=0.6,
                   help="Chinese whispers distance threshold (default dlib's 0.6; on thousands of "
                        "photos 0.45 merges fewer people)")
    p.add_argument("--min-per-value", type=int, default=3,
                   help="intra-class: faces needed of each value per identity (default 3)")
    p.add_argument("--efficiency", type=_int_list, metavar="N,N,...",
                   help="label-efficiency curve at these label counts, e.g. 2,5,10,20,50")
    p.add_argument("--draws", type=int, default=10, help="label draws per efficiency point (default 10)")
    p.add_argument("--no-ceiling", action="store_true", help="skip the supervised ceiling")
    p.add_argument("--vectors", type=Path, metavar="FILE.npz",
                   help="use a `subdisc embed --out` export instead of embedding the photos")
    p.add_argument("--inline", action="store_true",
                   help="embed in this process instead of on RQ workers (still cached in Redis)")
    p.add_argument("--out", type=Path, default=Path("study-report"),
                   help="folder for study.md / .json / .html (default ./study-report)")
    p.add_argument("--seed", type=int, default=0, help="first random seed (default 0)")
    add_pipeline_arguments(p)
    add_connection_arguments(p)
    p.set_defaults(func=run)


def load_faces(args, rows):
    from backend.attributes import study

    images = args.images or args.labels.parent
    if not images.is_dir():
        raise CommandError(f"no such images folder: {images}")
    if args.vectors is not None:
        if not args.vectors.exists():
            raise CommandError(f"no such vectors file: {args.vectors}")
        try:
            return study.faces_from_vectors_file(rows, images, args.vectors)
        except (KeyError, ValueError, OSError) as exc:
            raise CommandError(f"cannot read vectors from {args.vectors}: {exc}") from exc
    from backend.commands.embed import connect, pipeline_options
    from workers.client import embed
    from workers.pipeline import fingerprint

    options = pipeline_options(args)
    sources = [str(images / r["path"]) for r in rows]
    results = embed(sources, redis=connect(args.redis), options=options, inline=args.inline,
                    progress=True, queue_name=args.queue)
    faces = study.faces_from_embeddings(rows, images, results)
    faces.fingerprint = fingerprint(options)
    return faces


def run(args) -> int:
    from backend.attributes import report, study

    if not args.labels.exists():
        raise CommandError(f"no such labels file: {args.labels}")
    try:
        rows = study.filter_rows(study.read_labels(args.labels), study.parse_where(args.where))
        intra = study.IntraSpec.parse_list(args.intra)
    except ValueError as exc:
        raise CommandError(str(exc)) from exc
    if not rows:
        raise CommandError("no label rows left after --where")
    columns = set(rows[0])
    for name in args.attributes + [s.attribute for s in intra]:
        if name not in columns:
            raise CommandError(f"no column {name!r} in {args.labels} (columns: {', '.join(rows[0])})")
    if not args.attributes and not intra:
        raise CommandError("nothing to study: give --attributes and/or --intra")
    unknown = [v for v in args.intra_view if v not in study.VIEWS]
    if unknown:
        raise CommandError(f"unknown --intra-view {', '.join(unknown)}: use {', '.join(study.VIEWS)}")
    if args.holdout is not None and not 0 < args.holdout < 1:
        raise CommandError("--holdout is the test share, between 0 and 1 (e.g. 0.3)")

    faces = load_faces(args, rows)
    print(f"{len(faces)} of {len(rows)} labelled photos have a face"
          + (f" ({len(faces.missing)} without: see study.json)" if faces.missing else ""))
    config = study.StudyConfig(
        attributes=args.attributes, ks=args.k, runs=args.runs, algo=args.cluster_algo,
        preprocess=args.preprocess, seed=args.seed, holdout=args.holdout, holdout_algos=args.algo,
        intra=intra, intra_views=args.intra_view, identity=args.identity, cw_threshold=args.cw_threshold,
        min_per_value=args.min_per_value, ceiling=not args.no_ceiling,
        efficiency=args.efficiency or [], efficiency_draws=args.draws)
    try:
        result = study.run_study(faces, config, progress=lambda m: print(f"... {m}", file=sys.stderr))
    except ValueError as exc:
        raise CommandError(str(exc)) from exc
    print(report.text_report(result))
    paths = report.write_report(result, args.out, title=f"subdisc study of {args.labels.name}")
    if result.holdout is not None:
        for algo, model in result.holdout.models.items():
            paths[f"model-{algo}"] = model.save(args.out / f"model-{algo}.npz")
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return 0

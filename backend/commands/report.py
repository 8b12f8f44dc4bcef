"""`subdisc report --project ID`: how right the backend has been on a Label Studio project."""
from __future__ import annotations

import json
from pathlib import Path

from backend.cli import CommandError
from backend.commands.embed import add_connection_arguments, connect


def register(sub) -> None:
    p = sub.add_parser("report", help="per attribute: confirmations, pre-annotations accepted as is, "
                                      "cross-validated accuracy, history of refits",
                       description=__doc__)
    p.add_argument("--project", required=True, help="Label Studio project id")
    p.add_argument("--html", metavar="FILE", type=Path, help="also write the HTML page with plots")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_connection_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from backend import project_report

    redis = connect(args.redis)
    try:
        report = project_report.build(redis, args.project)
    except (LookupError, ValueError) as exc:
        raise CommandError(str(exc)) from exc
    print(json.dumps(report, indent=2) if args.json else project_report.text(report))
    if args.html:
        args.html.parent.mkdir(parents=True, exist_ok=True)
        args.html.write_text(project_report.render_html(report))
        print(f"wrote {args.html}")
    return 0

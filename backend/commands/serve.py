"""`subdisc serve`: the Label Studio ML backend under gunicorn (what `up` and docker run too)."""
from __future__ import annotations

import os
import sys


def register(sub) -> None:
    p = sub.add_parser("serve", help="run the Label Studio ML backend (gunicorn on backend.server:app)",
                       description=__doc__)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; "
                                                       "0.0.0.0 in a container)")
    p.add_argument("--port", type=int, default=9090, help="port (default 9090)")
    p.add_argument("--workers", type=int, default=2, help="gunicorn worker processes (default 2)")
    p.add_argument("--threads", type=int, default=4,
                   help="threads per worker, so a long /predict does not hold up webhooks (default 4)")
    p.add_argument("--timeout", type=int, default=120,
                   help="seconds before a stuck request's worker is restarted (default 120, above "
                        "Label Studio's 100 s predict timeout)")
    p.set_defaults(func=run)


def gunicorn_argv(args) -> list[str]:
    return [sys.executable, "-m", "gunicorn", "backend.server:app",
            "--bind", f"{args.host}:{args.port}", "--workers", str(args.workers),
            "--threads", str(args.threads), "--worker-class", "gthread",
            "--timeout", str(args.timeout), "--access-logfile", "-",
            # Without it every gunicorn of a user shares ~/.gunicorn/gunicorn.ctl: two backends on
            # one host fight over it. Nothing here uses gunicornc.
            "--no-control-socket"]


def run(args) -> int:
    argv = gunicorn_argv(args)
    # Replace this process: signals (docker stop, Ctrl-C) go straight to gunicorn's master.
    os.execv(argv[0], argv)
    return 0   # not reached

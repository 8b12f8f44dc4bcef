"""`subdisc` command line: one sub-command per module in backend/commands."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

#: Sub-command modules under backend.commands, in the order `subdisc --help` lists them.
COMMANDS = ["embed", "study", "up", "serve", "report"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="subdisc",
        description="Pre-annotate face attributes by zero-shot sub-discrimination of face embeddings.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"backend.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except CommandError as exc:
        print(f"subdisc {args.command}: error: {exc}", file=sys.stderr)
        return 2


class CommandError(Exception):
    """A user-facing error: printed without a traceback, exit code 2."""


if __name__ == "__main__":
    # Run through the imported module, not this __main__ copy: sub-commands raise
    # backend.cli.CommandError, which must be the class main() catches.
    from backend.cli import main as imported_main

    sys.exit(imported_main())

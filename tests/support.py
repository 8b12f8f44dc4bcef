"""Plain helpers shared by the tests (fixtures are in the conftest.py files)."""
from __future__ import annotations

import os
import socket
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The labelled dev photos; tests that need them skip when the folder is absent.
DEV_FACES = Path(os.environ.get("SUBDISC_DEV_FACES", ROOT.parent / "shared" / "faces" / "dev"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

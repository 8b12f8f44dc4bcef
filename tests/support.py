"""Plain helpers shared by the tests (fixtures are in the conftest.py files)."""
from __future__ import annotations

import os
from pathlib import Path

from backend.stack import free_port  # noqa: F401 (the tests' one way to pick a port)

ROOT = Path(__file__).resolve().parents[1]
#: The labelled dev photos; tests that need them skip when the folder is absent.
DEV_FACES = Path(os.environ.get("SUBDISC_DEV_FACES", ROOT.parent / "shared" / "faces" / "dev"))

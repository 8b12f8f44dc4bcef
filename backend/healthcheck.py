"""`python -m backend.healthcheck [URL]`: exit 0 if the backend's /health answers 200, else 1.

    python -m backend.healthcheck                       # http://127.0.0.1:9090/health
    python -m backend.healthcheck http://127.0.0.1:9091/health

Docker's health check for the backend (docker/docker-compose.yml). With BASIC_AUTH_USER and
BASIC_AUTH_PASS set, /health asks for them like every route, so they are sent (as Label Studio
sends them): a check without them would mark a protected backend unhealthy.
"""
from __future__ import annotations

import base64
import os
import sys
import urllib.error
import urllib.request

DEFAULT_URL = "http://127.0.0.1:9090/health"


def healthy(url: str = DEFAULT_URL, timeout: float = 5.0) -> bool:
    request = urllib.request.Request(url)
    # The same rule as backend.runtime.basic_auth (not imported: it loads the face pipeline's
    # modules, too much for a check every few seconds).
    user, password = os.environ.get("BASIC_AUTH_USER"), os.environ.get("BASIC_AUTH_PASS")
    if user and password:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return 0 if healthy(argv[0] if argv else DEFAULT_URL) else 1


if __name__ == "__main__":
    sys.exit(main())

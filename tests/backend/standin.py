"""A small real HTTP server standing in for Label Studio where the backend calls it.

    with StandInLabelStudio(token="abc", uploads=dir) as ls:
        ls.url                 # http://127.0.0.1:PORT
        ls.predictions         # bodies POSTed to /api/predictions (with their Authorization header)

Routes: POST /api/predictions (201, like Label Studio: the stored prediction with an id) and
GET /data/upload/<project>/<file> (files from `uploads`; 401 without "Authorization: Token <token>").
Also used by bench/predict.py.
"""
from __future__ import annotations

import http.server
import json
import threading
import time
from pathlib import Path


class StandInLabelStudio:
    def __init__(self, token: str = "ls-token", uploads: Path | None = None, fail_first: int = 0):
        self.token, self.uploads = token, uploads
        self.predictions: list[dict] = []
        self.requests: list[tuple[str, str, str]] = []   # (method, path, Authorization)
        self.fail_first = fail_first      # answer this many prediction POSTs with 503 first
        self._lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, body: bytes, ctype="application/json"):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _authorised(self):
                return self.headers.get("Authorization") == f"Token {outer.token}"

            def do_POST(self):
                auth = self.headers.get("Authorization", "")
                with outer._lock:
                    outer.requests.append(("POST", self.path, auth))
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path != "/api/predictions":
                    return self._send(404, b'{"detail": "not found"}')
                if not self._authorised():
                    return self._send(401, b'{"detail": "Authentication credentials were not provided."}')
                with outer._lock:
                    if outer.fail_first > 0:
                        outer.fail_first -= 1
                        return self._send(503, b'{"detail": "busy"}')
                    data = json.loads(body)
                    data["id"] = len(outer.predictions) + 1
                    data["_authorization"] = auth
                    data["_received"] = time.time()
                    outer.predictions.append(data)
                self._send(201, json.dumps(data).encode())

            def do_GET(self):
                with outer._lock:
                    outer.requests.append(("GET", self.path, self.headers.get("Authorization", "")))
                if not self.path.startswith("/data/upload/") or outer.uploads is None:
                    return self._send(404, b'{"detail": "not found"}')
                if not self._authorised():
                    return self._send(401, b'{"detail": "Authentication credentials were not provided."}')
                path = outer.uploads / self.path.split("/", 3)[-1]   # <project>/<file>
                if not path.is_file():
                    return self._send(404, b'{"detail": "not found"}')
                self._send(200, path.read_bytes(), "image/jpeg")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def wait_for(self, n: int, timeout: float) -> list[dict]:
        """The first n predictions received, waiting up to timeout seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.predictions) >= n:
                    return list(self.predictions)
            time.sleep(0.1)
        raise TimeoutError(f"{len(self.predictions)} of {n} predictions received in {timeout}s")

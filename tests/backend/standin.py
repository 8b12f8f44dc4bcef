"""A small real HTTP server standing in for Label Studio where the backend calls it.

    with StandInLabelStudio(token="abc", uploads=dir) as ls:
        ls.url                 # http://127.0.0.1:PORT
        ls.predictions         # bodies POSTed to /api/predictions (with their Authorization header)

Routes: POST /api/predictions (201, like Label Studio: the stored prediction with an id) and
GET /data/upload/<project>/<file> (files from `uploads`; 401 without "Authorization: Token <token>").
Also used by bench/predict.py.

    ls.annotate(task, annotation)   # the task now holds it, as Label Studio stores a labeler's work
    ls.remove_annotation(task, 7)   # ... or deletes it
    GET /api/tasks?project=&fields=all&page=&page_size=   those tasks with their annotations, paged
                                    like Label Studio 1.23 ({"tasks", "total"}, 404 past the end,
                                    page_size=-1 or none: 100)
    ls.stop(); ls.restart()         # Label Studio down (connections refused) and back, same port
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
        self.tasks: dict[int, dict] = {}                 # task id -> task with its "annotations"
        self.task_pages = 0                              # GET /api/tasks pages served
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
                if self.path.split("?")[0].rstrip("/") == "/api/tasks":
                    if not self._authorised():
                        return self._send(401, b'{"detail": "Authentication credentials were not provided."}')
                    status, body = outer._task_page(self.path)
                    return self._send(status, json.dumps(body).encode())
                if not self.path.startswith("/data/upload/") or outer.uploads is None:
                    return self._send(404, b'{"detail": "not found"}')
                if not self._authorised():
                    return self._send(401, b'{"detail": "Authentication credentials were not provided."}')
                path = outer.uploads / self.path.split("/", 3)[-1]   # <project>/<file>
                if not path.is_file():
                    return self._send(404, b'{"detail": "not found"}')
                self._send(200, path.read_bytes(), "image/jpeg")

        self._handler = Handler
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    # --- tasks and annotations, as GET /api/tasks lists them -------------------------------------
    def annotate(self, task: dict, annotation: dict) -> None:
        """Store an annotation on a task (created or updated: same id replaces)."""
        with self._lock:
            held = self.tasks.setdefault(int(task["id"]), {**task, "annotations": []})
            held["annotations"] = [a for a in held["annotations"] if a["id"] != annotation["id"]]
            held["annotations"].append(annotation)

    def remove_annotation(self, task_id: int, annotation_id: int) -> None:
        with self._lock:
            held = self.tasks[int(task_id)]
            held["annotations"] = [a for a in held["annotations"] if a["id"] != annotation_id]

    def _task_page(self, path: str) -> tuple[int, dict]:
        from urllib.parse import parse_qs, urlsplit

        query = {k: v[-1] for k, v in parse_qs(urlsplit(path).query).items()}
        size = int(query.get("page_size", 100))
        size = 100 if size <= 0 else size                # Label Studio ignores page_size=-1
        page = int(query.get("page", 1))
        with self._lock:
            self.task_pages += 1
            tasks = [json.loads(json.dumps(t)) for _, t in sorted(self.tasks.items())
                     if str(t.get("project", 1)) == query.get("project", "1")]
        chunk = tasks[(page - 1) * size: page * size]
        if page > 1 and not chunk:
            return 404, {"detail": "Invalid page."}
        return 200, {"tasks": chunk, "total": len(tasks), "total_annotations":
                     sum(len(t["annotations"]) for t in tasks), "total_predictions": 0}

    # --- down and back -----------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop answering: connections to the port are refused until restart()."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()

    def restart(self) -> None:
        port = int(self.url.rsplit(":", 1)[1])
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), self._handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

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

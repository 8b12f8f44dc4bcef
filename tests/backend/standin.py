"""A small real HTTP server standing in for Label Studio where the backend calls it.

    with StandInLabelStudio(token="abc", uploads=dir) as ls:
        ls.url                 # http://127.0.0.1:PORT
        ls.predictions         # every prediction stored (with its Authorization header and route)
        ls.live(task)          # a task's predictions not deleted, oldest first

Routes, shaped like Label Studio 1.23's:
  POST /api/predictions                          one prediction (201, the stored prediction)
  POST /api/projects/<id>/import/predictions     a list, all or nothing ({"created": n});
                                                 `bulk_status=405` refuses it like an older server
  GET  /api/predictions/?task=T, DELETE /api/predictions/<id>/
  GET  /api/tasks?project=&page=&page_size=&query=   the tasks in `ls.tasks` ({id: task}, set with
                                                 `ls.add_tasks`), with their annotations, 100 a page
                                                 by default ({"tasks", "total"}, 404 past the end);
                                                 Data Manager filters (and / or) on prediction
                                                 versions and counts, and on annotation counts
  GET  /api/projects/<id>                        total_predictions_number
  POST /api/token/refresh/                       {"refresh": PAT} -> {"access": JWT} (`pat=`)
  GET  /data/upload/<project>/<file>             files from `uploads`
Auth: "Token <token>" (legacy key) and, with `pat=...`, "Bearer <access>" from the refresh route;
`expire_access()` makes every access token issued so far answer 401 (as an expired one would).
`retrieve(backend_url, project, tasks, rate)` plays "Retrieve predictions": one /predict, then stores
its answer in the background at `rate` items a second, as Label Studio does (~12/s).
Also used by bench/predict.py.

    ls.annotate(task, annotation)   # the task now holds it, as Label Studio stores a labeler's work
    ls.remove_annotation(task, 7)   # ... or deletes it
    ls.stop(); ls.restart()         # Label Studio down (connections refused) and back, same port
"""
from __future__ import annotations

import base64
import http.server
import json
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import requests


def make_jwt(claims: dict) -> str:
    """An unsigned JWT-shaped token (the backend reads claims; only Label Studio checks signatures)."""
    def part(d):
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()
    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.{part({'sig': uuid.uuid4().hex})}"


def make_pat(days: float = 30) -> str:
    """A Personal Access Token as Label Studio 1.23 hands them out: a JWT refresh token."""
    return make_jwt({"token_type": "refresh", "exp": int(time.time() + days * 86400),
                     "jti": uuid.uuid4().hex, "user_id": 1})


class StandInLabelStudio:
    def __init__(self, token: str | None = "ls-token", uploads: Path | None = None,
                 fail_first: int = 0, pat: str | None = None, access_lifetime: float = 300,
                 bulk_status: int | None = None):
        self.token, self.uploads, self.pat = token, uploads, pat
        self.access_lifetime, self.bulk_status = access_lifetime, bulk_status
        self.predictions: list[dict] = []
        self.deleted: set[int] = set()
        self.requests: list[tuple[str, str, str]] = []   # (method, path, Authorization)
        self.fail_first = fail_first      # answer this many prediction POSTs with 503 first
        self.access: dict[str, float] = {}      # access token -> expiry
        self.refreshes = 0
        self.storing: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.tasks: dict[int, dict] = {}                 # task id -> task with its "annotations"
        self.task_pages = 0                              # GET /api/tasks pages served
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, body, ctype="application/json"):
                if not isinstance(body, bytes):
                    body = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _authorised(self):
                return outer.authorised(self.headers.get("Authorization", ""))

            def _denied(self):
                return self._send(401, {"detail": "Authentication credentials were not provided."})

            def _body(self):
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _log(self):
                with outer._lock:
                    outer.requests.append((self.command, self.path, self.headers.get("Authorization", "")))

            def do_POST(self):
                self._log()
                body, path = self._body(), urlsplit(self.path).path
                auth = self.headers.get("Authorization", "")
                if path == "/api/token/refresh/":
                    return self._send(*outer.refresh(json.loads(body or b"{}")))
                parts = path.strip("/").split("/")
                bulk = parts[:2] == ["api", "projects"] and parts[3:] == ["import", "predictions"]
                if path != "/api/predictions" and not bulk:
                    return self._send(404, {"detail": "not found"})
                if not self._authorised():
                    return self._denied()
                if bulk and outer.bulk_status:
                    return self._send(outer.bulk_status, {"detail": "Method not allowed"})
                with outer._lock:
                    if outer.fail_first > 0:
                        outer.fail_first -= 1
                        return self._send(503, {"detail": "busy"})
                data = json.loads(body)
                items = data if bulk else [data]
                if not isinstance(items, list) or not all(
                        isinstance(i, dict) and isinstance(i.get("task"), int)
                        and isinstance(i.get("result"), list) for i in items):
                    return self._send(400, {"detail": "invalid prediction"})
                stored = [outer.store(i, "bulk" if bulk else "single", auth) for i in items]
                if bulk:
                    return self._send(201, {"created": len(stored)})
                self._send(201, stored[0])

            def do_DELETE(self):
                self._log()
                parts = urlsplit(self.path).path.strip("/").split("/")
                if not self._authorised():
                    return self._denied()
                if parts[:2] != ["api", "predictions"] or len(parts) != 3 or not parts[2].isdigit():
                    return self._send(404, {"detail": "not found"})
                pid = int(parts[2])
                with outer._lock:
                    if pid in outer.deleted or not any(p["id"] == pid for p in outer.predictions):
                        return self._send(404, {"detail": "not found"})
                    outer.deleted.add(pid)
                self._send(204, b"")

            def do_GET(self):
                self._log()
                url = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                if url.path.startswith("/data/upload/") and outer.uploads is not None:
                    if not self._authorised():
                        return self._denied()
                    path = outer.uploads / url.path.split("/", 3)[-1]   # <project>/<file>
                    if not path.is_file():
                        return self._send(404, {"detail": "not found"})
                    return self._send(200, path.read_bytes(), "image/jpeg")
                if not url.path.startswith("/api/"):
                    return self._send(404, {"detail": "not found"})
                if not self._authorised():
                    return self._denied()
                if url.path.rstrip("/") == "/api/predictions":
                    return self._send(200, outer.live(int(query["task"])))
                if url.path == "/api/tasks":
                    return self._send(*outer.list_tasks(query))
                parts = url.path.strip("/").split("/")
                if parts[:2] == ["api", "projects"] and len(parts) == 3:
                    with outer._lock:
                        n = sum(p["id"] not in outer.deleted for p in outer.predictions)
                    return self._send(200, {"id": int(parts[2]), "total_predictions_number": n})
                self._send(404, {"detail": "not found"})

        self._handler = Handler
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    # --- what the routes do --------------------------------------------------------------------
    def authorised(self, header: str) -> bool:
        if self.token and header == f"Token {self.token}":
            return True
        if header.startswith("Bearer "):
            with self._lock:
                return self.access.get(header[7:], 0) > time.time()
        return False

    def refresh(self, body: dict) -> tuple[int, dict]:
        if not self.pat or body.get("refresh") != self.pat:
            return 401, {"detail": "Token is invalid or expired", "code": "token_not_valid"}
        access = make_jwt({"token_type": "access", "exp": int(time.time() + self.access_lifetime),
                           "jti": uuid.uuid4().hex})
        with self._lock:
            self.access[access] = time.time() + self.access_lifetime
            self.refreshes += 1
        return 200, {"access": access}

    def expire_access(self) -> None:
        """Every access token issued so far now answers 401."""
        with self._lock:
            self.access = {k: 0 for k in self.access}

    def store(self, item: dict, via: str, auth: str = "") -> dict:
        with self._lock:
            data = dict(item, id=len(self.predictions) + 1, _via=via, _authorization=auth,
                        _received=time.time())
            self.predictions.append(data)
        return data

    def live(self, task: int) -> list[dict]:
        with self._lock:
            return [dict(p) for p in self.predictions
                    if p["task"] == task and p["id"] not in self.deleted]

    def latest(self, task: int) -> dict | None:
        """A task's newest stored prediction (what a labeler sees first)."""
        got = self.live(task)
        return max(got, key=lambda p: p["id"]) if got else None

    def add_tasks(self, tasks: list[dict]) -> None:
        """Tasks ({"id", "data", ...}) the project now holds, with no annotations yet."""
        with self._lock:
            for t in tasks:
                self.tasks[int(t["id"])] = {"annotations": [], **t}

    def list_tasks(self, query: dict) -> tuple[int, dict]:
        spec = json.loads(query.get("query") or "{}").get("filters", {})
        filters, join = spec.get("items", []), any if spec.get("conjunction") == "or" else all
        page, size = int(query.get("page", 1)), int(query.get("page_size", 100))
        size = 100 if size < 1 else size                     # page_size=-1 is ignored
        with self._lock:
            self.task_pages += 1
            rows = []
            for tid, task in sorted(self.tasks.items()):
                if "project" in query and str(task.get("project", query["project"])) != query["project"]:
                    continue
                preds = [p for p in self.predictions if p["task"] == tid and p["id"] not in self.deleted]
                if not filters or join(_matches(f, preds, task) for f in filters):
                    rows.append(json.loads(json.dumps(dict(task, total_predictions=len(preds)))))
        if page > 1 and (page - 1) * size >= len(rows):
            return 404, {"detail": "Invalid page."}
        return 200, {"tasks": rows[(page - 1) * size: page * size], "total": len(rows),
                     "total_annotations": sum(len(t.get("annotations", [])) for t in rows)}

    def retrieve(self, backend_url: str, project: str, tasks: list[dict], label_config: str,
                 rate: float = 12.0, auth=None) -> list[dict]:
        """"Retrieve predictions": POST /predict, then store its answer at `rate` items a second
        in the background (see `storing`); returns the answer."""
        resp = requests.post(backend_url + "/predict", json={
            "tasks": tasks, "project": project, "label_config": label_config,
            "params": {"login": None, "password": None, "context": None}}, auth=auth, timeout=100)
        resp.raise_for_status()
        results = resp.json()["results"]

        def store_slowly():
            for task, result in zip(tasks, results):
                time.sleep(1 / rate)
                self.store(dict(result, task=task["id"]), "predict")
        thread = threading.Thread(target=store_slowly, daemon=True)
        thread.start()
        self.storing.append(thread)
        return results

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

    # --- life --------------------------------------------------------------------------------
    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def wait_for(self, n: int, timeout: float, via: tuple = ("single", "bulk")) -> list[dict]:
        """The first n predictions posted by the backend, waiting up to timeout seconds."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                posted = [p for p in self.predictions if p["_via"] in via]
            if len(posted) >= n:
                return posted
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(posted)} of {n} predictions received in {timeout}s")
            time.sleep(0.1)


def _matches(f: dict, preds: list[dict], task: dict) -> bool:
    """One Data Manager filter item on a task and its predictions (the ones the backend uses)."""
    column, op, value = f.get("filter", ""), f.get("operator"), f.get("value")
    annotations = [a for a in task.get("annotations") or [] if isinstance(a, dict)]
    counts = {":total_annotations": sum(not a.get("was_cancelled") for a in annotations),
              ":cancelled_annotations": sum(bool(a.get("was_cancelled")) for a in annotations)}
    for suffix, n in counts.items():
        if column.endswith(suffix):
            return n > value if op == "greater" else n == value
    if column.endswith(":predictions_model_versions"):
        # As Label Studio 1.23 does: each item of the value (of a string: each character).
        versions = [p.get("model_version") or "" for p in preds]
        if op == "contains":
            return any(v in m for v in value for m in versions)
        return all(v not in m for v in value for m in versions)
    if column.endswith(":total_predictions"):
        return len(preds) > value if op == "greater" else len(preds) == value
    raise ValueError(f"the stand-in has no filter {f}")

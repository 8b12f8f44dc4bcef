"""The backend's runtime client of Label Studio's API: posting predictions computed after /predict.

    ls = LabelStudio(url, token)                      # either kind of token (workers/labelstudio_auth.py)
    ls.import_predictions(project, [(task_id, prediction), ...])   # one request: {"created": n}
    ls.post_prediction(task_id, prediction)           # one task (where the bulk import is refused)
    ls.task_predictions(task_id)                      # [{id, model_version, ...}] of one task
    ls.delete_prediction(prediction_id)
    ls.tasks_with_predictions(project, marked="+pending", more_than=1)   # task ids (Data Manager filter)

Label Studio stores a list given to `POST /api/projects/{id}/import/predictions` ~70x faster than one
`POST /api/predictions` per task (640 in 0.43 s on 1.23.2). The import validates every item before
creating any (<= 500 items), so a 400 means "nothing stored": the caller can post one by one to learn
which item is bad. Listing tasks passes `review=true`: without it, Label Studio asks the ML backend for
predictions of every listed task that has none (projects with "retrieve predictions automatically").
"""
from __future__ import annotations

import json

import requests

from workers.labelstudio_auth import AuthError, auth_for

TIMEOUT = 30
#: Statuses meaning "this Label Studio does not offer the bulk import to us": post one by one.
BULK_REFUSED = (403, 404, 405)


class LabelStudioError(Exception):
    """Label Studio refused or did not answer. transient: worth retrying (5xx, 429, no connection)."""

    def __init__(self, message: str, transient: bool = False, status: int | None = None):
        super().__init__(message)
        self.transient, self.status = transient, status


class LabelStudio:
    """One Label Studio, one token (legacy key or Personal Access Token), one keep-alive session."""

    def __init__(self, url: str, token: str | None, session: requests.Session | None = None,
                 redis=None, timeout: float = TIMEOUT):
        self.url, self.token, self.timeout = url.rstrip("/"), token, timeout
        self.session = session or requests.Session()
        self.auth = auth_for(self.url, token, redis) if token else None

    def _call(self, method: str, path: str, what: str, **kwargs) -> requests.Response:
        endpoint = self.url + path
        kwargs.setdefault("timeout", self.timeout)
        try:
            if self.auth is None:
                resp = self.session.request(method, endpoint, **kwargs)
            else:
                resp = self.auth.request(self.session, method, endpoint, **kwargs)
        except AuthError as exc:
            raise LabelStudioError(f"{what}: {exc}", transient=exc.transient) from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise LabelStudioError(f"cannot reach Label Studio at {self.url}: {type(exc).__name__}",
                                   transient=True) from None
        if resp.status_code >= 300:
            hint = " (check LABEL_STUDIO_API_KEY)" if resp.status_code in (401, 403) else ""
            raise LabelStudioError(f"{method} {endpoint} {what}: HTTP {resp.status_code}{hint}: "
                                   f"{resp.text[:300]}",
                                   transient=resp.status_code == 429 or resp.status_code >= 500,
                                   status=resp.status_code)
        return resp

    # --- predictions -------------------------------------------------------------------------
    def post_prediction(self, task_id, prediction: dict) -> dict:
        """Create one prediction for a task; returns Label Studio's answer (the stored prediction)."""
        resp = self._call("POST", "/api/predictions", f"for task {task_id}",
                          json=_body(task_id, prediction))
        return _json(resp, {})

    def import_predictions(self, project, items: list[tuple]) -> int:
        """Create one prediction per (task id, prediction) in one request; returns how many."""
        body = [_body(tid, p) for tid, p in items]
        resp = self._call("POST", f"/api/projects/{int(project)}/import/predictions",
                          f"({len(body)} predictions)", json=body)
        created = _json(resp, {}).get("created")
        return int(created) if isinstance(created, int) else len(body)

    def task_predictions(self, task_id) -> list[dict]:
        resp = self._call("GET", "/api/predictions/", f"of task {task_id}",
                          params={"task": int(task_id)})
        data = _json(resp, [])
        return data if isinstance(data, list) else data.get("results", [])

    def delete_prediction(self, prediction_id) -> bool:
        """Delete a prediction; False if it was gone already."""
        try:
            self._call("DELETE", f"/api/predictions/{int(prediction_id)}/", "")
        except LabelStudioError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    # --- tasks -------------------------------------------------------------------------------
    def list_tasks(self, project, page_size: int = 1000, filters: list[dict] | None = None,
                   include: str | None = "id,data", fields: str = "task_only",
                   conjunction: str = "and") -> list[dict]:
        """Every task of the project matching the Data Manager `filters` (all of them, or any with
        conjunction="or"), id and data by default (include=None, fields="all": whole tasks with
        their annotations), page by page until `total`.

        Label Studio ignores page_size=-1 and answers 100 a page by default: page and page_size
        are always passed, and paging stops at the total it reports (or a short/missing page).
        """
        tasks, page = [], 1
        params = {"project": int(project), "page_size": page_size, "fields": fields,
                  "review": "true"}
        if include:
            params["include"] = include
        if filters:
            params["query"] = json.dumps({"filters": {"conjunction": conjunction, "items": filters}})
        while True:
            try:
                resp = self._call("GET", "/api/tasks", "(list tasks)", timeout=300,
                                  params={**params, "page": page})
            except LabelStudioError as exc:
                if exc.status == 404 and page > 1:     # past the last page
                    break
                raise
            data = _json(resp, {})
            got = data.get("tasks") or []
            tasks += got
            if not got or len(tasks) >= int(data.get("total", len(tasks))):
                break
            page += 1
        return tasks

    def tasks_with_predictions(self, project, marked: str, more_than: int = 0) -> list[int]:
        """Ids of tasks holding a prediction whose model_version contains `marked`, and more than
        `more_than` predictions in all (1: a placeholder next to a real prediction)."""
        return [int(t["id"]) for t in self.list_tasks(project, include="id", filters=[
            {"filter": "filter:tasks:predictions_model_versions", "operator": "contains",
             "type": "List", "value": [marked]},     # a list: a string is read as its characters
            {"filter": "filter:tasks:total_predictions", "operator": "greater", "type": "Number",
             "value": more_than}])]

    def total_predictions(self, project) -> int:
        """All predictions stored for the project (it grows while Label Studio stores an answer)."""
        resp = self._call("GET", f"/api/projects/{int(project)}", "(project)")
        return int(_json(resp, {}).get("total_predictions_number") or 0)


def _body(task_id, prediction: dict) -> dict:
    return {"task": int(task_id), "result": prediction["result"],
            "score": prediction.get("score"), "model_version": prediction["model_version"]}


def _json(resp: requests.Response, default):
    try:
        return resp.json()
    except ValueError:
        return default

"""The backend's runtime client of Label Studio's API: posting predictions computed after /predict.

Label Studio's advice for batches too big to answer within its /predict timeout is to compute them
asynchronously and create them with `POST /api/predictions` (one per task).
"""
from __future__ import annotations

import requests

TIMEOUT = 30


class LabelStudioError(Exception):
    """Label Studio refused or did not answer. transient: worth retrying (5xx, 429, no connection)."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


def post_prediction(url: str, token: str | None, task_id, prediction: dict,
                    session: requests.Session | None = None, timeout: float = TIMEOUT) -> dict:
    """Create one prediction for a task; returns Label Studio's answer (the stored prediction)."""
    body = {"task": int(task_id), "result": prediction["result"],
            "score": prediction.get("score"), "model_version": prediction["model_version"]}
    headers = {"Authorization": f"Token {token}"} if token else {}
    endpoint = f"{url.rstrip('/')}/api/predictions"
    try:
        resp = (session or requests).post(endpoint, json=body, headers=headers, timeout=timeout)
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise LabelStudioError(f"cannot reach Label Studio at {url}: {type(exc).__name__}",
                               transient=True) from None
    if resp.status_code >= 300:
        hint = " (check LABEL_STUDIO_API_KEY)" if resp.status_code in (401, 403) else ""
        raise LabelStudioError(f"POST {endpoint} for task {task_id}: HTTP {resp.status_code}{hint}: "
                               f"{resp.text[:300]}",
                               transient=resp.status_code == 429 or resp.status_code >= 500)
    try:
        return resp.json()
    except ValueError:
        return {}

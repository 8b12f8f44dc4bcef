"""Provisioning a Label Studio project for a folder of photos, with label-studio-sdk 2.x.

Everything is create-or-reuse, so running it again on the same folder changes nothing but new photos:
the project (found by title), its local-files storage (by path; a sync imports only new files), and
the connection to our backend (by URL). Label Studio's own rules shape it:
- a local-files storage path must be a sub-folder of LOCAL_FILES_DOCUMENT_ROOT, never the root itself,
  so the document root is the photo folder's parent;
- "Retrieve predictions" is a Data Manager action sending every selected task to the backend in one
  request; the backend answers at once for cached photos and imports the rest later. `subdisc up`
  does without it: it lists the tasks (`task_images`) and queues them on the workers itself.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import requests
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError

from backend.cli import CommandError
from backend.labeling_config import default_config_xml
from workers.images import IMAGE_REGEX
from workers.labelstudio_auth import AuthError, auth_for

BACKEND_TITLE = "subdisc"
#: Storage sync and "Retrieve predictions" run inside one HTTP request: large folders take a while.
LONG = {"timeout_in_seconds": 900}


def absolute(path: str | Path) -> Path:
    """Absolute without resolving symlinks: Label Studio checks storage paths lexically too."""
    return Path(os.path.abspath(Path(path).expanduser()))


def document_root_for(images: str | Path) -> Path:
    """The LOCAL_FILES_DOCUMENT_ROOT for a photo folder: its parent (the folder must be below it)."""
    folder = absolute(images)
    if not folder.is_dir():
        raise CommandError(f"{images} is not a folder")
    if folder.parent == folder:
        raise CommandError("the photo folder cannot be the file system root: Label Studio serves "
                           "local files only from a sub-folder of its document root")
    return folder.parent


def project_title(images: str | Path) -> str:
    """A stable title per folder (Label Studio allows 50 characters): name plus a hash of the path."""
    folder = absolute(images)
    digest = hashlib.sha1(str(folder).encode()).hexdigest()[:6]
    return f"subdisc {folder.name[:30]} {digest}"


@dataclass
class Project:
    id: int
    created: bool
    storage_id: int | None = None
    ml_backend_id: int | None = None


class Provisioner:
    """Talks to one Label Studio with an API token: a legacy key or a Personal Access Token (the SDK
    and workers/labelstudio_auth.py both tell them apart and refresh a PAT's access token)."""

    def __init__(self, url: str, token: str):
        self.url, self.token = url.rstrip("/"), token
        self.ls = LabelStudio(base_url=self.url, api_key=token)
        self.auth = auth_for(self.url, token)
        self._local = threading.local()

    @property
    def http(self) -> requests.Session:
        """A keep-alive session for the plain HTTP calls (`subdisc up` polls every second), one
        per thread ("Retrieve predictions" runs in its own)."""
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    def _request(self, method: str, path: str, **kwargs) -> requests.Response:
        try:
            return self.auth.request(self.http, method, self.url + path, **kwargs)
        except AuthError as exc:
            raise CommandError(str(exc)) from None
        except requests.RequestException as exc:
            raise CommandError(f"cannot reach Label Studio at {self.url}: {type(exc).__name__}") from None

    # --- project ---------------------------------------------------------------------------------
    def find_or_create_project(self, title: str, label_config: str) -> Project:
        for project in self.ls.projects.list(title=title):
            if project.title == title:    # the filter is a substring search: compare exactly
                return Project(project.id, created=False)
        project = self.ls.projects.create(
            title=title, label_config=label_config,
            description="Faces pre-annotated by subdisc (face boxes + attribute choices)",
            # Opening a task without a prediction asks the backend for one.
            evaluate_predictions_automatically=True)
        return Project(project.id, created=True)

    # --- photos ------------------------------------------------------------------------------------
    def ensure_local_storage(self, project: int, folder: str | Path) -> int:
        """A local-files storage over `folder` (recursive, images only), synced: returns its id."""
        path = str(absolute(folder))
        storage = next((s for s in self.ls.import_storage.local.list(project=project)
                        if s.path and absolute(s.path) == Path(path)), None)
        if storage is None:
            storage = self.ls.import_storage.local.create(
                project=project, path=path, title=Path(path).name, recursive_scan=True,
                regex_filter=IMAGE_REGEX, use_blob_urls=True)   # one task per image file
        # Sync imports files not yet tasks; existing tasks (and their annotations) stay as they are.
        synced = self.ls.import_storage.local.sync(id=storage.id, request_options=LONG)
        if synced.status == "failed":
            raise CommandError(f"Label Studio could not sync {path}: {synced.traceback}")
        return storage.id

    def task_images(self, project: int) -> dict[int, str]:
        """{task id: image URL} of every task ("$image" in the default config).

        Raw pages of id and data only (the full task serializer takes ~4 ms a task), page by page
        up to the total Label Studio reports; `review=true` keeps Label Studio from asking the
        backend for predictions of every listed task that has none.
        """
        images, page, size = {}, 1, 1000
        while True:
            resp = self._request("GET", "/api/tasks", timeout=300, params={
                "project": project, "page": page, "page_size": size, "fields": "task_only",
                "include": "id,data", "review": "true"})
            if resp.status_code == 404 and page > 1:       # past the last page
                break
            _raise_for(resp, "list tasks")
            body = resp.json()
            tasks = body.get("tasks") or []
            for task in tasks:
                data = task.get("data") or {}
                url = data.get("image") or next((v for v in data.values() if isinstance(v, str)), None)
                if url:
                    images[task["id"]] = url
            seen = (page - 1) * size + len(tasks)
            if not tasks or seen >= int(body.get("total", seen)):
                break
            page += 1
        return images

    # --- backend -----------------------------------------------------------------------------------
    def connect_backend(self, project: int, backend_url: str, title: str = BACKEND_TITLE) -> int:
        """Connect our backend (Label Studio calls /health and /setup, and adds the webhook)."""
        backend_url = backend_url.rstrip("/")
        existing = self.ls.ml.list(project=project)
        for ml in existing:
            if (ml.url or "").rstrip("/") == backend_url:
                return ml.id
        # A subdisc backend from an earlier run on another port would answer nothing: replace it.
        for ml in existing:
            if ml.title == title:
                self.ls.ml.delete(id=ml.id)
        ml = self.ls.ml.create(project=project, url=backend_url, title=title, is_interactive=False)
        return ml.id

    def retrieve_predictions(self, project: int) -> dict:
        """The Data Manager's "Retrieve predictions" on all tasks (one /predict call to the backend)."""
        resp = self._request(
            "POST", "/api/dm/actions",
            params={"id": "retrieve_tasks_predictions", "project": project},
            json={"selectedItems": {"all": True, "excluded": []}},
            timeout=LONG["timeout_in_seconds"])
        _raise_for(resp, "retrieve predictions")
        return resp.json()

    # --- progress ----------------------------------------------------------------------------------
    def count_tasks(self, project: int, *filters: dict) -> int:
        """Tasks of the project matching every Data Manager filter given (all tasks without)."""
        # review=true: without it, listing asks the backend to predict the listed task.
        params = {"project": project, "page_size": 1, "fields": "task_only", "include": "id",
                  "review": "true"}
        if filters:
            params["query"] = json.dumps({"filters": {"conjunction": "and", "items": list(filters)}})
        resp = self._request("GET", "/api/tasks", params=params, timeout=60)
        _raise_for(resp, "count tasks")
        return int(resp.json()["total"])

    def count_predicted(self, project: int, placeholder: str | None = None) -> int:
        """Tasks with a prediction; with `placeholder`, only those holding none whose model_version
        contains it: what a labeler sees is a real prediction.

        The backend answers uncached photos at once with an empty placeholder (its version marked
        "+pending"), imports the real prediction later, and deletes the placeholder then (even one
        Label Studio stored after the real prediction): a task counts once that is done.
        """
        if placeholder is None:
            return self.count_tasks(project, _number("total_predictions", 0))
        # A list: Label Studio iterates the value, so a plain string would be matched character
        # by character ("+pending" would exclude every version holding a "d").
        return self.count_tasks(project, {"filter": "filter:tasks:predictions_model_versions",
                                          "type": "List", "value": [placeholder],
                                          "operator": "not_contains"},
                                _number("total_predictions", 0))

    def provision(self, images: str | Path, backend_url: str, label_config: str,
                  title: str | None = None) -> Project:
        """Project + storage + synced tasks + connected backend, each created once and reused."""
        try:
            project = self.find_or_create_project(title or project_title(images), label_config)
            project.storage_id = self.ensure_local_storage(project.id, images)
            project.ml_backend_id = self.connect_backend(project.id, backend_url)
        except ApiError as exc:   # its str() carries every response header: keep the body only
            raise CommandError(f"Label Studio answered HTTP {exc.status_code}: {exc.body}") from None
        return project


def _number(column: str, more_than: int) -> dict:
    return {"filter": f"filter:tasks:{column}", "operator": "greater", "type": "Number",
            "value": more_than}


def _raise_for(resp: requests.Response, what: str) -> None:
    if resp.status_code >= 400:
        raise CommandError(f"Label Studio refused to {what}: HTTP {resp.status_code} {resp.text[:500]}")


def wait_for_label_studio(url: str, timeout: float = 600) -> None:
    """Block until Label Studio's /health answers (its first start migrates its database)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(f"{url.rstrip('/')}/health", timeout=5).ok:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise CommandError(f"Label Studio at {url} did not answer within {timeout:.0f} s")
        time.sleep(2)


def main(argv: list[str] | None = None) -> int:
    """`python -m backend.ls_setup`: provision a running Label Studio (docker-compose's setup step)."""
    p = argparse.ArgumentParser(prog="python -m backend.ls_setup", description=main.__doc__)
    p.add_argument("--label-studio", default=os.environ.get("LABEL_STUDIO_URL"), required=False)
    p.add_argument("--token", default=os.environ.get("LABEL_STUDIO_API_KEY"))
    p.add_argument("--images", required=True, help="the photo folder as Label Studio sees it")
    p.add_argument("--backend", required=True, help="the backend's URL as Label Studio reaches it")
    p.add_argument("--title", help="project title (default: from the folder)")
    p.add_argument("--no-predict", action="store_true", help="do not run 'Retrieve predictions'")
    args = p.parse_args(argv)
    if not args.label_studio or not args.token:
        p.error("give --label-studio and --token (or LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY)")
    try:
        wait_for_label_studio(args.label_studio)
        ls = Provisioner(args.label_studio, args.token)
        project = ls.provision(args.images, args.backend, default_config_xml(), title=args.title)
        print(f"project {project.id}: {ls.count_tasks(project.id)} tasks, backend connected", flush=True)
        if not args.no_predict:
            ls.retrieve_predictions(project.id)
            print("asked for predictions of every task", flush=True)
    except CommandError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Missed webhooks recovered from the real Label Studio 1.23.2 (its cached venv, as the e2e tests use):
Redis SIGKILLed and restarted while webhooks flow, annotations created, updated and deleted in Label
Studio whose webhooks the backend never got; the reconciliation reads them back through the real
API (GET /api/tasks?fields=all, pages of 100) and the backend's store ends equal to Label Studio's.

Also marked e2e: Label Studio's first start migrates its database (~3 minutes on a loaded 2-core
machine), so `-m "faults and not e2e"` is the quick fault suite.
"""
from __future__ import annotations

import os
import time
import uuid

import pytest
import requests

from backend import stack as stack_mod
from backend.state import ProjectState
from tests.backend.helpers import TWO_ATTRIBUTES, webhook
from tests.backend.test_server import serve
from tests.faults.test_redis_outage import cached_tasks, stored_annotation_ids, wait_until
from tests.support import free_port

pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.timeout(900)]


@pytest.fixture
def label_studio(tmp_path):
    try:
        exe = stack_mod.ensure_label_studio(stack_mod.DEFAULT_LS_VENV)
    except stack_mod.StackError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"Label Studio did not install: {exc}")
        pytest.skip(f"Label Studio {stack_mod.LABEL_STUDIO_VERSION} could not be installed: {exc}")
    token = f"faults-{uuid.uuid4().hex}"
    with stack_mod.Stack(tmp_path / "ls-logs") as stack:
        url = stack.start_label_studio(exe, free_port(), tmp_path / "label-studio", stack_mod.label_studio_env(
            username="faults@subdisc.local", password="faults-password", token=token,
            document_root=tmp_path))
        http = requests.Session()
        http.headers["Authorization"] = f"Token {token}"
        yield url, token, http


def region(gender):
    box = {"x": 5.0, "y": 13.3, "width": 25.0, "height": 40.0, "rotation": 0}
    common = {"id": "f1", "to_name": "image", "original_width": 400, "original_height": 300}
    return [{**common, "from_name": "face", "type": "rectanglelabels", "value": {**box, "rectanglelabels": ["Face"]}},
            {**common, "from_name": "gender", "type": "choices", "value": {**box, "choices": [gender]}}]


def test_missed_webhooks_are_recovered_from_the_real_label_studio(label_studio, restartable_redis,
                                                                  fault_workers, tmp_path, tally,
                                                                  monkeypatch):
    ls_url, token, http = label_studio
    # Workers and backend both told where Label Studio is, as `subdisc up` and docker/ do.
    monkeypatch.setenv("LABEL_STUDIO_URL", ls_url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", token)
    redis = restartable_redis
    client = redis.client()
    project = http.post(f"{ls_url}/api/projects", json={"title": "faults", "label_config": TWO_ATTRIBUTES})
    project.raise_for_status()
    pid = project.json()["id"]
    photos = [t["data"]["image"] for t in cached_tasks(tmp_path / "cached", client, 130)]
    http.post(f"{ls_url}/api/projects/{pid}/import", json=[{"image": p} for p in photos]).raise_for_status()
    listed = http.get(f"{ls_url}/api/tasks", params={"project": pid, "page_size": 200, "fields": "all"})
    ls_tasks = sorted(listed.json()["tasks"], key=lambda t: t["id"])
    assert len(ls_tasks) == 130

    with serve(redis.url, LABEL_STUDIO_URL=ls_url, LABEL_STUDIO_API_KEY=token,
               SUBDISC_LOCAL_FILES_ROOT=str(tmp_path), SUBDISC_RECONCILE_SECONDS="3600") as backend:
        fault_workers.start(1)
        setup = backend.post("/setup", {"project": f"{pid}.1700000000", "schema": TWO_ATTRIBUTES})
        assert setup.status_code == 200
        assert backend.post("/predict", {"tasks": ls_tasks, "project": pid,
                                         "label_config": TWO_ATTRIBUTES}).status_code == 200

        def annotate(task, gender):
            r = http.post(f"{ls_url}/api/tasks/{task['id']}/annotations/", json={"result": region(gender)})
            r.raise_for_status()
            return r.json()

        def deliver(annotation, task):
            body = webhook("ANNOTATION_CREATED", annotation, task, project_id=pid, label_config=TWO_ATTRIBUTES)
            try:
                return backend.post("/webhook", body).status_code
            except requests.RequestException as exc:
                return type(exc).__name__

        statuses = {}
        made = [(annotate(t, "male" if i < 65 else "female"), t) for i, t in enumerate(ls_tasks[::4])]
        for ann, task in made[:15]:
            statuses[ann["id"]] = deliver(ann, task)
        redis.kill()
        for ann, task in made[15:22]:                   # answered 503 while Redis is away
            statuses[ann["id"]] = deliver(ann, task)
        time.sleep(2)
        redis.restart()
        # Changes in Label Studio whose webhooks never arrive: created, updated, deleted.
        updated, deleted = made[2][0], made[3][0]
        http.patch(f"{ls_url}/api/annotations/{updated['id']}/", json={"result": region("female")}).raise_for_status()
        http.delete(f"{ls_url}/api/annotations/{deleted['id']}/").raise_for_status()
        last = annotate(ls_tasks[-1], "female")
        statuses[last["id"]] = deliver(last, ls_tasks[-1])   # through: queues the reconciliation
        assert statuses[last["id"]] == 200

        truth = {a["id"] for a, _ in made} - {deleted["id"]} | {last["id"]}
        wait_until("the backend's annotations to equal Label Studio's",
                   lambda: stored_annotation_ids(client, str(pid)) == truth, 120, log=fault_workers.output)
        entry = next(e for e in ProjectState(client, str(pid)).annotations()
                     if e["annotation_id"] == updated["id"])
        assert entry["regions"][0]["values"] == {"gender": "female"}
        missed = [a for a, s in statuses.items() if s != 200]
        assert len(missed) == 7
    tally.add(redis_sigkills=redis.kills, label_studio_annotations=len(truth),
              webhooks_sent=len(statuses), webhooks_acknowledged=len(statuses) - len(missed),
              webhooks_missed=len(missed), never_sent=len(made) - 22 + 2,
              recovered_by_reconciliation=len(missed) + len(made) - 22 + 1, deleted_by_reconciliation=1)

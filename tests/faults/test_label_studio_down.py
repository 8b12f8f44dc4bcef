"""Label Studio down and back (the stand-in, stopped and restarted on its port), with webhooks that
never reached the backend: the reconciliation reads the project back from Label Studio.

While Label Studio is down, a reconciliation is incomplete and deletes nothing; once it is back, the
annotations whose webhooks were lost (created, updated or deleted) are mended, and predictions
computed meanwhile are posted, each once. Before the fix nothing read Label Studio back.
"""
from __future__ import annotations

import time
from collections import Counter

import pytest

from backend.model import SubdiscModel
from backend.reconcile import reconcile
from backend.state import ProjectState
from tests.backend.helpers import TWO_ATTRIBUTES, ls_annotation, webhook
from tests.backend.standin import StandInLabelStudio
from tests.backend.test_server import BOX, ls_task, serve
from tests.faults.test_redis_outage import (TOKEN, cached_tasks, iso, real_photos,
                                            stored_annotation_ids, wait_until)

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]
DOWN = 6.0


def test_label_studio_down_and_back(restartable_redis, fault_workers, tmp_path, astronaut_face, tally,
                                    monkeypatch):
    client = restartable_redis.client()
    tasks = cached_tasks(tmp_path / "cached", client, 150)     # two pages of Label Studio's listing
    real = [ls_task(900 + i, p) for i, p in enumerate(real_photos(tmp_path / "real", astronaut_face, 6))]
    settings = {"SUBDISC_RECONCILE_SECONDS": "1"}      # the backend's, the workers' and ours alike
    monkeypatch.setenv("SUBDISC_RECONCILE_SECONDS", "1")
    with StandInLabelStudio(token=TOKEN) as ls, \
            serve(restartable_redis.url, SUBDISC_LOCAL_FILES_ROOT=str(tmp_path), **settings) as backend:
        ls.tasks.update({t["id"]: {**t, "annotations": []} for t in tasks})
        fault_workers.start(1, env=settings)
        assert backend.setup(TWO_ATTRIBUTES, hostname=ls.url, token=TOKEN).status_code == 200
        assert backend.predict(tasks, TWO_ATTRIBUTES).status_code == 200

        def annotate(aid, task, gender, deliver=True):
            ann = ls_annotation(aid, task["id"], [(BOX, {"gender": gender})], updated_at=iso(time.time()))
            ls.annotate(task, ann)
            if deliver:
                r = backend.post("/webhook", webhook("ANNOTATION_CREATED", ann, task, label_config=TWO_ATTRIBUTES))
                assert r.status_code == 200
            return ann

        for aid in range(1, 41):                       # 40 delivered, 20 whose webhooks were lost
            annotate(aid, tasks[aid * 3], "male" if aid * 3 < 75 else "female")
        for aid in range(41, 61):
            annotate(aid, tasks[aid * 2 % 150], "female", deliver=False)
        ls.remove_annotation(tasks[15]["id"], 5)      # deleted in Label Studio, webhook lost
        annotate(6, tasks[18], "female", deliver=False)   # updated in Label Studio, webhook lost
        truth = set(range(1, 61)) - {5}

        ls.stop()
        down_at = time.monotonic()
        assert backend.predict(real, TWO_ATTRIBUTES).status_code == 200   # posted once it is back
        model = SubdiscModel(client)
        # (A reconciliation that read Label Studio completely before it stopped may have mended
        # the store already; none may delete anything from here until it is back.)
        held = stored_annotation_ids(client)
        while_down = reconcile(model, "1")
        assert while_down["status"].startswith("incomplete") and while_down["deleted"] == 0
        assert stored_annotation_ids(client) >= held        # nothing deleted on a partial listing
        time.sleep(max(0.0, DOWN - (time.monotonic() - down_at)))
        ls.restart()
        # At once: the reconciliations that failed while it was down gave their claims back after
        # a backoff (at most the 1 s interval), so this webhook, or the workers' next look, is due.
        annotate(61, tasks[1], "male")
        truth.add(61)
        wait_until("the store to match Label Studio", lambda: stored_annotation_ids(client) == truth,
                   90, log=fault_workers.output)
        six = next(e for e in ProjectState(client, "1").annotations() if e["annotation_id"] == 6)
        assert six["regions"][0]["values"] == {"gender": "female"}
        wait_until("every prediction posted", lambda: {p["task"] for p in ls.predictions}
                   >= {t["id"] for t in real}, 180, log=fault_workers.output)
        time.sleep(2)
        posts = Counter(p["task"] for p in ls.predictions)
        assert max(posts.values()) == 1, posts
    tally.add(label_studio_outages=1, outage_seconds=int(DOWN), webhooks_lost=22,
              recovered_by_reconciliation=21, deleted_by_reconciliation=1,
              deleted_while_down=while_down["deleted"], listing_pages=ls.task_pages,
              tasks_posted=len(posts), posted_twice=sum(v > 1 for v in posts.values()))

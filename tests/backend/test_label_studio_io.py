"""Talking to Label Studio: bulk posting, both kinds of token, where a token goes, the placeholder race.

Real HTTP against the stand-in Label Studio (tests/backend/standin.py), real Redis, and for the
end-to-end cases the real server (`subdisc serve`) with real RQ workers.
"""
from __future__ import annotations

import contextlib
import threading
import time

import numpy as np
import pytest
from PIL import Image

from backend import posting, runtime
from backend.labeling_config import default_config_xml
from backend.labelstudio import LabelStudio, LabelStudioError
from backend.model import PENDING_SUFFIX
from backend.predictions import empty
from backend.state import ProjectState
from workers import labelstudio_auth
from workers.images import FetchSettings, read_bytes

from tests.backend.standin import StandInLabelStudio, make_jwt, make_pat
from tests.backend.test_server import PROJECT, ls_task, serve


def noise_photos(tmp_path, n: int, seed: int = 5) -> list[str]:
    """Small distinct photos without a face: each embeds in milliseconds."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = tmp_path / f"noise{i:03d}.png"
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def bulk_requests(ls) -> list:
    return [r for r in ls.requests if r[0] == "POST" and r[1].endswith("/import/predictions")]


@contextlib.contextmanager
def connected_project(redis_url, rq_workers, tmp_path, first_id: int, n: int, seed: int,
                      workers: int, token: str):
    """A backend set up for a stand-in Label Studio holding n faceless photo tasks, with
    workers running; yields (server, ls, tasks, config). Jobs of 2 photos."""
    config = default_config_xml()
    tasks = [ls_task(first_id + i, p) for i, p in enumerate(noise_photos(tmp_path, n, seed=seed))]
    rq_workers.start(workers)
    with serve(redis_url, SUBDISC_BATCH_SIZE="2") as server, StandInLabelStudio(token=token) as ls:
        ls.add_tasks(tasks)
        assert server.setup(config, hostname=ls.url, token=token).status_code == 200
        yield server, ls, tasks, config


def placeholder_looks(ls) -> list:
    """Listings of the tasks holding a placeholder (filtered on prediction versions)."""
    return [r for r in ls.requests if r[0] == "GET" and r[1].startswith("/api/tasks?")
            and "predictions_model_versions" in r[1]]


# --- tokens ------------------------------------------------------------------------------------

def test_token_kinds_and_origins():
    assert labelstudio_auth.token_kind("0123456789abcdef0123456789abcdef01234567") == "legacy"
    assert labelstudio_auth.token_kind(make_pat()) == "refresh"
    assert labelstudio_auth.token_kind(make_jwt({"token_type": "access", "exp": 1})) == "access"
    assert labelstudio_auth.token_kind("a.b.c") == "legacy"       # not base64 JSON
    on = labelstudio_auth.on_origin
    assert on("http://ls:8080", "http://LS:8080/data/upload/1/a.jpg")
    assert on("https://ls", "https://ls:443/x") and on("http://ls/", "http://ls:80/x")
    assert not on("http://ls:8080", "http://ls:8081/x")           # another port
    assert not on("https://ls", "http://ls/x")                    # clear text to an https host
    assert not on("http://ls:8080", "http://ls.evil:8080/x")
    assert not on("http://ls:8080", "http://evil/?u=http://ls:8080")
    assert not on(None, "http://ls/x") and not on("http://ls", "file:///etc/passwd")


def test_a_pat_is_refreshed_cached_and_refreshed_again_after_a_401(tmp_path):
    uploads = tmp_path / "uploads"
    (uploads / "1").mkdir(parents=True)
    (uploads / "1" / "a.jpg").write_bytes(b"image bytes")
    pat = make_pat()
    with StandInLabelStudio(token=None, pat=pat, uploads=uploads) as ls:
        client = LabelStudio(ls.url, pat)
        client.post_prediction(1, empty("v1"))
        client.post_prediction(2, empty("v1"))
        assert ls.refreshes == 1                                     # cached between requests
        assert all(p["_authorization"].startswith("Bearer ") for p in ls.predictions)
        assert not any(pat in r[2] for r in ls.requests)             # the PAT itself is never sent
        ls.expire_access()                                           # as after its lifetime
        client.post_prediction(3, empty("v1"))
        assert ls.refreshes == 2 and len(ls.predictions) == 3        # 401 -> refreshed, retried once

        # The workers' upload fetch takes the same token, and refreshes on a 401 too.
        settings = FetchSettings(label_studio_url=ls.url, label_studio_token=pat)
        assert read_bytes("/data/upload/1/a.jpg", settings) == b"image bytes"
        ls.expire_access()
        assert read_bytes("/data/upload/1/a.jpg", settings) == b"image bytes"
        assert ls.refreshes == 3

        # A revoked PAT is a clear, permanent error, not a retry loop.
        with pytest.raises(LabelStudioError) as err:
            LabelStudio(ls.url, make_pat()).post_prediction(4, empty("v1"))
        assert not err.value.transient and "Personal Access Token" in str(err.value)


def test_an_access_token_is_shared_by_forked_jobs_through_redis(redis_conn):
    pat = make_pat()
    with StandInLabelStudio(token=None, pat=pat) as ls:
        first = labelstudio_auth.LabelStudioAuth(ls.url, pat, redis=redis_conn)
        second = labelstudio_auth.LabelStudioAuth(ls.url, pat, redis=redis_conn)  # another fork
        assert first.headers() == second.headers() and ls.refreshes == 1


def test_a_legacy_key_is_sent_as_token(tmp_path):
    with StandInLabelStudio(token="0123456789abcdef") as ls:
        LabelStudio(ls.url, "0123456789abcdef").post_prediction(1, empty("v1"))
        assert ls.predictions[0]["_authorization"] == "Token 0123456789abcdef"
        assert ls.refreshes == 0


def test_setup_tokens_go_only_to_the_host_they_came_with(redis_conn, monkeypatch):
    for name in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    st = ProjectState(redis_conn, 7)
    st.save_settings("<View/>", "http://ls-a:8080", "tok-a")
    assert runtime.label_studio_target(st.settings()) == ("http://ls-a:8080", "tok-a")
    st.save_settings("<View/>")                                   # a webhook: same host, same token
    assert runtime.label_studio_target(st.settings()) == ("http://ls-a:8080", "tok-a")
    st.save_settings("<View/>", "http://other-host")              # another host, no token
    assert runtime.label_studio_target(st.settings()) == ("http://other-host", None)
    fetch = runtime.fetch_settings(st.settings())
    assert fetch.label_studio_url == "http://other-host" and fetch.label_studio_token is None
    st.save_settings("<View/>", "http://other-host", "tok-b")     # its own token: fine
    assert runtime.label_studio_target(st.settings()) == ("http://other-host", "tok-b")

    # The environment wins, and its key goes only to its URL.
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://ls-env:8080")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "tok-env")
    assert runtime.label_studio_target(st.settings()) == ("http://ls-env:8080", "tok-env")
    monkeypatch.delenv("LABEL_STUDIO_API_KEY")
    assert runtime.label_studio_target(st.settings()) == ("http://ls-env:8080", None)   # tok-b is not its
    monkeypatch.delenv("LABEL_STUDIO_URL")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "tok-env")
    st.save_settings("<View/>", "http://evil", None)
    assert runtime.label_studio_target(st.settings()) == ("http://evil", None)
    assert runtime.fetch_settings(st.settings()).label_studio_token is None


def test_a_second_setup_naming_another_host_gets_no_token(redis_url, redis_conn, rq_workers, tmp_path):
    """Issue 11 item 4: without LABEL_STUDIO_URL, /setup with another hostname and no token."""
    config = default_config_xml()
    rq_workers.start(1)
    with serve(redis_url) as server, StandInLabelStudio(token="tok-a") as first, \
            StandInLabelStudio(token=None) as other:
        assert server.setup(config, hostname=first.url, token="tok-a").status_code == 200
        assert server.setup(config, hostname=other.url, token="").status_code == 200
        task = ls_task(501, noise_photos(tmp_path, 1)[0])
        assert server.predict([task], config).status_code == 200
        deadline = time.monotonic() + 60
        while not any(r[0] == "POST" for r in other.requests) and time.monotonic() < deadline:
            time.sleep(0.2)
        posts = [r for r in other.requests if r[0] == "POST"]
        assert posts, "nothing was posted to the host /setup named last"
        assert all("tok-a" not in r[2] for r in other.requests)
        assert first.requests == []


# --- bulk posting ------------------------------------------------------------------------------

def test_each_batch_is_imported_in_one_request_and_nothing_twice(redis_url, redis_conn, rq_workers,
                                                                 tmp_path):
    config = default_config_xml()
    paths = noise_photos(tmp_path, 12)
    tasks = [ls_task(600 + i, p) for i, p in enumerate(paths)]
    rq_workers.start(2)
    with serve(redis_url, SUBDISC_BATCH_SIZE="4") as server, StandInLabelStudio(token="tok-b") as ls:
        assert server.setup(config, hostname=ls.url, token="tok-b").status_code == 200
        assert server.predict(tasks, config).status_code == 200
        ls.wait_for(12, timeout=120)
        time.sleep(1)
        assert sorted(p["task"] for p in ls.predictions) == [t["id"] for t in tasks]   # each once
        assert {p["_via"] for p in ls.predictions} == {"bulk"}
        assert len(bulk_requests(ls)) == 3                          # 12 tasks, batches of 4
        assert not [r for r in ls.requests if r[:2] == ("POST", "/api/predictions")]
        # Asked again: all cached, answered in /predict itself, nothing posted.
        again = server.predict(tasks, config).json()["results"]
        assert not any(PENDING_SUFFIX in p["model_version"] for p in again)
        time.sleep(1)
        assert len(ls.predictions) == 12 and len(bulk_requests(ls)) == 3


def test_a_big_request_is_cut_into_few_import_requests():
    """Label Studio's time per import request grows with the project, not with the request: a
    request of thousands gets bigger jobs (each one import), small ones keep the batch size."""
    from backend.predict_jobs import MAX_BATCH, MAX_IMPORTS, import_size

    assert import_size(10, 4) == 4 and import_size(1000, 32) == 32
    size = import_size(7199, 32)
    assert size > 32 and -(-7199 // size) <= MAX_IMPORTS
    assert import_size(10**6, 32) == MAX_BATCH and import_size(10**6, 500) == 500   # asked for


def test_a_refused_bulk_import_falls_back_to_one_post_per_task(redis_url, redis_conn, rq_workers,
                                                               tmp_path):
    config = default_config_xml()
    tasks = [ls_task(700 + i, p) for i, p in enumerate(noise_photos(tmp_path, 9, seed=6))]
    rq_workers.start(1)
    with serve(redis_url, SUBDISC_BATCH_SIZE="3") as server, \
            StandInLabelStudio(token="tok-c", bulk_status=405) as ls:
        assert server.setup(config, hostname=ls.url, token="tok-c").status_code == 200
        assert server.predict(tasks, config).status_code == 200
        ls.wait_for(9, timeout=120)
        time.sleep(1)
        assert sorted(p["task"] for p in ls.predictions) == [t["id"] for t in tasks]
        assert {p["_via"] for p in ls.predictions} == {"single"}
        assert len(bulk_requests(ls)) == 1          # refused once, then remembered for the project


def test_a_bad_item_costs_that_item_only_and_a_lost_answer_is_not_resent(redis_conn):
    st = ProjectState(redis_conn, 9)
    good = [(str(t), empty("v1")) for t in (1, 2, 3)]
    bad = ("4", {"model_version": "v1", "result": "not a list"})
    with StandInLabelStudio(token="k") as ls:
        out = posting.send(LabelStudio(ls.url, "k"), st, [*good, bad], first_wait=0.01)
        assert sorted(out.posted) == ["1", "2", "3"] and list(out.errors) == ["4"]
        assert "HTTP 400" in out.errors["4"]
        assert sorted(p["task"] for p in ls.predictions) == [1, 2, 3]
        assert st.posted_versions(["1", "4"]) == {"1": "v1", "4": None}

    # Label Studio stores the import but the answer is lost (a 502 from a proxy, a timeout):
    # the retry asks which tasks hold the version already and sends nothing twice.
    with StandInLabelStudio(token="k") as ls:
        client = LabelStudio(ls.url, "k")
        real, lost = client.import_predictions, []

        def stored_then_lost(project, items):
            real(project, items)
            if not lost:
                lost.append(items)
                raise LabelStudioError("HTTP 502 Bad Gateway", transient=True, status=502)
        client.import_predictions = stored_then_lost
        items = [(str(t), empty("v2")) for t in (11, 12)]
        out = posting.send(client, ProjectState(redis_conn, 10), items, first_wait=0.01)
        assert lost and sorted(out.posted) == ["11", "12"] and not out.errors
        assert sorted(p["task"] for p in ls.predictions) == [11, 12]      # once each


def test_queued_tasks_cost_label_studio_only_their_imports(redis_url, redis_conn, rq_workers,
                                                            tmp_path):
    """`subdisc up`'s path (queue_tasks) hands out no placeholders, so the workers never list the
    project looking for stale ones (a filtered listing of every task: ~1 s of Label Studio's CPU
    at 7,000 tasks, once per batch); after a /predict that did hand some out, they look again."""
    from backend.model import SubdiscModel
    from backend.predict_jobs import queue_tasks

    with connected_project(redis_url, rq_workers, tmp_path, 900, 8, seed=9, workers=1,
                           token="tok-q") as (server, ls, tasks, config):
        model = SubdiscModel(redis_conn, queue_name="subdisc-test", batch_size=2)
        counts = queue_tasks(model, PROJECT, {t["id"]: t["data"]["image"] for t in tasks[:6]})
        assert counts["queued"] == 6 and counts["jobs"] == 3
        ls.wait_for(6, timeout=120)
        time.sleep(2)                                    # the last job's follow-ups, if any
        # (A reconciliation's listing of annotated tasks may come with the run's refit.)
        assert placeholder_looks(ls) == [] and len(bulk_requests(ls)) == 3
        assert not ProjectState(redis_conn, PROJECT).placeholders_out()

        answer = server.predict(tasks[6:], config).json()["results"]   # "Retrieve predictions"
        assert all(p["model_version"].endswith(PENDING_SUFFIX) for p in answer)
        assert ProjectState(redis_conn, PROJECT).placeholders_out()
        ls.wait_for(8, timeout=120)
        time.sleep(2)
        assert placeholder_looks(ls)


# --- the placeholder race (issue 11, item 8) ---------------------------------------------------

def test_no_placeholder_stays_newer_than_the_real_prediction(redis_url, redis_conn, rq_workers,
                                                             tmp_path):
    """"Retrieve predictions" on uncached photos: Label Studio stores the /predict answer (empty
    "+pending" placeholders) slowly, while the workers post the real predictions within a second
    or two. Without the repair most placeholders land after, and become what the labeler sees."""
    with connected_project(redis_url, rq_workers, tmp_path, 800, 24, seed=8, workers=2,
                           token="tok-r") as (server, ls, tasks, config):
        answer = ls.retrieve(server.url, PROJECT, tasks, config, rate=4, auth=server.http.auth)
        assert all(p["model_version"].endswith(PENDING_SUFFIX) for p in answer)
        ls.wait_for(24, timeout=120)
        first_real = min(p["_received"] for p in ls.predictions if p["_via"] == "bulk")
        for thread in ls.storing:
            thread.join(60)
        stored_after = [p for p in ls.predictions
                        if p["_via"] == "predict" and p["_received"] > first_real]
        assert stored_after, "no placeholder was stored after a real prediction: no race to test"

        def settled():
            latest = {t["id"]: ls.latest(t["id"]) for t in tasks}
            return all(p is not None and PENDING_SUFFIX not in p["model_version"]
                       for p in latest.values())
        deadline = time.monotonic() + 60
        while not settled():
            assert time.monotonic() < deadline, (
                "placeholders newer than the real prediction: "
                f"{sum(PENDING_SUFFIX in ls.latest(t['id'])['model_version'] for t in tasks)} of 24")
            time.sleep(0.5)
        for t in tasks:
            live = ls.live(t["id"])
            assert len(live) == 1 and PENDING_SUFFIX not in live[0]["model_version"], live
        assert sorted(p["task"] for p in ls.predictions if p["_via"] == "bulk") == sorted(ls.tasks)


def test_list_tasks_pages_until_the_total(redis_conn):
    with StandInLabelStudio(token="k") as ls:
        ls.add_tasks([{"id": i, "data": {"image": f"/data/upload/1/{i}.jpg"}} for i in range(1, 251)])
        got = LabelStudio(ls.url, "k").list_tasks(1, page_size=100)
        assert [t["id"] for t in got] == list(range(1, 251))
        pages = [r for r in ls.requests if r[1].startswith("/api/tasks")]
        assert len(pages) == 3 and all("review=true" in r[1] for r in pages)


def test_settling_waits_for_every_placeholder_handed_out(redis_url, redis_conn, monkeypatch):
    """Label Studio under load stores a /predict answer with pauses longer than the settling's
    quiet period: settling must not stop while placeholders it handed out have not landed."""
    from backend.predict_jobs import settle_placeholders

    monkeypatch.setenv("SUBDISC_REDIS_URL", redis_url)
    with StandInLabelStudio(token="tok-s") as ls:
        tasks = [{"id": 950 + i, "data": {"image": f"/data/upload/1/{i}.jpg"}} for i in range(4)]
        ls.add_tasks(tasks)
        st = ProjectState(redis_conn, PROJECT)
        st.save_settings(default_config_xml(), hostname=ls.url, access_token="tok-s")
        st.placeholders_given(len(tasks), 600)            # what /predict answered
        for t in tasks:                                   # the real predictions, posted at once
            ls.store({"task": t["id"], "model_version": "v1", "result": []}, "bulk")

        def store_with_pauses():                          # then the placeholders, 1.5 s apart
            for t in tasks:
                time.sleep(1.5)
                ls.store({"task": t["id"], "model_version": "v1" + PENDING_SUFFIX, "result": []},
                         "predict")
        thread = threading.Thread(target=store_with_pauses, daemon=True)
        thread.start()
        out = settle_placeholders(st.id, quiet=0.5, limit=30, every=0.1)
        thread.join()
        assert out["landed"] and out["removed"] == 4
        assert all(ls.latest(t["id"])["model_version"] == "v1" for t in tasks)
        assert st.placeholders() == {"given": 4, "removed": 4}


def test_a_placeholder_landing_just_after_a_repair_is_not_counted_as_standing(
        redis_url, redis_conn, monkeypatch):
    """The CI flake of the test above, made certain: the last placeholder lands between a repair and
    the count of placeholders still standing. It sits next to a real prediction, so it is not
    standing; settling must repair it, not stop one short."""
    import backend.predict_jobs as predict_jobs

    monkeypatch.setenv("SUBDISC_REDIS_URL", redis_url)
    with StandInLabelStudio(token="tok-r") as ls:
        tasks = [{"id": 970 + i, "data": {"image": f"/data/upload/1/{i}.jpg"}} for i in range(2)]
        ls.add_tasks(tasks)
        st = ProjectState(redis_conn, PROJECT)
        st.save_settings(default_config_xml(), hostname=ls.url, access_token="tok-r")
        st.placeholders_given(len(tasks), 600)
        for t in tasks:
            ls.store({"task": t["id"], "model_version": "v1", "result": []}, "bulk")
        ls.store({"task": tasks[0]["id"], "model_version": "v1" + PENDING_SUFFIX, "result": []},
                 "predict")
        real_standing, calls = predict_jobs._standing, []

        def late_landing(state, client):
            if not calls:                                 # lands after the repair, before the count
                ls.store({"task": tasks[1]["id"], "model_version": "v1" + PENDING_SUFFIX,
                          "result": []}, "predict")
            calls.append(1)
            return real_standing(state, client)
        monkeypatch.setattr(predict_jobs, "_standing", late_landing)
        out = predict_jobs.settle_placeholders(st.id, quiet=0.2, limit=10, every=0.05)
        assert out["landed"] and out["removed"] == 2, out
        assert all(len(ls.live(t["id"])) == 1 for t in tasks)
        assert st.placeholders() == {"given": 2, "removed": 2}

"""End to end with the real Label Studio 1.23.2 (its own cached venv), nothing stood in for.

Label Studio runs headless on a free port next to a real redis-server, RQ workers and the backend under
gunicorn, all started by backend/stack.py (the code `subdisc up` runs). With label-studio-sdk we do what
a user does: a project with our config, a local-files storage over ~40 photos, the backend connected,
"Retrieve predictions" on every task, then annotations as a labeler makes them (accepting some
pre-annotations, correcting others), and we check the backend's report against our own count.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from PIL import Image

from backend import stack as stack_mod
from backend.labeling_config import default_config_xml
from backend.ls_setup import Provisioner, document_root_for
from backend.model import PENDING_SUFFIX
from tests.support import DEV_FACES, free_port
from tests.e2e.e2e_photos import make_photos

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2400)]

N_PHOTOS = 40
#: Seconds to wait for every prediction of the small folders used here (2 workers, no BLAS: ~1 s each).
PREDICTION_TIMEOUT = 600


@pytest.fixture(scope="session")
def label_studio_exe() -> Path:
    """label-studio 1.23.2 in its cached venv; installed on first use (skipped offline, not in CI)."""
    try:
        return stack_mod.ensure_label_studio(stack_mod.DEFAULT_LS_VENV)
    except stack_mod.StackError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the end-to-end tests, but Label Studio did not install: {exc}")
        pytest.skip(f"Label Studio {stack_mod.LABEL_STUDIO_VERSION} could not be installed into "
                    f"{stack_mod.DEFAULT_LS_VENV} (no network to PyPI?): {exc}")


def config_choices(xml: str) -> dict[str, set[str]]:
    """{Choices name: its values} read straight from the XML (independently of the backend)."""
    return {c.get("name"): {ch.get("value") for ch in c.iter("Choice")}
            for c in ET.fromstring(xml).iter("Choices")}


@dataclass
class Live:
    """A running stack: Label Studio, backend, Redis, workers."""

    stack: stack_mod.Stack
    ls_url: str
    backend_url: str
    redis_url: str
    token: str
    photos: Path
    truth: dict[str, str]
    ls: Provisioner = None
    project: int = None
    tasks: dict[int, str] = field(default_factory=dict)   # task id -> file name

    def logs(self) -> str:
        return "\n".join(f"--- {c.name} ({c.log})\n{stack_mod._tail(c.log, 15)}"
                         for c in self.stack.children)


@pytest.fixture(scope="module")
def live(label_studio_exe, tmp_path_factory) -> Live:
    base = tmp_path_factory.mktemp("e2e")
    photos = base / "files" / "photos"
    truth = make_photos(photos, N_PHOTOS, DEV_FACES)
    root = document_root_for(photos)
    token = f"e2e-{uuid.uuid4().hex}"
    with stack_mod.Stack(base / "logs") as stack:
        redis_url = stack.start_redis(free_port(), base / "redis")
        ls_port = free_port()
        ls_url = f"http://127.0.0.1:{ls_port}"
        env = {"SUBDISC_REDIS_URL": redis_url, "LABEL_STUDIO_URL": ls_url,
               "LABEL_STUDIO_API_KEY": token, "SUBDISC_LOCAL_FILES_ROOT": str(root)}
        stack.start_workers(2, redis_url, "subdisc", env)
        backend_url = stack.start_backend(free_port(), env)
        stack.start_label_studio(label_studio_exe, ls_port, base / "label-studio",
                                 stack_mod.label_studio_env(username="e2e@subdisc.local",
                                                            password="e2e-password", token=token,
                                                            document_root=root))
        yield Live(stack, ls_url, backend_url, redis_url, token, photos, truth)


def wait_for(what: str, predicate, live: Live, timeout: float = PREDICTION_TIMEOUT, every: float = 1):
    deadline = time.monotonic() + timeout
    while True:
        live.stack.check_alive()
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{live.logs()}")
        time.sleep(every)


@pytest.fixture(scope="module")
def predicted(live) -> Live:
    """A project over the photos, the backend connected, and a prediction for every task."""
    live.ls = ls = Provisioner(live.ls_url, live.token)
    project = ls.find_or_create_project("subdisc e2e", default_config_xml())
    live.project = project.id
    ls.ensure_local_storage(project.id, live.photos)
    live.tasks = {tid: url.rsplit("/", 1)[-1] for tid, url in ls.task_images(project.id).items()}
    assert sorted(live.tasks.values()) == sorted(p.name for p in live.photos.iterdir())
    ls.connect_backend(project.id, live.backend_url)
    ls.retrieve_predictions(project.id)
    wait_for("a prediction on every task",
             lambda: ls.count_predicted(project.id, PENDING_SUFFIX) == len(live.tasks), live)
    return live


def latest_prediction(live: Live, task: int) -> dict:
    """The newest prediction of a task that is not the backend's "still computing" placeholder."""
    predictions = [p for p in live.ls.ls.predictions.list(task=task)
                   if PENDING_SUFFIX not in (p.model_version or "")]
    assert predictions, f"task {task} has no prediction"
    return max(predictions, key=lambda p: p.id).dict()


def test_every_task_gets_a_prediction_of_the_right_shape(predicted):
    live = predicted
    choices = config_choices(default_config_xml())
    with_faces = 0
    for task, name in live.tasks.items():
        prediction = latest_prediction(live, task)
        if prediction.get("score") is not None:
            assert 0 <= prediction["score"] <= 1
        width, height = Image.open(live.photos / name).size
        boxes = {}
        for item in prediction["result"]:
            assert item["to_name"] == "image"
            assert 0 <= item.get("score", 0) <= 1, item
            value = item["value"]
            if item["type"] == "rectanglelabels":
                assert item["from_name"] == "face" and value["rectanglelabels"] == ["Face"]
                assert (item["original_width"], item["original_height"]) == (width, height), name
                assert 0 <= value["x"] and 0 <= value["y"], item
                assert value["x"] + value["width"] <= 100 + 1e-6, item
                assert value["y"] + value["height"] <= 100 + 1e-6, item
                assert value["width"] > 0 and value["height"] > 0, item
                boxes[item["id"]] = value
            else:
                assert item["type"] == "choices", item
                assert set(value["choices"]) <= choices[item["from_name"]], item
        for item in prediction["result"]:
            if item["type"] == "choices" and "x" in item["value"]:
                assert item["id"] in boxes, f"a per-face choice without its face box: {item}"
        with_faces += bool(boxes)
    # Most photos hold a detectable face; the two without one still got a (possibly empty) prediction.
    assert with_faces >= len(live.tasks) // 2, with_faces


# --- a labeler at work -------------------------------------------------------------------------

ATTRIBUTE = "gender"


def report(live: Live) -> dict:
    resp = requests.get(f"{live.backend_url}/report", params={"project": live.project}, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()


def face_boxes(result: list[dict]) -> list[dict]:
    return [r for r in result if r["type"] == "rectanglelabels"]


def main_face(result: list[dict]) -> dict:
    """The largest detected face: the person the photo's label is about."""
    return max(face_boxes(result), key=lambda r: r["value"]["width"] * r["value"]["height"])


def with_value(result: list[dict], box: dict, attribute: str, value: str) -> list[dict]:
    """The labeler's result: the given one, with `attribute` of the face `box` set to `value`."""
    kept = [r for r in result if not (r["id"] == box["id"] and r["from_name"] == attribute)]
    geometry = {k: box["value"][k] for k in ("x", "y", "width", "height", "rotation") if k in box["value"]}
    kept.append({"id": box["id"], "from_name": attribute, "to_name": "image", "type": "choices",
                 "original_width": box["original_width"], "original_height": box["original_height"],
                 "image_rotation": 0, "value": {**geometry, "choices": [value]}})
    return kept


def shown_values(result: list[dict], attribute: str) -> dict[str, str]:
    """{face region id: value} the prediction showed for `attribute`."""
    return {r["id"]: r["value"]["choices"][0] for r in result
            if r["from_name"] == attribute and r["value"].get("choices")}


def annotate(live: Live, task: int, result: list[dict]) -> None:
    # Scores belong to predictions; a labeler's submission carries the regions and values only.
    clean = [{k: v for k, v in r.items() if k != "score"} for r in result]
    live.ls.ls.annotations.create(id=task, result=clean, project=live.project)


def wait_for_refit(live: Live, confirmed: int) -> dict:
    """The report once a refit has taken in `confirmed` confirmations of ATTRIBUTE."""
    def settled():
        r = report(live)
        a = r["attributes"][ATTRIBUTE]
        return r if a["confirmed"] == confirmed and not r["refit_queued"] else None
    return wait_for(f"a refit over {confirmed} confirmations", settled, live, every=2)


def test_confirmations_refit_and_report_match_a_hand_count(predicted):
    live = predicted
    values = config_choices(default_config_xml())[ATTRIBUTE]
    shown0 = {t: latest_prediction(live, t) for t in live.tasks}
    faces = [t for t, p in shown0.items() if face_boxes(p["result"]) and live.tasks[t] in live.truth]
    assert len(faces) >= 20, "too few photos with a detected face to label"
    before = report(live)
    version0 = before["model_version"]
    assert before["attributes"][ATTRIBUTE]["confirmed"] == 0

    # Round 1: nothing is named yet (boxes only); the labeler gives the main face its gender.
    by_value = {v: [t for t in faces if live.truth[live.tasks[t]] == v] for v in sorted(values)}
    first = [t for v in by_value for t in by_value[v][:7]]   # 14: a gate needs 12 held-out faces
    confirmations = Counter()
    for task in first:
        result = shown0[task]["result"]
        assert not shown_values(result, ATTRIBUTE), "a value was predicted before any confirmation"
        value = live.truth[live.tasks[task]]
        annotate(live, task, with_value(result, main_face(result), ATTRIBUTE, value))
        confirmations[value] += 1
    after_first = wait_for_refit(live, len(first))
    named = after_first["attributes"][ATTRIBUTE]
    assert named["status"] in ("shown", "silent"), named   # silent until held-out answers beat the majority
    assert named["confirmations"] == dict(confirmations)
    assert after_first["model_version"] != version0, "a refit that names clusters must bump the version"

    # Round 2: Label Studio asks again (a new model_version); now genders are pre-annotated. The
    # labeler accepts every other task as is and corrects the main face of the others.
    live.ls.retrieve_predictions(live.project)
    version1 = after_first["model_version"]
    rest = [t for t in faces if t not in first]

    def repredicted():
        got = {t: latest_prediction(live, t) for t in rest}
        return got if all(p["model_version"] == version1 for p in got.values()) else None
    shown1 = wait_for(f"predictions of model {version1}", repredicted, live, every=2)
    shown_count = accepted = corrected = abstained = 0
    for n, task in enumerate(rest):
        result = shown1[task]["result"]
        shown = shown_values(result, ATTRIBUTE)
        assert set(shown.values()) <= values
        face = main_face(result)
        if face["id"] not in shown:
            # The model is less sure of this face than the gate allows: no value, the labeler sets it.
            submitted = with_value(result, face, ATTRIBUTE, live.truth[live.tasks[task]])
            abstained += 1
        elif n % 2 == 0:
            submitted = result                             # accepted as is
        else:
            wrong = shown.get(face["id"])
            other = sorted(values - {wrong})[0]
            submitted = with_value(result, face, ATTRIBUTE, other)
            corrected += 1
        annotate(live, task, submitted)
        kept = shown_values(submitted, ATTRIBUTE)
        shown_count += len(shown)
        accepted += sum(kept.get(rid) == v for rid, v in shown.items())
        confirmations.update(kept.values())
    assert corrected and accepted
    assert abstained <= len(rest) // 2, f"{ATTRIBUTE} shown on {len(rest) - abstained} of {len(rest)} faces"

    final = wait_for_refit(live, sum(confirmations.values()))
    a = final["attributes"][ATTRIBUTE]
    # The labeler's decisions, counted by hand.
    assert final["annotations"] == len(first) + len(rest)
    assert a["confirmations"] == dict(confirmations)
    assert a["confirmed"] == sum(confirmations.values())
    assert (a["shown"], a["accepted"]) == (shown_count, accepted)
    assert a["accepted_rate"] == pytest.approx(accepted / shown_count)
    # The refits and how the figures moved.
    assert final["refits"] >= 2 and final["model_version"] not in (version0, None)
    confirmed_by_refit = [h["confirmations"] for h in a["history"]]
    assert len(first) in confirmed_by_refit and a["confirmed"] in confirmed_by_refit
    # Accuracy: the held-out confusion matrix covers exactly the confirmed faces.
    order = a["confusion_values"]
    matrix = a["confusion"]
    assert {v: sum(row) for v, row in zip(order, matrix)} == {v: confirmations.get(v, 0) for v in order}
    total = sum(map(sum, matrix))
    assert a["scored_faces"] == total == a["confirmed"]
    assert a["accuracy"] == pytest.approx(sum(matrix[i][i] for i in range(len(order))) / total)
    for i, v in enumerate(order):
        if sum(matrix[i]):
            assert a["per_value"][v] == pytest.approx(matrix[i][i] / sum(matrix[i]))
    # The same figures as a page with plots.
    page = requests.get(f"{live.backend_url}/report.html", params={"project": live.project}, timeout=60)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert ATTRIBUTE in page.text and "data:image/png;base64," in page.text


# --- `subdisc up` ------------------------------------------------------------------------------

def marked_processes(marker: str) -> list[int]:
    """Live processes whose environment carries `marker`: everything `subdisc up` started inherits it."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    stat = (entry / "stat").read_text()
                    if stat.rsplit(")", 1)[1].split()[0] != "Z":    # zombies are already dead
                        pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def embedding_jobs(data_dir: Path) -> int:
    """Jobs the workers ran that embed photos: rq logs each job's description when it starts, ours
    say "embed N images" (subdisc embed) or "predict N tasks" (embed, then post to Label Studio)."""
    started = re.compile(r": (embed \d+ images|predict \d+ tasks) .*\([0-9a-f-]{36}\)$", re.M)
    return sum(len(started.findall(log.read_text(errors="replace")))
               for log in (data_dir / "logs").glob("worker-*.log"))


def _interrupt_by_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_subdisc_up_runs_end_to_end_and_leaves_nothing_behind(label_studio_exe, tmp_path):
    photos = tmp_path / "files" / "faces"
    truth = make_photos(photos, 6, DEV_FACES)
    n_photos = len(list(photos.iterdir()))
    data_dir = tmp_path / "data"
    marker = f"SUBDISC_E2E_MARKER={uuid.uuid4().hex}"
    env = dict(os.environ, SUBDISC_E2E_MARKER=marker.split("=", 1)[1])
    cmd = [*stack_mod.SUBDISC, "up", "--images", str(photos), "--workers", "2",
           "--ls-port", str(free_port()), "--backend-port", str(free_port()),
           "--redis-port", str(free_port()), "--data-dir", str(data_dir)]
    up = None
    try:
        # First run: everything from scratch, stop by itself once every photo has its prediction.
        up = subprocess.run([*cmd, "--exit-when-done", "--stall-timeout", "300"], env=env,
                            cwd=stack_mod.ROOT, capture_output=True, text=True, timeout=1500,
                            start_new_session=True)
        out = up.stdout + up.stderr
        assert up.returncode == 0, out
        assert f"predictions posted {n_photos}/{n_photos}" in out, out
        assert f"done: {n_photos} photos" in out, out
        assert "new project" in out, out
        assert _settled(marker) == [], "processes left behind after --exit-when-done"
        jobs = embedding_jobs(data_dir)
        assert jobs >= 1

        # Second run: the same project and the cached vectors (no embedding job), stopped by Ctrl-C.
        log = tmp_path / "up2.log"
        with open(log, "w") as out_file:
            # Ctrl-C live as in a terminal: a shell's background job (`.ci/run &`) starts its
            # children with SIGINT ignored, and Python then never raises KeyboardInterrupt.
            up = subprocess.Popen(cmd, env=env, cwd=stack_mod.ROOT, stdout=out_file,
                                  stderr=subprocess.STDOUT, start_new_session=True,
                                  preexec_fn=_interrupt_by_default)
        deadline = time.monotonic() + 900
        while "every photo has a prediction" not in log.read_text():
            assert up.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(1)
        out = log.read_text()
        assert "existing project" in out, out
        assert f"photos embedded {n_photos}/{n_photos}" in out, out
        # Done means done under this run's model: the first run's refit named a new version, and
        # tasks holding the older one's prediction must have been re-posted before "done".
        version = re.search(r"\(model version (\S+)\)", out).group(1)
        ls_url = f"http://127.0.0.1:{cmd[cmd.index('--ls-port') + 1]}"
        token = json.loads((data_dir / "label-studio-login.json").read_text())["token"]
        project = int(re.search(r"\(existing project (\d+)\)", out).group(1))
        held = Provisioner(ls_url, token).count_tasks(project, {
            "filter": "filter:tasks:predictions_model_versions", "type": "List",
            "value": [version], "operator": "contains"})
        assert held == n_photos, (held, version, out)
        os.kill(up.pid, signal.SIGINT)      # what Ctrl-C in its terminal sends
        assert up.wait(60) == 130, log.read_text()
        assert _settled(marker) == [], "processes left behind after Ctrl-C"
        assert embedding_jobs(data_dir) == jobs, "the second run computed vectors again"
        assert truth   # the folder really held photos
    finally:
        if isinstance(up, subprocess.Popen) and up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
        for pid in marked_processes(marker):   # a failed test must not leave the stack running
            try:
                group = os.getpgid(pid)
                if group != os.getpgrp():
                    os.killpg(group, signal.SIGKILL)
                else:
                    os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _settled(marker: str, timeout: float = 10) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := marked_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


# --- Personal Access Tokens ----------------------------------------------------------------------

def test_a_personal_access_token_works_for_setup_backend_and_workers(predicted, tmp_path):
    """Label Studio 1.23 hands users PATs (JWT refresh tokens): a backend and workers given one
    (and nothing else) fetch the photos through Label Studio and import the predictions."""
    live = predicted
    resp = requests.post(f"{live.ls_url}/api/token/", headers={"Authorization": f"Token {live.token}"},
                         timeout=30)
    assert resp.status_code == 201, resp.text
    pat = resp.json()["token"]
    assert requests.get(f"{live.ls_url}/api/projects", timeout=30,
                        headers={"Authorization": f"Token {pat}"}).status_code == 401
    ls = Provisioner(live.ls_url, pat)
    project = ls.find_or_create_project("subdisc e2e pat", default_config_xml())
    photos = sorted(live.photos.iterdir())[:4]
    folder = live.photos.parent / "pat"
    folder.mkdir(exist_ok=True)
    for p in photos:
        (folder / f"pat-{p.name}").write_bytes(p.read_bytes())   # new bytes paths: not cached
    ls.ensure_local_storage(project.id, folder)
    tasks = ls.task_images(project.id)
    assert len(tasks) == len(photos)
    with stack_mod.Stack(tmp_path / "logs") as stack:
        # No local files root: the workers must fetch every photo through Label Studio, with the PAT.
        env = {"SUBDISC_REDIS_URL": live.redis_url, "LABEL_STUDIO_URL": live.ls_url,
               "LABEL_STUDIO_API_KEY": pat, "SUBDISC_QUEUE": "subdisc-pat",
               "SUBDISC_LOCAL_FILES_ROOT": "", "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": ""}
        stack.start_workers(1, live.redis_url, "subdisc-pat", env)
        backend_url = stack.start_backend(free_port(), env)
        ls.connect_backend(project.id, backend_url, title="subdisc-pat")
        ls.retrieve_predictions(project.id)
        wait_for("predictions made with a PAT",
                 lambda: ls.count_predicted(project.id, PENDING_SUFFIX) == len(tasks), live)
    with_faces = 0
    for task in tasks:
        got = [p for p in ls.ls.predictions.list(task=task) if PENDING_SUFFIX not in (p.model_version or "")]
        assert got, task
        with_faces += any(r["type"] == "rectanglelabels" for p in got for r in p.result)
    assert with_faces >= 1, "no face found in photos fetched through Label Studio with the PAT"

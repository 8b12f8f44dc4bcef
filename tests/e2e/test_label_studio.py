"""End to end with the real Label Studio 1.23.2 (its own cached venv), nothing stood in for.

Label Studio runs headless on a free port next to a real redis-server, RQ workers and the backend under
gunicorn, all started by backend/stack.py (the code `subdisc up` runs). With label-studio-sdk we do what
a user does: a project with our config, a local-files storage over ~40 photos, the backend connected,
"Retrieve predictions" on every task, then annotations as a labeler makes them (accepting some
pre-annotations, correcting others), and we check the backend's report against our own count.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from PIL import Image

from backend import stack as stack_mod
from backend.ls_setup import Provisioner, document_root_for
from backend.model import PENDING_SUFFIX
from conftest import DEV_FACES, free_port
from e2e_photos import make_photos

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2400)]

CONFIG_PATH = Path(stack_mod.ROOT) / "backend" / "default_config.xml"
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
    project = ls.find_or_create_project("subdisc e2e", CONFIG_PATH.read_text())
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
    choices = config_choices(CONFIG_PATH.read_text())
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
    """Embedding jobs the workers ran (rq logs each job's description, ours say "embed N images")."""
    return sum(log.read_text(errors="replace").count(": embed ")
               for log in (data_dir / "logs").glob("worker-*.log"))


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
            up = subprocess.Popen(cmd, env=env, cwd=stack_mod.ROOT, stdout=out_file,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 900
        while "every photo has a prediction" not in log.read_text():
            assert up.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(1)
        out = log.read_text()
        assert "existing project" in out, out
        assert f"photos embedded {n_photos}/{n_photos}" in out, out
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

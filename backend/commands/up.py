"""`subdisc up --images DIR`: a working labelling stack on this machine, with one command.

Starts Redis (append-only, so confirmed labels survive a restart), RQ workers, the backend and Label
Studio 1.23.2 (its own venv, installed on first use), creates or reuses the project for DIR, connects
the backend, queues every photo on the workers and shows progress while their predictions are
imported into Label Studio batch by batch. Ctrl-C stops all it started. Running it again on the same
folder reuses the project, the Label Studio data and the vector cache (nothing is computed again).

It does not click "Retrieve predictions": Label Studio would send every task to /predict in one
request and then store what it answers (a placeholder per uncached photo) at ~12 a second, 10
minutes for 7,000 photos. Queuing the photos itself and importing each batch's predictions in one
request (backend/predict_jobs.py) leaves Label Studio nothing slow to do.
"""
from __future__ import annotations

import json
import logging
import math
import os
import secrets
import sys
import time
from pathlib import Path

import redis as redis_lib
from rq import Queue
from rq.registry import StartedJobRegistry

from backend.cli import CommandError
from backend.labeling_config import default_config_xml
from backend.model import PENDING_SUFFIX
from backend.ls_setup import Provisioner, absolute, document_root_for, project_title
from backend.predict_jobs import queue_tasks
from backend.state import ProjectState
from backend.stack import (DEFAULT_LS_VENV, Stack, check_ports, ensure_label_studio, label_studio_env,
                           stop_on_sigterm)
from workers.cache import EmbeddingCache
from workers.images import FetchSettings, ImageError, image_files, source_identity
from workers.pipeline import PipelineOptions, fingerprint

DEFAULT_DATA_DIR = Path(os.environ.get("SUBDISC_DATA_DIR", Path.home() / ".local" / "share" / "subdisc"))


def register(sub) -> None:
    p = sub.add_parser("up", help="start Redis, workers, the backend and Label Studio on a photo folder",
                       description=__doc__)
    p.add_argument("--images", required=True, type=Path, metavar="DIR", help="folder of face photos")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="RQ workers computing face vectors (default: number of cores)")
    p.add_argument("--ls-port", type=int, default=8080, help="Label Studio port (default 8080)")
    p.add_argument("--backend-port", type=int, default=9090, help="backend port (default 9090)")
    # Not 6379: Debian's redis-server package starts a system Redis there, which is not ours.
    p.add_argument("--redis-port", type=int, default=6390, help="Redis port (default 6390)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                   help=f"Redis, Label Studio and log files (default {DEFAULT_DATA_DIR})")
    p.add_argument("--fallback", action="store_true",
                   help="treat the whole photo as the face when none is detected (pre-cropped photos)")
    p.add_argument("--title", help="project title (default: from the folder's name and path)")
    p.add_argument("--ls-venv", type=Path, default=DEFAULT_LS_VENV,
                   help=f"Label Studio's virtual environment (default {DEFAULT_LS_VENV})")
    p.add_argument("--exit-when-done", action="store_true",
                   help="stop everything once every photo has its prediction, and print the figures")
    p.add_argument("--stall-timeout", type=float, default=600,
                   help="with --exit-when-done: give up after this many seconds without progress")
    p.set_defaults(func=run)


def credentials(data_dir: Path) -> dict:
    """The Label Studio admin login and API token: made once per data dir, then reused."""
    path = data_dir / "label-studio-login.json"
    if path.exists():
        return json.loads(path.read_text())
    creds = {"username": "admin@subdisc.local", "password": secrets.token_urlsafe(12),
             "token": secrets.token_hex(20)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(json.dumps(creds, indent=1))
    return creds


def run(args) -> int:
    folder = absolute(args.images)
    root = document_root_for(folder)
    if args.workers < 1:
        raise CommandError("--workers must be at least 1")
    check_ports({"Label Studio": args.ls_port, "backend": args.backend_port, "Redis": args.redis_port})
    exe = ensure_label_studio(args.ls_venv)
    data_dir = args.data_dir.expanduser().resolve()
    creds = credentials(data_dir)
    ls_url = f"http://127.0.0.1:{args.ls_port}"
    # The SDK logs every HTTP request at INFO: it would drown the progress lines.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # SIGTERM (e.g. from a test or a service manager) stops the stack like Ctrl-C does.
    stop_on_sigterm()
    started = time.monotonic()
    try:
        with Stack(data_dir / "logs") as stack:
            say(f"starting Redis, {args.workers} workers and the backend (logs in {stack.log_dir})")
            redis_url = stack.start_redis(args.redis_port, data_dir / "redis")
            env = {"SUBDISC_REDIS_URL": redis_url, "LABEL_STUDIO_URL": ls_url,
                   "LABEL_STUDIO_API_KEY": creds["token"], "SUBDISC_LOCAL_FILES_ROOT": str(root),
                   "SUBDISC_FALLBACK": "1" if args.fallback else ""}
            stack.start_workers(args.workers, redis_url, "subdisc", env)
            backend_url = stack.start_backend(args.backend_port, env)
            say("starting Label Studio (the first start sets up its database: about a minute)")
            stack.start_label_studio(exe, args.ls_port, data_dir / "label-studio", label_studio_env(
                username=creds["username"], password=creds["password"], token=creds["token"],
                document_root=root))
            ls = Provisioner(ls_url, creds["token"])
            project = ls.provision(folder, backend_url, default_config_xml(),
                                   title=args.title or project_title(folder))
            say(f"Label Studio: {ls_url}/projects/{project.id}/data   "
                f"login {creds['username']} / {creds['password']}   "
                f"(API token in {data_dir / 'label-studio-login.json'})")
            say(f"backend: {backend_url}   report: {backend_url}/report.html   "
                f"({'new' if project.created else 'existing'} project {project.id})")
            asked = time.monotonic()
            redis = redis_lib.Redis.from_url(redis_url)
            queued = queue_photos(redis, project.id, ls.task_images(project.id), env)
            say(f"{queued['tasks']} tasks: {queued['already_posted']} predicted already, "
                f"{queued['queued'] - queued['cached']} photos to embed, {queued['cached']} cached "
                f"(model version {queued['version']})")
            progress = Progress(ls, project.id, redis, folder, PipelineOptions(fallback=args.fallback),
                                waiting=queued["waiting"])
            done = progress.follow(stack, asked, args.exit_when_done, args.stall_timeout)
            if args.exit_when_done:
                say(progress.figures(asked, started))
                if done:
                    # The last post queues a refit over all faces: let it finish, or the next run
                    # starts with a half-done job that RQ can only retry.
                    drain(stack, redis, "subdisc", args.stall_timeout)
                return 0 if done else 1
    except KeyboardInterrupt:
        say("stopped: every process started by subdisc up has ended")
        return 130
    return 0


def drain(stack: Stack, redis: redis_lib.Redis, queue_name: str, timeout: float) -> None:
    """Wait until the workers have no queued or running job (at most `timeout` seconds)."""
    queue = Queue(queue_name, connection=redis)
    running = StartedJobRegistry(queue=queue)
    deadline, told = time.monotonic() + timeout, False
    while (left := queue.count + running.count) and time.monotonic() < deadline:
        if not told:
            say(f"waiting for the workers to finish {left} queued job(s) (the refit over all faces)")
            told = True
        stack.check_alive()
        time.sleep(1)


def say(text: str) -> None:
    print(text, flush=True)


def queue_photos(redis: redis_lib.Redis, project: int, images: dict, env: dict) -> dict:
    """Queue the project's tasks on the workers as the backend would (backend.predict_jobs), with
    the settings the backend and workers run with (`env`, on top of this process's environment)."""
    from backend import runtime
    from backend.model import SubdiscModel

    os.environ.update(env)
    model = SubdiscModel(redis, queue_name="subdisc", options=runtime.pipeline_options(),
                         batch_size=runtime.batch_size())
    return queue_tasks(model, project, images, label_config=default_config_xml())


class Progress:
    """Photos embedded (read from the Redis cache) and predictions posted: on the way, the tasks
    whose import Label Studio acknowledged (read from Redis: a queued task counts once the version
    it was posted with has changed, since a second run re-posts tasks that hold an older model's
    prediction); done once Label Studio itself counts every task with a real prediction and no
    placeholder among them, as a labeler sees them.

    Label Studio is asked only at the end (then every LS_EVERY s until it agrees): its filtered
    count takes ~1.5 s of its CPU at 7,000 tasks, and asking each second while the workers import
    made their imports wait. The photos are listed from disk, as the storage sync imported them:
    listing 7,000 tasks from Label Studio while it stores predictions in SQLite can take minutes.
    """

    #: Seconds between two counts asked of Label Studio once Redis says every task is posted.
    LS_EVERY = 5.0

    def __init__(self, ls: Provisioner, project: int, redis: redis_lib.Redis, folder: Path,
                 options: PipelineOptions, waiting: dict[str, str | None]):
        self.ls, self.project = ls, project
        self.cache = EmbeddingCache(redis, fingerprint(options))
        self.tasks = ls.count_tasks(project)
        self.pending: list[str] = []
        for path in image_files(folder):
            try:
                # The identity the backend computes for "/data/local-files/?d=..." under the root.
                self.pending.append(source_identity(str(path), FetchSettings()))
            except ImageError:
                pass   # gone since the sync: it will get no vector, and is not waited for
        self.photos = len(self.pending)
        self.embedded = 0
        self.faces = 0
        self.state = ProjectState(redis, project)
        self.waiting = dict(waiting)     # {task id: its posted version before this run}
        self.posted = 0
        self.confirmed = False      # Label Studio counted every task
        self.last_post = None
        self._asked = -math.inf

    def poll(self) -> tuple[int, int]:
        if self.pending:
            results = self.cache.lookup_many(self.pending)
            self.pending = [i for i, r in zip(self.pending, results) if r is None]
            done = [r for r in results if r is not None]
            self.embedded += len(done)
            self.faces += sum(len(r.faces) for r in done)
        if self.waiting:
            now = self.state.posted_versions(list(self.waiting))
            self.waiting = {t: v for t, v in self.waiting.items() if now[t] == v}
        posted = self.tasks - len(self.waiting)
        if posted >= self.tasks and time.monotonic() - self._asked >= self.LS_EVERY:
            self._asked = time.monotonic()
            posted = self.ls.count_predicted(self.project, PENDING_SUFFIX)
            self.confirmed = posted >= self.tasks
        elif posted >= self.tasks:
            posted = self.posted            # not confirmed yet: the last figure Label Studio gave
        if posted != self.posted:
            self.posted, self.last_post = posted, time.monotonic()
        return self.embedded, self.posted

    def line(self, since: float) -> str:
        return (f"photos embedded {self.embedded}/{self.photos}, faces {self.faces}, "
                f"predictions posted {self.posted}/{self.tasks}  ({time.monotonic() - since:.0f} s)")

    def follow(self, stack: Stack, asked: float, exit_when_done: bool, stall_timeout: float) -> bool:
        """Show progress until every task has a prediction (then return if exit_when_done)."""
        tty = sys.stdout.isatty()
        # A terminal gets one line rewritten in place; a log file a line every 10 s at most.
        every = 0 if tty else 10
        shown, moved, printed = None, time.monotonic(), 0.0
        while True:
            stack.check_alive()
            state = self.poll()
            complete = self.confirmed
            if state != shown:
                moved = time.monotonic()
            if complete or (state != shown and time.monotonic() - printed >= every):
                print(("\r" if tty else "") + self.line(asked), end="" if tty and not complete else "\n",
                      flush=True)
                shown, printed = state, time.monotonic()
            if complete:
                if exit_when_done:
                    return True
                say("every photo has a prediction: label away (Ctrl-C stops the stack)")
                while True:                      # keep serving until Ctrl-C
                    stack.check_alive()
                    time.sleep(2)
            if exit_when_done and time.monotonic() - moved > stall_timeout:
                say(f"\nno progress for {stall_timeout:.0f} s: "
                    f"{self.tasks - self.posted} tasks still have no prediction")
                return False
            time.sleep(1)

    def figures(self, asked: float, started: float) -> str:
        last = (self.last_post or time.monotonic()) - asked
        return (f"done: {self.photos} photos, {self.faces} faces, last prediction {last:.1f} s after "
                f"the project was ready ({time.monotonic() - started:.0f} s since start)")

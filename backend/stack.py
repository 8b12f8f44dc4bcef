"""A local labelling stack: redis-server, RQ workers, the backend and Label Studio, as child processes.

Each child runs in its own process group (so Ctrl-C in the terminal reaches only us, and stopping a
child also stops what it forked into that group: gunicorn's workers). RQ puts each work-horse in a
process group of its own, so `Stack.stop()` also ends the groups of the children's descendants,
found through /proc before the children can exit and orphan them. It ends exactly the processes it
started and their descendants, newest first, and nothing else; `with Stack(...)` makes that happen
on any exit.

Label Studio 1.23.2 pins old redis / rq / Django, so it lives in its own virtual environment, created
once and reused (`ensure_label_studio`).
"""
from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import redis as redis_lib
import requests

from backend.cli import CommandError

ROOT = Path(__file__).resolve().parents[1]
LABEL_STUDIO_VERSION = "1.23.2"
DEFAULT_LS_VENV = Path(os.environ.get("SUBDISC_LS_VENV",
                                      Path.home() / ".cache" / "subdisc" / "label-studio-venv"))


#: `subdisc` in this interpreter, installed or not (backend/cli.py's __main__ hands over to the
#: imported module, so CommandError stays one class and user errors stay one line).
SUBDISC = [sys.executable, "-m", "backend.cli"]


class StackError(CommandError):
    """A stack part that cannot start: a port in use, a failed install, a process that died."""


# --- the commands, shared with docker/ (tests/test_docker.py checks they agree) ------------------

def backend_args(host: str, port: int, workers: int) -> list[str]:
    """Arguments of `subdisc` that serve the backend (gunicorn inside)."""
    return ["serve", "--host", host, "--port", str(port), "--workers", str(workers)]


def worker_args(redis_url: str, queue: str) -> list[str]:
    """Arguments of `python -m workers.worker` (a standard `rq worker`)."""
    return ["--url", redis_url, queue]


#: Label Studio 1.23's own feature flag (data_import/api.py, off by default): with it an import of
#: predictions recounts the counters of the tasks it touched; without it, of every task in the
#: project. Measured on a project of 7,199 tasks, 5,200 predicted: 32 predictions in 0.05 s instead
#: of 5.0 s, 256 in 0.22 s instead of 5.0 s.
FAST_PREDICTION_IMPORT = "fflag_fix_back_4620_memory_efficient_predictions_import_08012025_short"


def label_studio_env(*, username: str, password: str, token: str, document_root: str | Path) -> dict:
    """What a headless Label Studio needs (../shared/docs/label-studio.md explains each one)."""
    return {
        "LABEL_STUDIO_USERNAME": username,
        "LABEL_STUDIO_PASSWORD": password,
        "LABEL_STUDIO_USER_TOKEN": token,
        # Without it "Authorization: Token ..." is refused (1.23 wants JWT by default).
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        # Otherwise a backend on 127.0.0.1 is refused as a "reserved network address".
        "ML_BLOCK_LOCAL_IP": "false",
        "SSRF_PROTECTION_ENABLED": "false",
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(document_root),
        "LATEST_VERSION_CHECK": "false",
        # Empty: no error reports to Label Studio's Sentry (it retries unreachable hosts every minute).
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
        FAST_PREDICTION_IMPORT: "true",
    }


# --- ports -------------------------------------------------------------------------------------

def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for tests and benchmarks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        if s.connect_ex((host, port)) == 0:
            return True
    # Nothing answers, but something may hold the port without listening yet: try to bind it
    # (SO_REUSEADDR, as servers do: connections of a stopped run in TIME_WAIT are no conflict).
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def check_ports(ports: dict[str, int]) -> None:
    """Raise a StackError naming every port already taken, before anything is started."""
    taken = [f"{name} port {port}" for name, port in ports.items() if port_in_use(port)]
    if len(set(ports.values())) < len(ports):
        raise StackError(f"two parts were given the same port: {ports}")
    if taken:
        raise StackError(f"{', '.join(taken)} already in use: stop what uses it or choose another "
                         "port (--ls-port, --backend-port, --redis-port)")


# --- Label Studio's own virtual environment --------------------------------------------------

def ensure_label_studio(venv_dir: str | Path = DEFAULT_LS_VENV, log=print) -> Path:
    """The `label-studio` executable of a venv holding label-studio==1.23.2, installed on first use.

    A marker file is written only after a complete install, so an interrupted one is redone; a lock
    keeps two runs (two test sessions) from installing into the same folder at once.
    """
    venv = Path(venv_dir).expanduser()
    exe, marker = venv / "bin" / "label-studio", venv / ".subdisc-installed"
    if exe.exists() and marker.exists() and marker.read_text().strip() == LABEL_STUDIO_VERSION:
        return exe
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if exe.exists() and marker.exists() and marker.read_text().strip() == LABEL_STUDIO_VERSION:
            return exe
        log(f"installing label-studio {LABEL_STUDIO_VERSION} into {venv} (once; a few minutes)")
        install_log = venv.parent / f"{venv.name}-install.log"
        with open(install_log, "w") as out:
            steps = [[sys.executable, "-m", "venv", "--clear", str(venv)],
                     [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
                      f"label-studio=={LABEL_STUDIO_VERSION}"]]
            for cmd in steps:
                if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                    raise StackError(f"could not install Label Studio ({' '.join(cmd[:4])} ...): "
                                     f"see {install_log}:\n{_tail(install_log)}")
        marker.write_text(LABEL_STUDIO_VERSION)
        return exe


# --- processes ---------------------------------------------------------------------------------

@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log: Path


class Stack:
    """Children started by this process, each in its own process group; `stop()` ends them all."""

    def __init__(self, log_dir: str | Path):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.children: list[Child] = []

    def __enter__(self) -> "Stack":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, name: str, cmd: list[str], env: dict | None = None,
              cwd: str | Path = ROOT) -> Child:
        log = self.log_dir / f"{name}.log"
        with open(log, "ab") as out:
            # start_new_session: its own process group, out of the terminal's Ctrl-C.
            proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **(env or {})},
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        child = Child(name, proc, log)
        self.children.append(child)
        return child

    def check_alive(self) -> None:
        for child in self.children:
            code = child.proc.poll()
            if code is not None:
                raise StackError(f"{child.name} stopped (exit code {code}); its log {child.log}:\n"
                                 f"{_tail(child.log)}")

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM every group we started (newest first), then SIGKILL what is left after `grace`."""
        children, self.children = list(reversed(self.children)), []
        # A second Ctrl-C must not cut the clean-up short and leave children behind.
        previous = _ignore_interrupts()
        try:
            self._stop(children, grace)
        finally:
            _restore_interrupts(previous)

    @staticmethod
    def _stop(children: list[Child], grace: float) -> None:
        # Descendants in groups of their own (RQ's work-horses): known now, while their parents
        # live; a horse orphaned by its worker's exit can no longer be traced to us.
        groups = {c.proc.pid: _descendant_groups(c.proc.pid) for c in children}
        for child in children:
            _signal_group(child.proc, signal.SIGTERM)   # a worker warm-stops: its horse finishes
        deadline = time.monotonic() + grace
        for child in children:
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                groups[child.proc.pid] |= _descendant_groups(child.proc.pid)
            # The leader may be gone while its group lives on (a work-horse, a gunicorn worker).
            _signal_group(child.proc, signal.SIGKILL)
            for pgid in groups[child.proc.pid]:
                _kill_group(pgid)
            try:
                child.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass

    # --- the parts -----------------------------------------------------------------------------

    def start_redis(self, port: int, data_dir: str | Path, timeout: float = 20) -> str:
        """redis-server on 127.0.0.1 with append-only persistence in data_dir; returns its URL."""
        exe = shutil.which("redis-server")
        if exe is None:
            raise StackError("redis-server is not installed (Debian: apt-get install redis-server)")
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        self.start("redis", [exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir),
                             "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""])
        url = f"redis://127.0.0.1:{port}/0"
        client = redis_lib.Redis.from_url(url)
        self._wait("redis", lambda: client.ping(), timeout)
        return url

    def start_workers(self, n: int, redis_url: str, queue: str, env: dict | None = None,
                      python: str = sys.executable) -> list[Child]:
        """n RQ workers; `python` may be another interpreter (another dlib build, for benchmarks).

        Numbered on from the workers already started, so each has its own log.
        """
        first = 1 + sum(c.name.startswith("worker-") for c in self.children)
        return [
            self.start(f"worker-{i}", [python, "-m", "workers.worker", *worker_args(redis_url, queue)],
                       env={"PYTHONPATH": str(ROOT), "SUBDISC_REDIS_URL": redis_url, **(env or {})})
            for i in range(first, first + n)
        ]

    def start_backend(self, port: int, env: dict, workers: int = 2, timeout: float = 60) -> str:
        """The backend under gunicorn (`subdisc serve`); returns its URL once /health answers."""
        self.start("backend", [*SUBDISC, *backend_args("127.0.0.1", port, workers)],
                   env={"PYTHONPATH": str(ROOT), **env})
        url = f"http://127.0.0.1:{port}"
        self._wait("backend", lambda: requests.get(f"{url}/health", timeout=2).raise_for_status(),
                   timeout)
        return url

    def start_label_studio(self, exe: str | Path, port: int, data_dir: str | Path, env: dict,
                           timeout: float = 600) -> str:
        """Label Studio, headless; returns its URL once /health answers (first start migrates)."""
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        self.start("label-studio", [str(exe), "start", "--no-browser", "--internal-host", "127.0.0.1",
                                     "--port", str(port), "--data-dir", str(data_dir)],
                   env=env, cwd=data_dir)
        url = f"http://127.0.0.1:{port}"
        self._wait("label-studio",
                   lambda: requests.get(f"{url}/health", timeout=5).raise_for_status(), timeout)
        return url

    def _wait(self, name: str, probe, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            try:
                probe()
                return
            except (redis_lib.ConnectionError, requests.RequestException) as exc:
                if time.monotonic() > deadline:
                    raise StackError(f"{name} did not answer within {timeout:.0f} s ({exc})") from None
            time.sleep(0.3)


def stop_on_sigterm() -> None:
    """Make SIGTERM end this process like Ctrl-C, so `with Stack(...)` still stops its children.

    (Python's default for SIGTERM exits at once, leaving every child running.)
    """
    signal.signal(signal.SIGTERM, _raise_interrupt)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _ignore_interrupts() -> dict:
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}


def _restore_interrupts(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _descendant_groups(pid: int) -> set[int]:
    """Process groups of `pid`'s descendants other than its own (Linux /proc; empty elsewhere)."""
    parents: dict[int, list[int]] = {}
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return set()
    for entry in entries:
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()   # the name may hold spaces and ")"
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = set(), list(parents.get(pid, []))
    while todo:
        p = todo.pop()
        try:
            found.add(os.getpgid(p))
        except OSError:
            continue
        todo.extend(parents.get(p, []))
    return found - {pid}


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)   # pgid == pid: each child leads its own session
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""

"""Faults of size and time, on real processes: a server trickling an image a byte at a time, and
requests with huge bodies (300 MB, with Content-Length or chunked) to the real gunicorn server.

    python -m pytest -m faults tests/faults/test_slow_and_big.py
"""
from __future__ import annotations

import base64
import io
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from workers.cache import EmbeddingCache
from workers.images import FetchSettings, ImageError, read_bytes, source_identity
from workers.jobs import embed_source
from workers.pipeline import PipelineOptions, fingerprint

from tests.backend.test_server import AUTH, serve

pytestmark = pytest.mark.faults

MB = 2**20


# --- a trickling server (issue 11, item 5) -------------------------------------------------------

class Trickle:
    """Serves a real JPEG one byte every `gap` seconds (each gap well under the read timeout), no
    Content-Length, for at most `lasts` seconds, then closes: what arrived is a cut file."""

    def __init__(self, gap: float = 0.25, lasts: float = 20.0):
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (10, 120, 200)).save(buf, "JPEG")
        body, self.served = buf.getvalue(), []
        trickle = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.end_headers()
                start, sent = time.monotonic(), 0
                try:
                    while sent < len(body) and time.monotonic() - start < lasts:
                        self.wfile.write(body[sent:sent + 1])
                        self.wfile.flush()
                        sent += 1
                        time.sleep(gap)
                except OSError:
                    pass                          # the client hung up
                trickle.served.append(sent)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/face.jpg"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def trickle():
    server = Trickle()
    yield server
    server.close()


def test_a_trickling_server_meets_the_download_deadline(trickle):
    settings = FetchSettings(allowed_hosts=("127.0.0.1",), timeout=2.0, deadline=2.0)
    started = time.monotonic()
    with pytest.raises(ImageError) as info:
        read_bytes(trickle.url, settings)
    took = time.monotonic() - started
    e = info.value
    assert e.kind == "unreachable" and e.transient and "deadline" in e.message
    # Cut at the deadline, far before the 20 s the server would trickle on for.
    assert took < 10, took


def test_the_deadline_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("SUBDISC_FETCH_DEADLINE", "7.5")
    assert FetchSettings.from_env().deadline == 7.5
    monkeypatch.setenv("SUBDISC_FETCH_DEADLINE", "soon")
    with pytest.raises(ValueError, match="SUBDISC_FETCH_DEADLINE"):
        FetchSettings.from_env()


def test_a_partial_download_is_not_cached_for_good(trickle, redis_conn):
    settings = FetchSettings(allowed_hosts=("127.0.0.1",), timeout=2.0, deadline=1.0)
    options = PipelineOptions()
    cache = EmbeddingCache(redis_conn, fingerprint(options))
    result, how = embed_source(trickle.url, options, settings, cache)
    assert how == "error" and result.error == "unreachable"   # never "truncated"
    key = cache._src(source_identity(trickle.url, settings))
    # Remembered only for a while (a transient error), so a later job tries the host again.
    assert redis_conn.exists(key) and 0 < redis_conn.ttl(key) <= 600


# --- huge bodies on any method (item 3) ----------------------------------------------------------

def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def send_huge(url: str, method: str, path: str, size: int, chunked: bool) -> bytes:
    """Send a `size`-byte body (until the server hangs up); the response's first bytes, if any."""
    host, port = url.split("//")[1].split(":")
    auth = base64.b64encode(":".join(AUTH).encode()).decode()
    head = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Authorization: Basic {auth}",
            "Content-Type: application/json"]
    head.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}")
    block = b"x" * MB
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        try:
            for _ in range(size // MB):
                s.sendall(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
            if chunked:
                s.sendall(b"0\r\n\r\n")
        except OSError:
            pass                                   # refused early: the server closed on us
        try:
            return s.recv(4096)
        except OSError:
            return b""


@pytest.mark.parametrize("method, path", [("GET", "/health"), ("GET", "/report"),
                                          ("DELETE", "/health"), ("POST", "/webhook")])
def test_a_huge_body_is_never_read_into_memory(redis_url, method, path):
    with serve(redis_url, SUBDISC_MAX_BODY_MB="64") as backend:
        master = _master_pid(backend)
        workers = []
        for _ in range(50):
            workers = [p for p in children(master) if rss_mb(p) > 0]
            if workers:
                break
            time.sleep(0.1)
        assert workers, "no gunicorn worker found"
        before = max(rss_mb(p) for p in workers)
        peak = {"rss": before}
        done = threading.Event()

        def sample():
            while not done.is_set():
                for p in workers:
                    try:
                        peak["rss"] = max(peak["rss"], rss_mb(p))
                    except OSError:
                        pass
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        answers = []
        try:
            for chunked in (False, True):
                answers.append(send_huge(backend.url, method, path, 300 * MB, chunked))
        finally:
            done.set()
            sampler.join()
        grown = peak["rss"] - before
        firsts = [a.split(b"\r\n", 1)[0] for a in answers]
        print(f"{method} {path}: worker RSS {before:.0f} MB -> peak {peak['rss']:.0f} MB, "
              f"answers {firsts}")
        assert grown < 40, f"the worker grew by {grown:.0f} MB"
        for answer in answers:
            if answer:                              # a reset may swallow the answer: memory is the point
                assert answer.split(b" ", 2)[1] in (b"411", b"413"), answer[:200]
        assert backend.get("/health").status_code == 200        # and it still serves


def _master_pid(backend) -> int:
    """The gunicorn master serving backend.url (`subdisc serve` execs it)."""
    bind = backend.url.split("//")[1].encode()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"gunicorn" in cmdline and bind in cmdline:
                return int(entry)
    raise AssertionError(f"no gunicorn master bound to {bind!r}")

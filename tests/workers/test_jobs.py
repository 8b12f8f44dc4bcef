"""Jobs, cache and client together: real Redis, real `rq worker` processes, real files."""
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from workers.cache import EmbeddingCache
from workers.client import embed
from workers.images import FetchSettings, source_identity
from workers.jobs import embed_batch
from workers.pipeline import MAX_CHIPS_PER_RUN, PipelineOptions, fingerprint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUEUE = "subdisc-test"


@pytest.fixture
def photos(tmp_path, astronaut_face):
    """Distinct one-face photos (different bytes): crops and brightness of the astronaut."""
    def make(n):
        paths = []
        for i in range(n):
            img = astronaut_face[i % 7: 230 - (i % 5), (i % 3) * 4:]
            img = np.clip(img.astype(int) + (i // 7) * 5, 0, 255).astype(np.uint8)
            path = tmp_path / f"face{i:02d}.jpg"
            Image.fromarray(np.ascontiguousarray(img)).save(path, quality=92)
            paths.append(str(path))
        return paths
    return make


def test_a_batch_goes_on_past_bad_images(tmp_path, redis_conn, photos):
    good = photos(2)
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_bytes(b"this is not an image at all" * 10)
    whole = (tmp_path / "face00.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    sources = [good[0], str(tmp_path / "missing.jpg"), str(tmp_path / "empty.jpg"),
               str(tmp_path / "text.jpg"), str(tmp_path / "cut.jpg"), good[1]]
    summary = embed_batch(sources, redis=redis_conn)
    assert summary["images"] == 6 and summary["computed"] == 2 and summary["faces"] == 2
    assert summary["errors"] == {"not_found": 1, "empty": 1, "not_image": 1, "truncated": 1}

    results = embed(sources, redis=redis_conn, inline=True, progress=False)
    assert [r.error for r in results.values()] == [None, "not_found", "empty", "not_image",
                                                   "truncated", None]
    assert all(r.message for r in results.values() if not r.ok)
    assert results.summary["hits"] == 2 and results.summary["computed"] == 0


class CountingServer:
    """A real HTTP server on 127.0.0.1 that serves one path and counts the requests."""

    def __init__(self):
        self.body, self.status, self.requests = b"", 404, 0
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                owner.requests += 1
                self.send_response(owner.status)
                self.send_header("Content-Length", str(len(owner.body)))
                self.end_headers()
                self.wfile.write(owner.body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/photo.jpg"

    def close(self):
        self.httpd.shutdown()


def test_errors_are_cached_and_retried_only_on_request(redis_conn, photos):
    server = CountingServer()
    try:
        fetch = FetchSettings(allowed_hosts=("127.0.0.1",))
        first = embed([server.url], redis=redis_conn, inline=True, progress=False, fetch=fetch)
        assert first[server.url].error == "not_found" and server.requests == 1

        with open(photos(1)[0], "rb") as f:
            server.body, server.status = f.read(), 200
        again = embed([server.url], redis=redis_conn, inline=True, progress=False, fetch=fetch)
        assert again[server.url].error == "not_found" and server.requests == 1  # not re-read

        retried = embed([server.url], redis=redis_conn, inline=True, progress=False, fetch=fetch,
                        retry_errors=True)
        assert retried[server.url].ok and len(retried[server.url].faces) == 1
        assert server.requests == 2
    finally:
        server.close()


def test_renamed_copy_is_a_cache_hit(tmp_path, redis_conn, photos):
    original = photos(1)[0]
    first = embed([original], redis=redis_conn, inline=True, progress=False)
    assert first.summary["computed"] == 1
    copy = tmp_path / "renamed" / "another name.jpg"
    copy.parent.mkdir()
    shutil.copy(original, copy)
    second = embed([str(copy)], redis=redis_conn, inline=True, progress=False)
    assert second.summary == {**second.summary, "hits": 1, "computed": 0}
    assert np.array_equal(second[str(copy)].vectors(), first[original].vectors())


def test_option_change_is_a_cache_miss(redis_conn, photos):
    path = photos(1)[0]
    embed([path], redis=redis_conn, inline=True, progress=False)
    changed = embed([path], redis=redis_conn, inline=True, progress=False,
                    options=PipelineOptions(upsample=0))
    assert changed.summary["computed"] == 1 and changed.summary["hits"] == 0
    keys = {k.decode().split(":")[3] for k in redis_conn.scan_iter("subdisc:v1:emb:*")}
    assert keys == {fingerprint(PipelineOptions()), fingerprint(PipelineOptions(upsample=0))}


def test_vectors_are_stored_as_binary(redis_conn, photos):
    path = photos(1)[0]
    result = embed([path], redis=redis_conn, inline=True, progress=False)[path]
    (key,) = list(redis_conn.scan_iter("subdisc:v1:emb:*"))
    stored = redis_conn.get(key)
    assert result.faces[0].vector.tobytes() in stored  # raw float32, not JSON text
    assert result.faces[0].views["eyes"].tobytes() in stored
    assert len(stored) < 5000   # 128 + 256 + 3 x 192 floats and 68 landmarks


def test_exif_rotation_puts_the_box_on_the_face(tmp_path, redis_conn, astronaut_face):
    upright = get_box(redis_conn, tmp_path / "upright.jpg", Image.fromarray(astronaut_face), None)
    # Stored sideways with Orientation=6 ("rotate 90 clockwise to view"): viewers show it upright.
    sideways = Image.fromarray(astronaut_face).transpose(Image.Transpose.ROTATE_90)
    rotated = get_box(redis_conn, tmp_path / "sideways.jpg", sideways, 6)
    assert np.allclose(rotated, upright, atol=6)


def get_box(redis_conn, path, image, orientation):
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    image.save(path, quality=95, exif=exif)
    result = embed([str(path)], redis=redis_conn, inline=True, progress=False)[str(path)]
    assert len(result.faces) == 1, result
    return np.array(result.faces[0].box)


def test_rq_workers_embed_a_folder_and_export(tmp_path, redis_conn, rq_workers, photos):
    paths = photos(10)
    rq_workers.start(2)
    results = embed(paths, redis=redis_conn, queue_name=QUEUE, batch_size=3, progress=False,
                    timeout=300)
    assert results.summary["computed"] == 10 and results.summary["faces"] == 10
    assert all(len(r.faces) == 1 for r in results.values())

    out = tmp_path / "out"
    cli = [sys.executable, "-m", "backend.cli", "embed", *paths[:4], str(tmp_path / "nope.png"),
           "--redis", rq_workers.redis_url, "--queue", QUEUE, "--json"]
    env = dict(os.environ, PYTHONPATH=ROOT)
    for suffix in ("npz", "jsonl"):
        done = subprocess.run([*cli, "--out", str(out / f"faces.{suffix}")], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout)
        assert summary["images"] == 5 and summary["hits"] == 4 and summary["computed"] == 0
        assert summary["errors"] == {"not_found": 1}

    data = np.load(out / "faces.npz")
    assert data["vectors"].shape == (4, 128) and data["landmarks"].shape == (4, 68, 2)
    assert data["views_pooled"].shape == (4, 256) and data["views_mouth"].shape == (4, 192)
    assert np.array_equal(data["views_eyes"][1], results[paths[1]].faces[0].views["eyes"])
    assert list(data["source"]) == paths[:4] and list(data["found_by"]) == ["hog"] * 4
    assert np.array_equal(data["vectors"][0], results[paths[0]].faces[0].vector)
    assert list(data["error_kind"]) == ["not_found"]
    lines = [json.loads(line) for line in (out / "faces.jsonl").read_text().splitlines()]
    assert [line["source"] for line in lines][:4] == paths[:4]
    assert len(lines[0]["faces"][0]["vector"]) == 128 and lines[4]["error"] == "not_found"


def test_without_workers_every_image_is_reported_not_dropped(redis_conn, photos):
    paths = photos(3)
    results = embed(paths, redis=redis_conn, queue_name=QUEUE, progress=False, timeout=1)
    assert [r.error for r in results.values()] == ["job_failed"] * 3
    assert all("timed out" in r.message for r in results.values())


def _children(pid):
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def _run_killing(redis_conn, rq_workers, paths, kill):
    """Embed `paths` as one batch on one worker; call kill(worker) once a few are cached."""
    cache = EmbeddingCache(redis_conn, fingerprint(PipelineOptions()))
    identities = [source_identity(p, FetchSettings()) for p in paths]
    (worker,) = rq_workers.start(1)
    box = {}
    thread = threading.Thread(target=lambda: box.update(results=embed(
        paths, redis=redis_conn, queue_name=QUEUE, batch_size=len(paths), progress=False,
        timeout=400)))
    thread.start()
    deadline = time.monotonic() + 120
    while sum(r is not None for r in cache.lookup_many(identities)) < 3:
        assert time.monotonic() < deadline, rq_workers.output()
        time.sleep(0.02)
    done_before = sum(r is not None for r in cache.lookup_many(identities))
    kill(worker)
    thread.join(500)
    return box["results"], done_before


def test_a_killed_work_horse_loses_nothing(redis_conn, rq_workers, photos):
    paths = photos(3 * MAX_CHIPS_PER_RUN)   # the job caches after each descriptor run

    def kill_horse(worker):
        (horse,) = _children(worker.pid)
        os.kill(horse, signal.SIGKILL)  # as the kernel's OOM killer would

    results, done_before = _run_killing(redis_conn, rq_workers, paths, kill_horse)
    assert done_before < len(paths)
    assert list(results) == paths and all(len(r.faces) == 1 for r in results.values())
    # the retried job found the photos finished before the kill in the cache: none done twice
    assert results.summary["hits"] >= done_before
    assert results.summary["hits"] + results.summary["computed"] == len(paths)


def test_a_worker_killed_outright_loses_nothing(redis_conn, rq_workers, photos):
    paths = photos(3 * MAX_CHIPS_PER_RUN)

    def kill_worker(worker):
        # The work-horse runs in a session of its own: kill it and its parent, leaving no one to
        # clean up or report the job.
        for pid in [*_children(worker.pid), worker.pid]:
            os.kill(pid, signal.SIGKILL)
        rq_workers.start(1)  # another worker takes over once the dead one's heartbeat expires

    results, done_before = _run_killing(redis_conn, rq_workers, paths, kill_worker)
    assert list(results) == paths and all(len(r.faces) == 1 for r in results.values())
    assert results.summary["hits"] >= done_before
    assert results.summary["hits"] + results.summary["computed"] == len(paths)

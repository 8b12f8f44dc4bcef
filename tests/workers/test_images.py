"""workers.images: reading image sources and decoding them, on real files and a real HTTP server."""
from __future__ import annotations

import gzip
import json
import os
import socket
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image

from workers.images import (ERROR_KINDS, FetchSettings, ImageError, decode, load, read_bytes,
                            source_identity)
from tests.support import free_port


def mad(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two same-shaped uint8 arrays."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def as_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[:, :, None], 3, axis=2)


def save(img: Image.Image, path, fmt: str, **kw) -> bytes:
    img.save(path, fmt, **kw)
    return path.read_bytes()


def stored(path) -> tuple[str, int]:
    """(mode, frame count) of an image file as Pillow reads it back."""
    with Image.open(path) as im:
        return im.mode, getattr(im, "n_frames", 1)


def expect_error(kind: str, fn, *args) -> ImageError:
    with pytest.raises(ImageError) as info:
        fn(*args)
    assert info.value.kind == kind, info.value.message
    assert info.value.message
    return info.value


@pytest.fixture(scope="module")
def face_img(astronaut_face) -> Image.Image:
    return Image.fromarray(astronaut_face)


@pytest.fixture(scope="module")
def grey(face_img) -> np.ndarray:
    return np.asarray(face_img.convert("L"))


@pytest.fixture(scope="module")
def png_bytes(face_img, tmp_path_factory) -> bytes:
    return save(face_img, tmp_path_factory.mktemp("png") / "face.png", "PNG")


# --- formats and modes -------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, options, tolerance", [
    ("JPEG", {"quality": 95}, 4.0),
    ("PNG", {}, 0.0),
    ("GIF", {}, 12.0),        # 256-colour palette
    ("WEBP", {"quality": 90}, 5.0),
    ("BMP", {}, 0.0),
    ("TIFF", {}, 0.0),
])
def test_formats_decode_to_rgb(fmt, options, tolerance, face_img, astronaut_face, tmp_path):
    data = save(face_img, tmp_path / f"face.{fmt.lower()}", fmt, **options)
    rgb = decode(data)
    assert rgb.shape == astronaut_face.shape and rgb.dtype == np.uint8
    assert mad(rgb, astronaut_face) <= tolerance


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animation_gives_first_frame(fmt, face_img, astronaut_face, tmp_path):
    black = Image.new("RGB", face_img.size)
    data = save(face_img, tmp_path / f"anim.{fmt.lower()}", fmt, save_all=True,
                append_images=[black], duration=100, loop=0)
    assert stored(tmp_path / f"anim.{fmt.lower()}")[1] == 2
    rgb = decode(data)
    assert rgb.shape == astronaut_face.shape
    assert mad(rgb, astronaut_face) < 12.0


def test_grey_L(face_img, grey, tmp_path):
    rgb = decode(save(face_img.convert("L"), tmp_path / "l.png", "PNG"))
    assert rgb.shape == grey.shape + (3,) and rgb.dtype == np.uint8
    assert mad(rgb, as_rgb(grey)) == 0


def test_grey_with_alpha_LA(face_img, grey, tmp_path):
    la = face_img.convert("LA")
    rgb = decode(save(la, tmp_path / "la.png", "PNG"))
    assert mad(rgb, as_rgb(grey)) == 0


def test_rgba_composited_on_white(face_img, astronaut_face, tmp_path):
    alpha = np.full(astronaut_face.shape[:2], 255, np.uint8)
    alpha[:50, :50] = 0                                   # a fully transparent corner
    rgba = Image.fromarray(np.dstack([astronaut_face, alpha]), "RGBA")
    rgb = decode(save(rgba, tmp_path / "rgba.png", "PNG"))
    assert (rgb[:50, :50] == 255).all()
    assert mad(rgb[50:, 50:], astronaut_face[50:, 50:]) == 0


def test_palette_P(face_img, astronaut_face, tmp_path):
    rgb = decode(save(face_img.quantize(256), tmp_path / "p.png", "PNG"))
    assert rgb.shape == astronaut_face.shape
    assert mad(rgb, astronaut_face) < 8.0


def test_palette_with_transparency_is_white(face_img, tmp_path):
    p = face_img.quantize(255)
    pixels = np.array(p)
    pixels[:40, :40] = 255                                # the unused index, made transparent
    q = Image.fromarray(pixels, "P")
    q.putpalette(p.getpalette() + [0, 0, 0])           # 256 entries, the last one black
    rgb = decode(save(q, tmp_path / "pt.png", "PNG", transparency=255))
    assert (rgb[:40, :40] == 255).all()


def test_cmyk_jpeg(face_img, astronaut_face, tmp_path):
    data = save(face_img.convert("CMYK"), tmp_path / "cmyk.jpg", "JPEG", quality=95)
    assert stored(tmp_path / "cmyk.jpg")[0] == "CMYK"
    rgb = decode(data)
    assert rgb.shape == astronaut_face.shape
    assert mad(rgb, astronaut_face) < 6.0


def test_16_bit_png(grey, tmp_path):
    wide = Image.fromarray(grey.astype(np.uint16) * 257)            # full 16-bit range
    data = save(wide, tmp_path / "i16.png", "PNG")
    assert stored(tmp_path / "i16.png")[0].startswith("I")
    assert mad(decode(data), as_rgb(grey)) < 1.0


def test_dim_16_bit_is_not_clipped_to_white(grey, tmp_path):
    dim = Image.fromarray(grey.astype(np.uint16) * 16)               # a 12-bit sensor's range
    rgb = decode(save(dim, tmp_path / "dim.png", "PNG"))
    assert rgb.min() == 0 and rgb.max() == 255
    assert mad(rgb, as_rgb(grey)) < 1.0


def test_bilevel_1(face_img, tmp_path):
    bw = face_img.convert("1")
    rgb = decode(save(bw, tmp_path / "bw.png", "PNG"))
    assert mad(rgb, as_rgb(np.asarray(bw.convert("L")))) == 0


def test_float_F(grey, tmp_path):
    f = Image.fromarray(grey.astype(np.float32) / 255.0, "F")
    rgb = decode(save(f, tmp_path / "f.tif", "TIFF"))
    assert mad(rgb, as_rgb(grey)) < 1.0


@pytest.mark.parametrize("orientation, stored_as", [
    (6, Image.Transpose.ROTATE_90),    # Orientation 6: the viewer turns it 90 degrees clockwise
    (8, Image.Transpose.ROTATE_270),
])
def test_exif_orientation_applied(orientation, stored_as, face_img, astronaut_face, tmp_path):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = save(face_img.transpose(stored_as), tmp_path / "rot.jpg", "JPEG", quality=95, exif=exif)
    rgb = decode(data)
    assert rgb.shape == astronaut_face.shape        # 240x230, not 230x240
    assert mad(rgb, astronaut_face) < 4.0


def test_load_returns_bytes_and_pixels(png_bytes, astronaut_face, tmp_path):
    (tmp_path / "face.png").write_bytes(png_bytes)
    data, rgb = load(str(tmp_path / "face.png"), FetchSettings())
    assert data == png_bytes and mad(rgb, astronaut_face) == 0


def test_file_url_with_escaped_name(png_bytes, tmp_path):
    path = tmp_path / "my face.png"
    path.write_bytes(png_bytes)
    assert read_bytes("file://" + quote(str(path)), FetchSettings()) == png_bytes


# --- bad input ---------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    e = expect_error("not_found", read_bytes, str(tmp_path / "nope.jpg"), FetchSettings())
    assert not e.transient


def test_zero_bytes(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    expect_error("empty", read_bytes, str(tmp_path / "empty.jpg"), FetchSettings())
    expect_error("empty", decode, b"")


def test_random_bytes_are_not_an_image():
    expect_error("not_image", decode, np.random.default_rng(0).bytes(5000))


def test_truncated_jpeg(face_img, tmp_path):
    data = save(face_img, tmp_path / "face.jpg", "JPEG")
    expect_error("truncated", decode, data[: len(data) // 2])


def test_truncated_png_and_webp(face_img, png_bytes, tmp_path):
    expect_error("truncated", decode, png_bytes[: len(png_bytes) // 2])
    webp = save(face_img, tmp_path / "face.webp", "WEBP")
    expect_error("truncated", decode, webp[: len(webp) // 2])


def png_declaring(width: int, height: int) -> bytes:
    """A ~60-byte PNG whose header claims width x height RGB pixels."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def test_decompression_bomb_refused_before_decoding():
    start = time.perf_counter()
    for w, h in ((50_000, 50_000), (8_000, 6_000)):     # 7.5 GB and 144 MB of RGB if decoded
        bomb = png_declaring(w, h)
        assert len(bomb) < 100
        e = expect_error("too_many_pixels", decode, bomb, FetchSettings())
    assert time.perf_counter() - start < 1.0
    assert "8000x6000" in e.message                       # our limit (40M), below Pillow's own


def test_pillow_bomb_guards_map_to_too_many_pixels():
    lenient = FetchSettings(max_pixels=10**12)
    expect_error("too_many_pixels", decode, png_declaring(50_000, 50_000), lenient)   # Pillow's error
    expect_error("too_many_pixels", decode, png_declaring(10_000, 10_000), lenient)   # its warning


def test_max_pixels_setting(png_bytes):
    expect_error("too_many_pixels", decode, png_bytes, FetchSettings(max_pixels=1000))


def test_file_over_max_bytes(png_bytes, tmp_path):
    (tmp_path / "face.png").write_bytes(png_bytes)
    source = str(tmp_path / "face.png")
    expect_error("too_large", read_bytes, source, FetchSettings(max_bytes=len(png_bytes) - 1))
    assert read_bytes(source, FetchSettings(max_bytes=len(png_bytes))) == png_bytes


def test_closed_port_is_unreachable_and_transient():
    url = f"http://127.0.0.1:{free_port()}/face.png"
    e = expect_error("unreachable", read_bytes, url, FetchSettings(allowed_hosts=("127.0.0.1",)))
    assert e.transient


def test_silent_server_times_out_as_unreachable():
    with socket.socket() as listener:                     # accepts connections, never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/face.png"
        settings = FetchSettings(allowed_hosts=("*",), timeout=0.5)
        start = time.perf_counter()
        e = expect_error("unreachable", read_bytes, url, settings)
        assert e.transient and time.perf_counter() - start < 5


def test_host_not_allowed():
    e = expect_error("forbidden_host", read_bytes, "http://example.invalid/face.png",
                     FetchSettings(label_studio_url="http://127.0.0.1:8080"))
    assert not e.transient


def test_local_files_escaping_root(png_bytes, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "secret.png").write_bytes(png_bytes)
    settings = FetchSettings(local_files_root=str(root))
    for source in ("/data/local-files/?d=../secret.png",
                   "/data/local-files/?d=" + quote(str(tmp_path / "secret.png"), safe="")):
        e = expect_error("unreadable", read_bytes, source, settings)
        assert "outside" in e.message


def test_unsupported_scheme():
    expect_error("unreadable", read_bytes, "s3://bucket/face.png", FetchSettings())


# --- local files root --------------------------------------------------------------------------

def test_local_files_read_from_disk(png_bytes, tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a b.png").write_bytes(png_bytes)
    # The Label Studio URL points at a closed port: these must not touch the network.
    settings = FetchSettings(local_files_root=str(tmp_path),
                             label_studio_url=f"http://127.0.0.1:{free_port()}")
    for source in ("/data/local-files/?d=photos/a%20b.png",
                   "/data/local-files/?d=photos%2Fa+b.png",
                   f"{settings.label_studio_url}/data/local-files/?d=photos/a%20b.png"):
        assert read_bytes(source, settings) == png_bytes, source
    expect_error("not_found", read_bytes, "/data/local-files/?d=photos/missing.png", settings)


def test_relative_label_studio_url_needs_a_base():
    expect_error("unreadable", read_bytes, "/data/upload/1/face.png", FetchSettings())


# --- source identity ---------------------------------------------------------------------------

def test_source_identity_of_files_follows_edits(png_bytes, tmp_path):
    path = tmp_path / "face.png"
    path.write_bytes(png_bytes)
    settings = FetchSettings(local_files_root=str(tmp_path))
    first = source_identity(str(path), settings)
    assert first.startswith(f"file:{path}:")
    assert source_identity(f"file://{path}", settings) == first
    assert source_identity("/data/local-files/?d=face.png", settings) == first
    assert source_identity(str(path), settings) == first              # stable while unchanged

    path.write_bytes(png_bytes + b"\0")
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))   # even on coarse clocks
    assert source_identity(str(path), settings) != first

    expect_error("not_found", source_identity, str(tmp_path / "gone.png"), settings)


def test_source_identity_of_urls():
    settings = FetchSettings(label_studio_url="http://LS.example:8080/")
    assert source_identity("/data/upload/3/face.png", settings) == \
        "http://ls.example:8080/data/upload/3/face.png"
    assert source_identity("HTTPS://Img.Example/a/B.jpg?x=1#frag", settings) == \
        "https://img.example/a/B.jpg?x=1"


# --- HTTP --------------------------------------------------------------------------------------

class Server:
    """A real HTTP server on 127.0.0.1 that serves one image and records each request's headers."""

    def __init__(self, image: bytes):
        self.image, self.requests = image, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append((self.headers.get("Host"), self.path,
                                        self.headers.get("Authorization")))
                path = self.path.split("?")[0]
                if path.startswith(("/redirect/", "/data/redirect/")):  # [/data]/redirect/<host>/<path>
                    host, rest = path.split("/redirect/", 1)[1].split("/", 1)
                    self.send_response(302)
                    self.send_header("Location", f"http://{host}:{server.port}/{rest}")
                    self.end_headers()
                elif path.startswith(("/data/upload/", "/data/local-files/", "/img/")):
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(server.image)))
                    self.end_headers()
                    self.wfile.write(server.image)
                elif path == "/unsized":                                # no Content-Length
                    self.send_response(200)
                    self.end_headers()
                    self.wfile.write(server.image)
                elif path == "/gzip":
                    body = gzip.compress(server.image)
                    self.send_response(200)
                    self.send_header("Content-Encoding", "gzip")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                elif path == "/cut":                                    # promises more than it sends
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(server.image)))
                    self.end_headers()
                    self.wfile.write(server.image[:1000])
                elif path == "/secret":
                    self.send_error(401)
                elif path == "/boom":
                    self.send_error(503)
                else:
                    self.send_error(404)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def auth_by_path(self) -> dict:
        return {path: auth for _, path, auth in self.requests}

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(png_bytes):
    s = Server(png_bytes)
    yield s
    s.close()


@pytest.fixture
def ls_settings(server) -> FetchSettings:
    # "localhost" is the same server under another name: an allowed host that is not Label Studio.
    return FetchSettings(label_studio_url=server.url, label_studio_token="s3cret",
                         allowed_hosts=("localhost",))


def test_token_goes_to_label_studio_only(server, ls_settings, png_bytes):
    assert read_bytes("/data/upload/1/face.png", ls_settings) == png_bytes
    assert read_bytes(f"http://localhost:{server.port}/img/face.png", ls_settings) == png_bytes
    auth = server.auth_by_path()
    assert auth["/data/upload/1/face.png"] == "Token s3cret"
    assert auth["/img/face.png"] is None


def test_redirect_away_from_label_studio_drops_the_token(server, ls_settings, png_bytes):
    assert read_bytes(f"{server.url}/data/redirect/localhost/img/face.png", ls_settings) == png_bytes
    auth = server.auth_by_path()
    assert auth["/data/redirect/localhost/img/face.png"] == "Token s3cret"
    assert auth["/img/face.png"] is None


def test_label_studio_paths_outside_data_get_no_token(server, ls_settings, png_bytes):
    # A task naming Label Studio's own API by an absolute URL: fetched (an allowed host) without the
    # token, so it reads nothing a labeler's token could; /data/ reached through ".." likewise.
    expect_error("not_found", read_bytes, f"{server.url}/api/projects/", ls_settings)
    expect_error("not_found", read_bytes, f"{server.url}/data/../api/projects/", ls_settings)
    # (this stand-in serves its image for any /data/upload/ path; what matters is the header)
    read_bytes(f"{server.url}/data/upload/%2e%2e/%2e%2e/api/projects/", ls_settings)
    assert all(auth is None for _, path, auth in server.requests), server.requests
    assert read_bytes(f"{server.url}/data/upload/1/face.png", ls_settings) == png_bytes
    assert server.requests[-1][2] == "Token s3cret"
    # Label Studio served below a path: its /data/ is below that path.
    sub = FetchSettings(label_studio_url=f"{server.url}/ls", label_studio_token="s3cret")
    expect_error("not_found", read_bytes, f"{server.url}/ls/api/x", sub)
    assert server.requests[-1][2] is None


def test_redirect_to_a_host_not_allowed(server, ls_settings):
    only_ls = FetchSettings(label_studio_url=server.url, label_studio_token="s3cret")
    expect_error("forbidden_host", read_bytes, f"{server.url}/redirect/localhost/img/face.png", only_ls)
    assert [path for _, path, _ in server.requests] == ["/redirect/localhost/img/face.png"]


def test_local_files_without_root_go_through_label_studio(server, ls_settings, png_bytes):
    assert read_bytes("/data/local-files/?d=photos/face.png", ls_settings) == png_bytes
    assert server.requests[-1][2] == "Token s3cret"


def test_http_404_is_not_found(server, ls_settings):
    e = expect_error("not_found", read_bytes, f"{server.url}/nothing-here.png", ls_settings)
    assert not e.transient


def test_http_401_is_unreadable_and_mentions_the_token(server, ls_settings):
    e = expect_error("unreadable", read_bytes, f"{server.url}/secret", ls_settings)
    assert "LABEL_STUDIO_API_KEY" in e.message and not e.transient


def test_http_5xx_is_transient(server, ls_settings):
    assert expect_error("unreachable", read_bytes, f"{server.url}/boom", ls_settings).transient


def test_http_over_max_bytes(server, png_bytes):
    small = FetchSettings(label_studio_url=server.url, max_bytes=len(png_bytes) - 1)
    expect_error("too_large", read_bytes, f"{server.url}/img/face.png", small)   # Content-Length
    expect_error("too_large", read_bytes, f"{server.url}/unsized", small)       # counted while streaming
    exact = FetchSettings(label_studio_url=server.url, max_bytes=len(png_bytes))
    assert read_bytes(f"{server.url}/unsized", exact) == png_bytes


def test_http_gzip_body_is_decoded(server, ls_settings, png_bytes):
    assert read_bytes(f"{server.url}/gzip", ls_settings) == png_bytes


def test_http_body_cut_short_is_transient(server, ls_settings):
    assert expect_error("unreachable", read_bytes, f"{server.url}/cut", ls_settings).transient


def test_http_load_decodes(server, ls_settings, astronaut_face):
    data, rgb = load("/data/upload/1/face.png", ls_settings)
    assert mad(rgb, astronaut_face) == 0


# --- settings and errors -----------------------------------------------------------------------

def test_settings_from_env_and_overrides(monkeypatch, tmp_path):
    for name in ("SUBDISC_LOCAL_FILES_ROOT", "SUBDISC_MAX_PIXELS", "SUBDISC_EXTRA_ROOTS",
                 "SUBDISC_FETCH_DEADLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", str(tmp_path))
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://ls:8080")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "key")
    monkeypatch.setenv("SUBDISC_ALLOWED_HOSTS", " images.example , CDN.example,")
    monkeypatch.setenv("SUBDISC_MAX_BYTES", "1000")
    s = FetchSettings.from_env(label_studio_url="http://other:9090", timeout=None)
    assert s == FetchSettings(local_files_root=str(tmp_path), label_studio_url="http://other:9090",
                              label_studio_token="key",
                              allowed_hosts=("images.example", "cdn.example"), max_bytes=1000)
    monkeypatch.setenv("SUBDISC_LOCAL_FILES_ROOT", "/elsewhere")
    assert FetchSettings.from_env().local_files_root == "/elsewhere"


def test_settings_travel_as_json():
    s = FetchSettings(local_files_root="/srv", label_studio_url="http://ls:8080",
                      label_studio_token="t", allowed_hosts=("a.example",), max_bytes=10,
                      max_pixels=20, timeout=3.0)
    assert FetchSettings.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert FetchSettings.from_dict({"timeout": 2.0, "added_later": 1}) == FetchSettings(timeout=2.0)


def test_a_job_from_a_newer_version_still_runs(monkeypatch):
    """Jobs hand their settings and options to from_env / from_dict: a key added later is dropped."""
    from workers.pipeline import PipelineOptions

    for name in ("SUBDISC_LOCAL_FILES_ROOT", "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", "LABEL_STUDIO_URL",
                 "LABEL_STUDIO_API_KEY", "SUBDISC_ALLOWED_HOSTS", "SUBDISC_MAX_BYTES", "SUBDISC_MAX_PIXELS",
                 "SUBDISC_EXTRA_ROOTS", "SUBDISC_FETCH_DEADLINE"):
        monkeypatch.delenv(name, raising=False)
    assert FetchSettings.from_env(timeout=2.0, added_later=1) == FetchSettings(timeout=2.0)
    assert PipelineOptions.from_dict({"detector": "cnn", "added_later": 1}) == PipelineOptions(detector="cnn")


def test_image_error_is_typed():
    e = ImageError("empty", "nothing there")
    assert (e.kind, e.message, e.transient) == ("empty", "nothing there", False)
    assert set(ERROR_KINDS) >= {"not_found", "unreachable", "truncated"}
    with pytest.raises(ValueError):
        ImageError("bogus", "x")


# --- task input: local reads only under the configured roots (issue 11, item 2) -----------------

@pytest.fixture
def disk(tmp_path, png_bytes):
    """A root with a photo, an extra root, and around them what a task must not reach: a photo
    outside every root, a symlink and a ".." leading out, a FIFO inside the root."""
    root, extra, outside = tmp_path / "root", tmp_path / "extra", tmp_path / "outside"
    for d in (root, extra, outside):
        d.mkdir()
    (root / "in.png").write_bytes(png_bytes)
    (extra / "x.png").write_bytes(png_bytes)
    (outside / "secret.png").write_bytes(png_bytes)
    (outside / "notes.txt").write_text("not an image")
    (root / "link.png").symlink_to(outside / "secret.png")
    os.mkfifo(root / "fifo.png")
    restricted = FetchSettings(local_files_root=str(root), extra_roots=(str(extra),),
                               restrict_local=True)
    return root, extra, outside, restricted


def test_task_input_reads_only_under_the_roots(disk, png_bytes):
    root, extra, outside, restricted = disk
    assert read_bytes(str(root / "in.png"), restricted) == png_bytes
    assert read_bytes(f"file://{extra / 'x.png'}", restricted) == png_bytes
    assert read_bytes("/data/local-files/?d=in.png", restricted) == png_bytes
    refused = [str(outside / "secret.png"),                 # a photo outside every root
               str(outside / "notes.txt"),                  # a file that is no image
               str(outside / "absent.png"),                 # a file that does not exist
               "/etc/passwd", "/etc/shadow", "/dev/zero",
               f"file://{outside / 'secret.png'}", "file:///etc/passwd",
               str(root / "link.png"),                      # a symlink out of the root
               str(root / ".." / "outside" / "secret.png"),
               "/data/local-files/?d=../outside/secret.png",
               "/data/local-files/?d=link.png",
               "/data/local-files/?d=" + quote(str(outside / "secret.png"), safe="")]
    messages = set()
    for source in refused:
        for call in (read_bytes, source_identity):
            e = expect_error("forbidden_path", call, source, restricted)
            assert not e.transient
            messages.add(e.message.replace(repr(source), "<source>"))
    assert len(messages) == 1, messages           # nothing tells an absent file from a present one
    # The same settings without the policy (the user's own `subdisc embed`) read any path.
    free = FetchSettings(local_files_root=str(root))
    assert read_bytes(str(outside / "secret.png"), free) == png_bytes
    assert read_bytes(str(root / "link.png"), free) == png_bytes


def test_extra_roots_come_from_the_environment(disk, monkeypatch, png_bytes):
    root, extra, outside, _ = disk
    monkeypatch.setenv("SUBDISC_LOCAL_FILES_ROOT", str(root))
    monkeypatch.setenv("SUBDISC_EXTRA_ROOTS", os.pathsep.join([str(extra), str(outside)]))
    settings = FetchSettings.from_env(restrict_local=True)
    assert settings.extra_roots == (str(extra), str(outside))
    assert read_bytes(str(outside / "secret.png"), settings) == png_bytes
    # Jobs carry the settings as a dict: the policy and roots go with them.
    assert FetchSettings.from_dict(settings.to_dict()) == settings
    assert FetchSettings.from_env(**settings.to_dict()) == settings       # as embed_batch reads it
    # The backend sets the policy for task input; the user's commands (embed, study) do not.
    from backend import runtime

    assert runtime.fetch_settings({}).restrict_local and not FetchSettings.from_env().restrict_local


def test_devices_and_fifos_are_never_read(disk):
    root, _, _, restricted = disk
    # Inside a root: refused without blocking on the FIFO (no writer ever comes) or reading zeros.
    e = expect_error("unreadable", read_bytes, str(root / "fifo.png"), restricted)
    assert "regular file" in e.message
    e = expect_error("unreadable", read_bytes, "/dev/zero", FetchSettings())
    assert "regular file" in e.message


def test_relative_label_studio_urls_stay_under_data(server, ls_settings, png_bytes):
    assert read_bytes("/data/upload/1/../1/face.png", ls_settings) == png_bytes
    assert server.requests[-1][1] == "/data/upload/1/face.png"
    for source in ("/data/upload/../../api/projects/", "/data/upload/%2e%2e/%2e%2e/api/projects/",
                   "/data/local-files/../../api/projects/?d=x"):
        e = expect_error("unreadable", read_bytes, source, ls_settings)
        assert "/data/" in e.message
    assert not any("/api/" in path for _, path, _ in server.requests)


def test_the_policy_keeps_the_cache_identity_of_a_file(disk, tmp_path):
    root, _, _, restricted = disk
    (tmp_path / "alias").symlink_to(root)          # a root reached through a symlinked folder
    via_alias = FetchSettings(local_files_root=str(tmp_path / "alias"), restrict_local=True)
    for settings in (restricted, via_alias):
        folder = settings.local_files_root
        # What `subdisc up` / `subdisc embed` compute for the file, the backend computes too.
        assert source_identity("/data/local-files/?d=in.png", settings) == \
            source_identity(os.path.join(folder, "in.png"), FetchSettings())

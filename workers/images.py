"""Image input: read a task's image from wherever Label Studio points, and decode it to RGB pixels.

    >>> settings = FetchSettings.from_env()
    >>> data, rgb = load("/data/upload/3/abc-face.jpg", settings)    # rgb: (H, W, 3) uint8

Sources: a local path, a file:// URL, an http(s) URL, or Label Studio's own relative URLs
("/data/upload/..." and "/data/local-files/?d=..."). Every way an input can be bad ends in an
ImageError whose .kind is one of ERROR_KINDS, so a worker can record it per image and move on.

Task input (what /predict and webhooks hand us) is read with restrict_local=True: a local path,
file:// URL or local-files URL is read only when it resolves (symlinks and ".." followed) under
local_files_root or one of extra_roots; anything else, present or not, is the same "forbidden_path"
error, so a task cannot probe the disk. The user's own commands (`subdisc embed`, `study`) read any
path. Only regular files are read (never /dev/zero or a FIFO), and a download has a total deadline.
"""
from __future__ import annotations

import io
import os
import posixpath
import re
import stat
import threading
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urljoin, urlsplit, urlunsplit

import numpy as np
import requests
import urllib3
from PIL import Image, ImageOps, UnidentifiedImageError

from workers import labelstudio_auth

ERROR_KINDS = ("not_found", "unreachable", "forbidden_host", "forbidden_path", "empty", "too_large",
               "too_many_pixels", "not_image", "truncated", "unreadable")

#: Files taken as images in a folder (Label Studio's local-files storage gets the same filter, so a
#: labels.csv beside the photos is never a task).
IMAGE_REGEX = r"(?i).*\.(jpe?g|png|gif|bmp|webp|tiff?)$"
UPLOAD_PREFIX = "/data/upload/"
LOCAL_FILES_PREFIX = "/data/local-files/"
#: Everything we fetch from Label Studio itself lives here (never its /api/).
LABEL_STUDIO_DATA = "/data/"
MAX_REDIRECTS = 5
CHUNK = 64 * 1024


class ImageError(Exception):
    """A bad input, typed: .kind is one of ERROR_KINDS, .message says why for a person.

    .transient is True only for network failures that may pass on retry (timeouts, refused
    connections, HTTP 5xx/429); everything else will fail the same way again.
    """

    def __init__(self, kind: str, message: str, transient: bool = False):
        if kind not in ERROR_KINDS:
            raise ValueError(f"unknown image error kind {kind!r}")
        super().__init__(f"{kind}: {message}")
        self.kind, self.message, self.transient = kind, message, transient


@dataclass(frozen=True)
class FetchSettings:
    """Where images may be read from, and how much of them.

    local_files_root: Label Studio's LOCAL_FILES_DOCUMENT_ROOT; "/data/local-files/?d=REL" is then
        read from disk at ROOT/REL instead of through Label Studio.
    label_studio_url: e.g. http://127.0.0.1:8080; relative "/data/..." URLs are resolved against it.
    label_studio_token: a legacy key or a Personal Access Token (workers/labelstudio_auth.py), sent
        only to the Label Studio origin.
    allowed_hosts: other hosts http(s) may fetch from ("host" or "host:port"); "*" allows any.
    extra_roots: folders besides local_files_root that task input may name local files in.
    restrict_local: read local files only under local_files_root / extra_roots (the backend sets
        it for task input; the user's own commands leave it off and read any path).
    timeout: seconds one network read may wait; deadline: seconds a whole download may take.
    """

    local_files_root: str | None = None
    label_studio_url: str | None = None
    label_studio_token: str | None = None
    allowed_hosts: tuple[str, ...] = ()
    max_bytes: int = 50 * 2**20
    max_pixels: int = 40_000_000
    timeout: float = 15.0
    extra_roots: tuple[str, ...] = ()
    restrict_local: bool = False
    deadline: float = 30.0

    def __post_init__(self):
        # Accept any iterable (a JSON list after from_dict) but keep the frozen value hashable.
        hosts = tuple(h.strip().lower() for h in self.allowed_hosts if h and h.strip())
        object.__setattr__(self, "allowed_hosts", hosts)
        roots = tuple(r.strip() for r in self.extra_roots if r and r.strip())
        object.__setattr__(self, "extra_roots", roots)
        if self.max_bytes <= 0 or self.max_pixels <= 0 or self.timeout <= 0 or self.deadline <= 0:
            raise ValueError("max_bytes, max_pixels, timeout and deadline must be positive")

    @classmethod
    def from_env(cls, **overrides) -> "FetchSettings":
        """The environment's settings, under `overrides` (None: keep the environment's).

        Unknown override keys are dropped, so a job enqueued by a newer version (jobs pass their
        settings here) still runs on an older worker.
        """
        env = os.environ
        values: dict = {
            "local_files_root": env.get("SUBDISC_LOCAL_FILES_ROOT")
                                or env.get("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"),
            "label_studio_url": env.get("LABEL_STUDIO_URL"),
            "label_studio_token": env.get("LABEL_STUDIO_API_KEY"),
            "allowed_hosts": tuple(env.get("SUBDISC_ALLOWED_HOSTS", "").split(",")),
            "extra_roots": tuple(env.get("SUBDISC_EXTRA_ROOTS", "").split(os.pathsep)),
        }
        for key, name, kind in (("max_bytes", "SUBDISC_MAX_BYTES", int),
                                ("max_pixels", "SUBDISC_MAX_PIXELS", int),
                                ("deadline", "SUBDISC_FETCH_DEADLINE", float)):
            if env.get(name):
                try:
                    values[key] = kind(env[name])
                except ValueError:
                    raise ValueError(f"{name} must be a number, not {env[name]!r}") from None
        values.update({k: v for k, v in _known(cls, overrides).items() if v is not None})
        return cls(**{k: v for k, v in values.items() if v is not None and v != ""})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["allowed_hosts"] = list(self.allowed_hosts)   # JSON-friendly
        d["extra_roots"] = list(self.extra_roots)
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> "FetchSettings":
        """Settings from `to_dict` alone (no environment); unknown keys are dropped."""
        return cls(**_known(cls, d or {}))


def _known(cls, values: dict) -> dict:
    """The items of `values` that are fields of the dataclass `cls`."""
    known = {f.name for f in fields(cls)}
    return {k: v for k, v in values.items() if k in known}


def image_files(folder: str | Path) -> list[Path]:
    """The image files under `folder` (recursive, IMAGE_REGEX), sorted."""
    pattern = re.compile(IMAGE_REGEX)
    return sorted(Path(d) / f for d, _, files in os.walk(folder) for f in files
                  if pattern.match(os.path.join(d, f)))


# --- where a source points ---------------------------------------------------------------------

def _resolve(source: str, settings: FetchSettings) -> tuple[str, str]:
    """("file", absolute path) or ("url", absolute http(s) URL) for any accepted source form."""
    source = (source or "").strip()
    if not source:
        raise ImageError("not_found", "no image source given")
    parts = urlsplit(source)
    scheme = parts.scheme.lower()

    # Label Studio's local files: read them from disk when we can see the same directory. Any host
    # qualifies, because Label Studio is often reached under several names (public vs. internal).
    if parts.path.startswith(LOCAL_FILES_PREFIX) and scheme in ("", "http", "https") \
            and settings.local_files_root:
        rel = parse_qs(parts.query).get("d", [""])[0]
        if not rel:
            raise ImageError("not_found", f"{source!r} names no file (missing ?d=)")
        root = os.path.abspath(settings.local_files_root)
        path = os.path.abspath(os.path.join(root, rel))
        if settings.restrict_local:
            return "file", _local_path(path, source, settings)
        # A lexical check like Label Studio's own: symlinks an admin placed inside the root still work.
        if os.path.commonpath([root, path]) != root:
            raise ImageError("unreadable", f"{rel!r} points outside the local files root {root}")
        return "file", path

    if scheme in ("http", "https"):
        return "url", source
    if scheme == "file":
        return "file", _local_path(os.path.abspath(unquote(parts.path)), source, settings)
    if source.startswith((UPLOAD_PREFIX, LOCAL_FILES_PREFIX)):
        if not settings.label_studio_url:
            raise ImageError("unreadable", f"{source!r} is a Label Studio URL but LABEL_STUDIO_URL "
                                           "is not set (or set the local files root)")
        return "url", _label_studio_url(source, settings.label_studio_url)
    # s3://, gs://, data: ... (one letter is a Windows drive; "a:b.jpg" may be a real file name).
    # Task input gets no os.path.exists() here: it would tell which such files exist.
    if len(scheme) > 1 and (settings.restrict_local or not os.path.exists(source)):
        raise ImageError("unreadable", f"unsupported source {source!r}: use a path or an http(s) URL")
    return "file", _local_path(os.path.abspath(source), source, settings)


def _under(path: str, root: str) -> bool:
    return os.path.commonpath([root, path]) == root


def _local_path(path: str, source: str, settings: FetchSettings) -> str:
    """`path`, if reading it is allowed: always, or (restrict_local) if its real path is under an
    allowed root.

    Refused and absent paths outside the roots get one kind and one message: nothing tells them
    apart, so task input cannot learn which files exist. Symlinks and ".." are resolved for the
    check, so neither leads out of a root; the path itself is returned unresolved, so its cache
    identity is the one `subdisc embed` and `subdisc up` compute for the same file.
    """
    if not settings.restrict_local:
        return path
    real = os.path.realpath(path)
    roots = [os.path.realpath(r) for r in (settings.local_files_root, *settings.extra_roots) if r]
    if not any(_under(real, root) for root in roots):
        raise ImageError("forbidden_path", f"{source!r} is not under a folder the backend may read "
                                           "(SUBDISC_LOCAL_FILES_ROOT, SUBDISC_EXTRA_ROOTS)")
    return path


def _data_path(path: str) -> str | None:
    """A URL path with percent-escapes decoded and "." / ".." resolved, if it lies under /data/."""
    decoded = unquote(path)
    clean = posixpath.normpath("/" + decoded.lstrip("/"))
    if decoded.endswith("/") and clean != "/":
        clean += "/"          # "/data/local-files/?d=..." keeps its slash
    return clean if (clean.rstrip("/") + "/").startswith(LABEL_STUDIO_DATA) else None


def _label_studio_url(source: str, label_studio_url: str) -> str:
    """A relative "/data/..." URL made absolute on Label Studio, normalised: it must stay under
    /data/ ("/data/upload/../../api/projects/" would have a worker GET the API with the token)."""
    parts = urlsplit(source)
    path = _data_path(parts.path)
    if path is None:
        raise ImageError("unreadable", f"{source!r} leads out of Label Studio's /data/")
    rel = urlunsplit(("", "", quote(path, safe="/:@!$&'()*+,;=~"), parts.query, ""))
    return urljoin(label_studio_url.rstrip("/") + "/", rel.lstrip("/"))


def source_identity(source: str, settings: FetchSettings) -> str:
    """A stable id to cache source -> content hash without re-reading the source.

    Local files: "file:<abs path>:<mtime_ns>:<size>", so an edited file is a new identity.
    URLs: the absolute URL with scheme and host lower-cased and any #fragment dropped.
    """
    kind, where = _resolve(source, settings)
    if kind == "file":
        try:
            st = os.stat(where)
        except FileNotFoundError:
            raise ImageError("not_found", f"no such file: {where}") from None
        except OSError as e:
            raise ImageError("unreadable", f"cannot stat {where}: {e.strerror}") from None
        return f"file:{where}:{st.st_mtime_ns}:{st.st_size}"
    p = urlsplit(where)
    return urlunsplit((p.scheme.lower(), p.netloc.lower(), p.path or "/", p.query, ""))


# --- reading bytes -----------------------------------------------------------------------------

def read_bytes(source: str, settings: FetchSettings) -> bytes:
    """The raw bytes of an image source, at most settings.max_bytes of them."""
    kind, where = _resolve(source, settings)
    data = _read_file(where, settings) if kind == "file" else _fetch(where, settings)
    if not data:
        raise ImageError("empty", f"{source!r} is empty (0 bytes)")
    return data


def _read_file(path: str, settings: FetchSettings) -> bytes:
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; only regular files are read.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise ImageError("not_found", f"no such file: {path}") from None
    except OSError as e:
        raise ImageError("unreadable", f"cannot read {path}: {e.strerror or e}") from None
    with open(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise ImageError("unreadable", f"{path} is a directory, not an image file")
        if not stat.S_ISREG(mode):
            raise ImageError("unreadable", f"{path} is not a regular file (a device, FIFO or socket)")
        try:
            data = f.read(settings.max_bytes + 1)   # +1 tells "exactly the limit" from "over it"
        except OSError as e:
            raise ImageError("unreadable", f"cannot read {path}: {e.strerror or e}") from None
    if len(data) > settings.max_bytes:
        raise ImageError("too_large", f"{path} is larger than the {settings.max_bytes} byte limit")
    return data


def _origin(url: str) -> tuple[str, str, int | None]:
    p = urlsplit(url)
    try:
        port = p.port or {"http": 80, "https": 443}.get(p.scheme.lower())
    except ValueError:          # a non-numeric port
        raise ImageError("unreadable", f"invalid URL {url!r}") from None
    return p.scheme.lower(), (p.hostname or "").lower(), port


def _fetch(url: str, settings: FetchSettings) -> bytes:
    """GET url, following redirects by hand so each hop is checked against the allow-list and the
    token goes only to the Label Studio origin (requests would follow them before we could look).

    settings.timeout bounds each wait for bytes; settings.deadline the whole download, redirects
    included (a server trickling a byte every few seconds never trips the first).
    """
    ls = _origin(settings.label_studio_url) if settings.label_studio_url else None
    refreshed = False
    deadline = time.monotonic() + settings.deadline
    for _ in range(MAX_REDIRECTS + 1):
        scheme, host, port = _origin(url)
        if scheme not in ("http", "https") or not host:
            raise ImageError("unreadable", f"invalid URL {url!r}")
        is_ls = ls is not None and (host, port) == ls[1:]
        allowed = settings.allowed_hosts
        if not (is_ls or "*" in allowed or host in allowed or f"{host}:{port}" in allowed):
            raise ImageError("forbidden_host", f"host {host!r} is not allowed: add it to "
                                               "SUBDISC_ALLOWED_HOSTS to fetch images from it")
        # Only to Label Studio's origin (same scheme too: never in clear text to an https Label
        # Studio's host); either kind of token (labelstudio_auth refreshes a PAT for an access token).
        try:
            # Photos come from Label Studio's /data/ alone: a task naming its /api/ gets no token.
            headers = labelstudio_auth.headers_for(settings.label_studio_url,
                                                   settings.label_studio_token, url) \
                if _under_data(url, settings.label_studio_url) else {}
        except labelstudio_auth.AuthError as e:
            raise ImageError("unreachable" if e.transient else "unreadable", str(e),
                             transient=e.transient) from None
        wait = min(settings.timeout, max(deadline - time.monotonic(), 0.001))
        try:
            resp = requests.get(url, headers=headers, timeout=wait, stream=True,
                                allow_redirects=False)
        except (requests.ConnectionError, requests.Timeout) as e:
            raise ImageError("unreachable", f"cannot reach {host}: {type(e).__name__}",
                             transient=True) from None
        except requests.RequestException as e:
            raise ImageError("unreadable", f"cannot fetch {url!r}: {e}") from None
        with resp:
            if resp.status_code == 401 and headers and not refreshed and labelstudio_auth.auth_for(
                    settings.label_studio_url, settings.label_studio_token).invalidate(headers):
                refreshed = True
                continue    # an expired access token: the next try refreshes it (once)
            if resp.is_redirect:
                url = urljoin(url, resp.headers["location"])
                continue
            _check_status(resp, url, is_ls)
            return _read_body(resp, url, settings.max_bytes, deadline)
    raise ImageError("unreadable", f"too many redirects from {url!r}")


def _under_data(url: str, label_studio_url: str | None) -> bool:
    """Whether url's path (decoded, "." and ".." resolved) lies under Label Studio's /data/ (below
    the path Label Studio is served at, if any)."""
    base = urlsplit(label_studio_url or "").path.rstrip("/")
    path = posixpath.normpath("/" + unquote(urlsplit(url).path).lstrip("/"))
    if base and not (path + "/").startswith(base + "/"):
        return False
    return _data_path(path[len(base):] or "/") is not None


def _check_status(resp: requests.Response, url: str, is_ls: bool):
    code = resp.status_code
    if code < 300:
        return
    if code in (404, 410):
        raise ImageError("not_found", f"{url} does not exist (HTTP {code})")
    if code in (401, 403):
        hint = "check LABEL_STUDIO_API_KEY" if is_ls else "the server refused access"
        raise ImageError("unreadable", f"{url}: HTTP {code}, {hint}")
    if code == 429 or code >= 500:
        raise ImageError("unreachable", f"{url}: HTTP {code}, try again later", transient=True)
    raise ImageError("unreadable", f"{url}: HTTP {code}")


def _read_body(resp: requests.Response, url: str, max_bytes: int,
               deadline: float | None = None) -> bytes:
    """The body, at most max_bytes of it, read by `deadline` (time.monotonic()).

    Past the deadline the connection is shut from a timer thread (a blocked read then returns) and
    the download is a transient error: what arrived is partial, never an image to judge for good.
    """
    declared = resp.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise ImageError("too_large", f"{url} is {declared} bytes, over the {max_bytes} byte limit")
    late = threading.Event()
    timer = None
    if deadline is not None:
        timer = threading.Timer(max(deadline - time.monotonic(), 0.0), _cut, (resp, late))
        timer.daemon = True
        timer.start()
    # The declared length may be absent or false: count while streaming, asking for no more than
    # one byte past the limit (urllib3 2 returns at most that many decoded bytes per read).
    buf = bytearray()
    try:
        while len(buf) <= max_bytes and not late.is_set():
            chunk = resp.raw.read(min(CHUNK, max_bytes + 1 - len(buf)), decode_content=True)
            if not chunk:
                break
            buf += chunk
    except (urllib3.exceptions.ReadTimeoutError, urllib3.exceptions.ProtocolError, OSError) as e:
        if late.is_set():
            raise _too_slow(url, deadline) from None
        raise ImageError("unreachable", f"download of {url} broke off: {type(e).__name__}",
                         transient=True) from None
    except urllib3.exceptions.HTTPError as e:      # e.g. a bad gzip body
        if late.is_set():
            raise _too_slow(url, deadline) from None
        raise ImageError("unreadable", f"cannot read {url}: {e}") from None
    finally:
        if timer is not None:
            timer.cancel()
    if late.is_set():
        raise _too_slow(url, deadline)
    if len(buf) > max_bytes:
        raise ImageError("too_large", f"{url} is over the {max_bytes} byte limit")
    return bytes(buf)


def _cut(resp: requests.Response, late: threading.Event) -> None:
    """Shut a download's socket: a read blocked in another thread returns at once."""
    late.set()
    # The response's own socket file (http.client drops the connection's .sock when the body
    # runs to the connection's close); the connection's socket otherwise.
    fp = getattr(getattr(resp.raw, "_fp", None), "fp", None)
    sock = getattr(getattr(fp, "raw", None), "_sock", None) or \
        getattr(getattr(resp.raw, "_connection", None), "sock", None)
    try:
        if sock is not None:
            sock.shutdown(2)   # SHUT_RDWR
    except OSError:
        pass


def _too_slow(url: str, deadline: float | None) -> ImageError:
    return ImageError("unreachable", f"the download of {url} did not finish within its deadline "
                                     "(SUBDISC_FETCH_DEADLINE)", transient=True)


# --- decoding ----------------------------------------------------------------------------------

_FORMATS: list[str] | None = None


def _formats() -> list[str]:
    """Every format Pillow opens except EPS, which it opens by running Ghostscript on the file:
    not something to do with arbitrary task input."""
    global _FORMATS
    if _FORMATS is None:
        Image.init()
        _FORMATS = [f for f in Image.OPEN if f != "EPS"]
    return _FORMATS


def decode(data: bytes, settings: FetchSettings | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB pixels of an encoded image: EXIF orientation applied, first frame of an
    animation, transparency composited on white. The pixel count is checked before decoding."""
    max_pixels = (settings or FetchSettings()).max_pixels
    if not data:
        raise ImageError("empty", "the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb guard warns below 2x its limit; make that an error we can map.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=_formats()) as im:
                # open() has read only the header: refuse before any pixel memory is allocated.
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageError("too_many_pixels", f"{w}x{h} is {w * h} pixels, over the "
                                                        f"{max_pixels} pixel limit")
                im.load()                 # the first frame; truncation surfaces here
                return _to_rgb(_upright(im))
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError("too_many_pixels", f"too many pixels to decode safely: {e}") from None
    except UnidentifiedImageError:
        if _looks_cut(data):
            raise ImageError("truncated", "the image file is cut short") from None
        raise ImageError("not_image", "the data is not an image Pillow can read") from None
    except (OSError, EOFError, SyntaxError, ValueError) as e:
        if "truncated" in str(e).lower() or isinstance(e, EOFError) or _looks_cut(data):
            raise ImageError("truncated", f"the image file is cut short ({e})") from None
        raise ImageError("unreadable", f"cannot decode the image: {e}") from None
    except Exception as e:  # Pillow plugins raise a variety of things on corrupt input
        raise ImageError("unreadable", f"cannot decode the image: {type(e).__name__}: {e}") from None


def _upright(im: Image.Image) -> Image.Image:
    # A broken EXIF block should not cost us an otherwise good photo: keep it as stored.
    try:
        return ImageOps.exif_transpose(im)
    except Exception:
        return im


def _to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        # High bit depth: stretch the actual range to 8 bits (converting to L would clip to white).
        a = np.nan_to_num(np.asarray(im, dtype=np.float64))
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        grey = np.rint(a).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if im.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    if im.mode != "RGB":
        im = im.convert("RGB")   # L, 1, P, CMYK, YCbCr, LAB, HSV, RGBA after compositing
    return np.array(im, dtype=np.uint8)


def _looks_cut(data: bytes) -> bool:
    """Whether a file that failed to decode starts like an image but is missing its end."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return b"IEND" not in data[-64:]
    if data.startswith(b"\xff\xd8\xff"):
        return b"\xff\xd9" not in data[-1024:]
    if data.startswith(b"GIF8"):
        return b";" not in data[-16:]
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return int.from_bytes(data[4:8], "little") + 8 > len(data)
    return False


def load(source: str, settings: FetchSettings) -> tuple[bytes, np.ndarray]:
    """read_bytes + decode: the raw bytes (to hash) and the RGB pixels."""
    data = read_bytes(source, settings)
    return data, decode(data, settings)

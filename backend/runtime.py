"""The backend's settings from the environment (one place, so server, jobs and CLI agree).

    (SUBDISC_REDIS_URL and SUBDISC_QUEUE: workers/connection.py, shared with the workers)
    SUBDISC_DETECTOR, SUBDISC_UPSAMPLE, SUBDISC_FALLBACK   face pipeline (hog, auto, off)
    SUBDISC_DESCRIPTOR     descriptor runtime: onnx (default) or dlib (dlib's own, for comparison)
    SUBDISC_PRIOR          a saved centroid model (`subdisc study ... --holdout`) naming clusters
                           before any confirmation
    LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY
                           where Label Studio is and its token; they win over what /setup sends,
                           because Label Studio's own idea of its address ("localhost:8080") is often
                           wrong from inside another container
    SUBDISC_MAX_BODY_MB    request body limit (default 64)
    SUBDISC_BATCH_SIZE     photos per worker job on "Retrieve predictions" (default 8): smaller
                           batches post their first predictions sooner, larger ones cost less overhead
    BASIC_AUTH_USER, BASIC_AUTH_PASS   if both set, every route asks for them
"""
from __future__ import annotations

import functools
import logging
import os


from workers.images import FetchSettings
from workers.pipeline import PipelineOptions, parse_upsample

log = logging.getLogger(__name__)

def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def pipeline_options() -> PipelineOptions:
    return PipelineOptions(detector=os.environ.get("SUBDISC_DETECTOR", "hog"),
                           upsample=parse_upsample(os.environ.get("SUBDISC_UPSAMPLE", "auto")),
                           fallback=_flag("SUBDISC_FALLBACK"),
                           descriptor=os.environ.get("SUBDISC_DESCRIPTOR", "onnx").strip().lower())


def label_studio_target(settings: dict | None) -> tuple[str | None, str | None]:
    """(Label Studio URL, token): the environment's, else what /setup told us."""
    settings = settings or {}
    url = os.environ.get("LABEL_STUDIO_URL") or settings.get("hostname") or None
    token = os.environ.get("LABEL_STUDIO_API_KEY") or settings.get("access_token") or None
    return (url.rstrip("/") if url else None), token


def fetch_settings(settings: dict | None) -> FetchSettings:
    """How to read a project's images: local files root and allowed hosts from the environment,
    Label Studio's address and token as in label_studio_target."""
    url, token = label_studio_target(settings)
    return FetchSettings.from_env(label_studio_url=url, label_studio_token=token)


def batch_size() -> int:
    value = int(os.environ.get("SUBDISC_BATCH_SIZE", "8"))
    if value < 1:
        raise ValueError(f"SUBDISC_BATCH_SIZE must be at least 1, not {value}")
    return value


def max_body_bytes() -> int:
    return int(float(os.environ.get("SUBDISC_MAX_BODY_MB", "64")) * 2**20)


def basic_auth() -> tuple[str, str] | None:
    user, password = os.environ.get("BASIC_AUTH_USER"), os.environ.get("BASIC_AUTH_PASS")
    return (user, password) if user and password else None


@functools.lru_cache(maxsize=4)
def _load_prior(path: str, mtime_ns: int):
    from backend.attributes.centroids import CentroidModel

    model = CentroidModel.load(path)
    log.info("prior %s: attributes %s", path, ", ".join(model.attributes))
    return model


def load_prior():
    """The saved centroid model named by SUBDISC_PRIOR (reloaded when the file changes), or None.

    A missing or unreadable file is an error: a prior the operator asked for must not be silently
    dropped.
    """
    path = os.environ.get("SUBDISC_PRIOR")
    if not path:
        return None
    try:
        mtime = os.stat(path).st_mtime_ns
    except OSError as exc:
        raise FileNotFoundError(f"SUBDISC_PRIOR={path}: {exc.strerror}") from None
    return _load_prior(path, mtime)

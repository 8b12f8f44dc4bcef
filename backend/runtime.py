"""The backend's settings from the environment (one place, so server, jobs and CLI agree).

    (SUBDISC_REDIS_URL and SUBDISC_QUEUE: workers/connection.py, shared with the workers)
    SUBDISC_DETECTOR, SUBDISC_UPSAMPLE, SUBDISC_FALLBACK   face pipeline (hog, auto, off)
    SUBDISC_DESCRIPTOR     descriptor runtime: onnx (default) or dlib (dlib's own, for comparison)
    SUBDISC_PRIOR          a saved centroid model (`subdisc study ... --holdout`) naming clusters
                           before any confirmation
    SUBDISC_LOCAL_FILES_ROOT, SUBDISC_EXTRA_ROOTS
                           the only folders task input may name local files in (paths, file://,
                           /data/local-files/?d=); SUBDISC_EXTRA_ROOTS is os.pathsep-separated
    SUBDISC_FETCH_DEADLINE seconds one image download may take in all (default 30)
    LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY
                           where Label Studio is and its token (a legacy key or a Personal Access
                           Token); they win over what /setup sends, because Label Studio's own idea
                           of its address ("localhost:8080") is often wrong from inside another
                           container. The key is sent only to LABEL_STUDIO_URL's host
    SUBDISC_MAX_BODY_MB    request body limit (default 64)
    SUBDISC_REFIT_LOCK_TTL, SUBDISC_REFIT_LOCK_WAIT, SUBDISC_RECONCILE_SECONDS
                           the refit lock's life (renewed while a refit runs) and how long a refit
                           waits for it; seconds between two reconciliations with Label Studio
                           (backend/state.py, backend/reconcile.py read them). Give server and
                           workers the same values: workers also queue the periodic reconciliation
    SUBDISC_BATCH_SIZE     photos per worker job (default 32; a request of thousands gets bigger
                           jobs, backend.predict_jobs.import_size): smaller jobs post their first
                           predictions sooner, larger ones cost less (workers.client.BATCH_SIZE)
    BASIC_AUTH_USER, BASIC_AUTH_PASS   if both set, every route asks for them
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os

from workers.client import BATCH_SIZE
from workers.images import FetchSettings
from workers.labelstudio_auth import on_origin
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
    """(Label Studio URL, token): the environment's when set, else what /setup told us.

    A token goes only to the host it came with: LABEL_STUDIO_API_KEY to LABEL_STUDIO_URL (never to
    a host named by /setup), /setup's access_token to the hostname of that same /setup call (so a
    later /setup naming another host without a token gets no token, not the old one).
    """
    settings = settings or {}
    env_url = (os.environ.get("LABEL_STUDIO_URL") or "").strip() or None
    env_token = (os.environ.get("LABEL_STUDIO_API_KEY") or "").strip() or None
    url = env_url or settings.get("hostname") or None
    token = None
    if env_url and env_token:
        token = env_token
    elif url and settings.get("access_token") and on_origin(
            settings.get("token_hostname", settings.get("hostname")), url):
        token = settings["access_token"]
    elif env_token and not _warned.get("env_token"):
        _warned["env_token"] = True
        log.warning("LABEL_STUDIO_API_KEY is set without LABEL_STUDIO_URL: it is not sent to the "
                    "host /setup names (%s); set LABEL_STUDIO_URL too", url)
    return (url.rstrip("/") if url else None), token


_warned: dict[str, bool] = {}


def fetch_settings(settings: dict | None) -> FetchSettings:
    """How to read a project's images: local files roots and allowed hosts from the environment,
    Label Studio's address and token as in label_studio_target (exactly: the environment's own
    LABEL_STUDIO_* do not slip back in where label_studio_target chose otherwise).

    Task input is not the user's own command line: local files only under the roots (the jobs
    this backend queues carry the policy to the workers).
    """
    url, token = label_studio_target(settings)
    return dataclasses.replace(FetchSettings.from_env(restrict_local=True), label_studio_url=url,
                               label_studio_token=token)


def batch_size() -> int:
    value = int(os.environ.get("SUBDISC_BATCH_SIZE") or BATCH_SIZE)
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

"""The Label Studio ML backend over HTTP: label-studio-ml 1.0.9's Flask app with our routes.

    gunicorn 'backend.server:app'          (or `subdisc serve`)

This is the only module that imports label_studio_ml. SubdiscMLBackend is the thin adapter from its
model interface to backend.model.SubdiscModel; moving to label-studio-ml 2.x means rewriting this file.

What 1.0.9 does that we cannot keep, and so replace on its app:
  * /predict and /setup go through a single process-global model (`_manager._current_model`): the
    last /setup wins across projects, a fresh gunicorn worker answers /predict with 500 until it
    sees a /setup, and its model_version is a job id. Ours are per project, with state in Redis.
  * /webhook runs each event in a new process writing under model_dir (TypeError without one).
    Ours records the event in Redis, queues a refit and answers at once (Label Studio waits 1 s).
  * /train, /versions and /is_training read model_dir or the old job manager; ours read Redis.
/health and /metrics are label_studio_ml's own. Every route, whatever the method: a body size limit
checked before anything reads it (label_studio_ml's request logging read every body, even a GET's),
JSON objects only (nested at most MAX_JSON_DEPTH deep) for POST/PUT/PATCH, and Basic auth when
BASIC_AUTH_USER / BASIC_AUTH_PASS are set (Label Studio can send them). Malformed input is a 400
naming the field.
"""
from __future__ import annotations

import functools
import hmac
import logging
import threading

import redis as redis_lib
from flask import Response, jsonify, request
from label_studio_ml.api import init_app
from label_studio_ml.model import LabelStudioMLBase

from backend import runtime
from backend.annotations import AnnotationError
from backend.labeling_config import ConfigError
from backend.model import SubdiscModel

log = logging.getLogger(__name__)

#: Deeper JSON is refused: Label Studio's payloads are a few levels deep, and deeper ones cost
#: recursion wherever they are walked (json itself fails near 1,000).
MAX_JSON_DEPTH = 64

_lock = threading.Lock()
_model: SubdiscModel | None = None


def get_model() -> SubdiscModel:
    """This process's model object (state is in Redis; this holds connections and caches)."""
    global _model
    with _lock:
        if _model is None:
            _model = SubdiscModel.from_env()
        return _model


class SubdiscMLBackend(LabelStudioMLBase):
    """label-studio-ml's model interface, delegating to backend.model.SubdiscModel."""

    def __init__(self, label_config=None, train_output=None, **kwargs):
        self.model: SubdiscModel = kwargs.pop("model", None) or get_model()
        self.project = kwargs.pop("project", None)
        if label_config:
            self.model.config(label_config)   # our clear ConfigError before label_studio_ml parses it
        super().__init__(label_config=label_config, train_output=train_output, **kwargs)

    def predict(self, tasks, **kwargs):
        return self.model.predict(tasks, self.project, self.label_config)

    # No fit(): /webhook and /train are our own routes (below), answered by SubdiscModel directly.


# --- request checks ----------------------------------------------------------------------------

def _error(status: int, message: str, **extra) -> Response:
    resp = jsonify({"status": status, "error": message, **extra})
    resp.status_code = status
    return resp


def _check_request():
    """Runs before every route, label_studio_ml's included: auth, then body limits and type."""
    credentials = runtime.basic_auth()
    if credentials is not None:
        auth = request.authorization
        ok = auth is not None and auth.username is not None and auth.password is not None and \
            hmac.compare_digest(auth.username.encode(), credentials[0].encode()) and \
            hmac.compare_digest(auth.password.encode(), credentials[1].encode())
        if not ok:
            resp = _error(401, "authentication required")
            resp.headers["WWW-Authenticate"] = 'Basic realm="subdisc"'
            return _closing(resp) if _has_body() else resp
    # Any method may carry a body (GET /health with 300 MB): check its size before anything reads
    # it. Without a length it would be read to its end (gunicorn passes chunked bodies on).
    limit = runtime.max_body_bytes()
    if "chunked" in request.headers.get("Transfer-Encoding", "").lower():
        return _closing(_error(411, "send a Content-Length (chunked bodies are not accepted)"))
    if request.content_length is not None and request.content_length > limit:
        return _closing(_error(413, f"the body is {request.content_length} bytes, over the {limit} "
                                    "byte limit (SUBDISC_MAX_BODY_MB)"))
    if request.method in ("POST", "PUT", "PATCH"):
        if request.content_length is None:
            return _error(411, "send a Content-Length (chunked bodies are not accepted)")
        if request.mimetype != "application/json":
            return _error(415, f"the body must be JSON (Content-Type: application/json), "
                               f"not {request.mimetype or 'nothing'}")
        try:
            body = request.get_json(silent=True)
        except RecursionError:
            return _error(400, f"the JSON body is nested too deeply (at most {MAX_JSON_DEPTH} levels)")
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object")
        if _depth_over(body, MAX_JSON_DEPTH):
            return _error(400, f"the JSON body is nested too deeply (at most {MAX_JSON_DEPTH} levels)")
    return None


def _has_body() -> bool:
    return bool(request.content_length) or "Transfer-Encoding" in request.headers


def _closing(resp: Response) -> Response:
    """Close the connection after a refused body: gunicorn would otherwise read it to its end to
    reach the next request on the connection."""
    resp.headers["Connection"] = "close"
    return resp


def _depth_over(value, limit: int) -> bool:
    """Whether JSON `value` nests deeper than `limit` (iterative: no recursion to exhaust)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def _log_request():
    """label_studio_ml's request log, without the body: it read every body into memory, whatever
    its size or the method, before any route could refuse it."""
    log.debug("%s %s (%s bytes)", request.method, request.path, request.content_length)


def _field(data: dict, name: str, kinds: tuple, required: bool = False):
    """data[name] if it is of one of `kinds` (None when absent and not required); else ValueError."""
    value = data.get(name)
    if value is None and not required:
        return None
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join({dict: "an object", list: "a list", str: "a string",
                             int: "an integer"}[k] for k in kinds)
        raise ValueError(f"{name!r} must be {names}, not {type(value).__name__}")
    return value


def _json_errors(view):
    """Our routes answer every failure as JSON with a status that says whose fault it is."""
    @functools.wraps(view)
    def wrapped(*args, **kwargs):
        try:
            return view(*args, **kwargs)
        except (ConfigError, AnnotationError) as exc:
            return _error(400, str(exc))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("bad request to %s: %s", request.path, exc)
            return _error(400, f"{type(exc).__name__}: {exc}")
        except LookupError as exc:
            return _error(404, str(exc))
        except redis_lib.RedisError as exc:
            log.error("Redis failed under %s: %s", request.path, exc)
            return _error(503, f"Redis is unavailable: {exc}")
    return wrapped


# --- routes ------------------------------------------------------------------------------------

@_json_errors
def predict():
    data = request.get_json()
    tasks = _field(data, "tasks", (list,), required=True)
    label_config = _field(data, "label_config", (str,))
    _field(data, "params", (dict,))     # label_studio_ml's; our predict needs none of it
    project = data.get("project")
    if project is None and tasks and isinstance(tasks[0], dict):
        project = tasks[0].get("project")
    model = get_model()
    backend = SubdiscMLBackend(label_config=label_config, project=project, model=model)
    results = backend.predict(tasks)
    return jsonify({"results": results, "model_version": model.model_version(project)})


@_json_errors
def setup():
    data = request.get_json()
    if not data.get("schema"):
        raise ConfigError("no labeling config: /setup needs 'schema' (the project's label config)")
    schema = _field(data, "schema", (str,), required=True)
    hostname = _field(data, "hostname", (str,))
    token = _field(data, "access_token", (str,))
    version = get_model().setup(data.get("project"), schema, hostname or None, token or None)
    return jsonify({"model_version": version})


#: Set when this process answered a webhook 503 (Redis away): Label Studio never resends it, so the
#: next webhook that goes through queues a reconciliation of its project at once.
_webhook_lost = threading.Event()


@_json_errors
def webhook():
    data = request.get_json()
    action = data.get("action")
    if not isinstance(action, str):
        raise ValueError("a webhook needs an 'action'")
    model = get_model()
    try:
        summary = model.record_event(action, data)
    except redis_lib.RedisError:
        _webhook_lost.set()
        raise                                   # 503 (_json_errors): reconciliation recovers it
    from backend.reconcile import schedule_reconcile
    from backend.state import ProjectState

    force = _webhook_lost.is_set()
    _webhook_lost.clear()
    try:
        # After a lost webhook, every project: we cannot tell which one it was for.
        projects = ProjectState.projects(model.redis) if force else [summary["project"]]
        jobs = [schedule_reconcile(model.redis, model.queue_name, p, model.fingerprint, force=force)
                for p in projects]
        summary["reconcile"] = [j for j in jobs if j] or None
    except redis_lib.RedisError:
        _webhook_lost.set()                     # the event is stored; reconcile on the next one
    return jsonify(summary)


@_json_errors
def train():
    data = request.get_json()
    summary = get_model().record_event("START_TRAINING", {"project": data.get("project")})
    return jsonify({"job": summary["refit"]}), 201


@_json_errors
def versions():
    from backend.state import ProjectState

    data = request.get_json()
    st = ProjectState(get_model().redis, data.get("project"))
    seen = [h["version"] for h in st.history()]
    current = st.model_version()
    return jsonify({"versions": list(dict.fromkeys(seen + ([current] if current else []))),
                    "model_dir": None})


@_json_errors
def is_training():
    from backend.state import ProjectState

    st = ProjectState(get_model().redis, request.args.get("project"))
    return jsonify({"is_training": st.refit_queued(), "model_version": st.model_version(),
                    "backend": "redis"})


@_json_errors
def report_json():
    from backend import project_report

    redis = get_model().redis
    project = request.args.get("project")
    if project is None:
        return jsonify({"projects": project_report.projects(redis)})
    return jsonify(project_report.build(redis, project))


@_json_errors
def report_html():
    from backend import project_report

    redis = get_model().redis
    project = request.args.get("project")
    if project is None:
        page = project_report.index_html(project_report.projects(redis))
    else:
        page = project_report.render_html(project_report.build(redis, project))
    return Response(page, mimetype="text/html")


#: label_studio_ml endpoint names -> our replacements.
REPLACED = {"_predict": predict, "_setup": setup, "webhook": webhook, "_train": train,
            "get_version": versions, "_is_training": is_training}
ADDED = [("/report", "report_json", report_json, ["GET"]),
         ("/report.html", "report_html", report_html, ["GET"])]


def create_app():
    """label_studio_ml's Flask app with our routes and checks (idempotent: its app is a global)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = init_app(SubdiscMLBackend)
    app.config["MAX_CONTENT_LENGTH"] = runtime.max_body_bytes()
    for endpoint, view in REPLACED.items():
        if endpoint not in app.view_functions:
            raise RuntimeError(f"label_studio_ml has no endpoint {endpoint!r}: check its version")
        app.view_functions[endpoint] = view
    for rule, endpoint, view, methods in ADDED:
        if endpoint not in app.view_functions:
            app.add_url_rule(rule, endpoint, view, methods=methods)
    hooks = app.before_request_funcs.setdefault(None, [])
    # label_studio_ml's log_request_info reads the whole body (request.get_data()): ours does not.
    hooks[:] = [_log_request if getattr(h, "__name__", "") == "log_request_info" else h for h in hooks]
    if _check_request not in hooks:
        hooks.insert(0, _check_request)   # first: nothing reads a body before it is checked
    return app


app = create_app()

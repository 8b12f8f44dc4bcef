"""subdisc's own model object, behind the Label Studio adapter (backend/server.py).

    model = SubdiscModel.from_env()
    model.setup(project, label_config, hostname, access_token) -> model_version
    model.predict(tasks, project, label_config) -> [one Label Studio prediction per task]
    model.record_event(action, payload)          # webhooks: confirmations, deletions, training
    model.refit(project)                         # re-cluster / re-name / re-score (an RQ job)

Nothing here imports label_studio_ml: moving to its 2.x API means rewriting only the adapter.
Nothing is kept between calls except caches of what Redis holds (backend/state.py).

/predict never waits for faces to be computed: cached photos are answered at once; the others are
queued on the workers (backend/predict_jobs.py) and their predictions POSTed to Label Studio when
ready. Meanwhile they get an empty result tagged "<version>+pending": Label Studio stores whatever
result list it is given under the item's model_version and later skips the tasks holding a
prediction of the current version, so an empty answer under the current version would mark those
tasks done for good. Tagged apart, they are asked again by the next "Retrieve predictions".
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import redis as redis_lib

from backend import runtime
from backend.annotations import AnnotationError, label_studio_id, parse_annotation
from backend.confirmations import acceptance, confirmed_labels
from backend.labeling_config import ConfigError, LabelingConfig, parse
from backend.posting import PENDING_SUFFIX
from backend.predictions import box_percent, build, empty, pending
from backend.attributes.centroids import ModelFormatError
from backend.attributes.project_model import Clusterings, ProjectModel, fit_project
from backend.attributes.views import face_views, stack_views
from backend.state import LockBusy, ProjectState
from workers import connection
from workers.cache import EmbeddingCache
from workers.client import BATCH_SIZE
from workers.images import ImageError, source_identity
from workers.pipeline import PipelineOptions, fingerprint
from workers.results import ImageResult

log = logging.getLogger(__name__)

#: A task queued for the async path is not queued again for this long (seconds).
PENDING_TTL = 3600
#: Without any model yet, /predict fits one itself if the project is at most this big (tasks);
#: bigger ones are fitted by a worker.
INLINE_FIT_TASKS = 2000
#: Seconds /predict or a posting job, holding a model already, waits for a running refit's lock.
INLINE_LOCK_WAIT = 2.0
ANNOTATION_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED")
DELETE_EVENTS = ("ANNOTATIONS_DELETED", "ANNOTATION_DELETED")


@dataclass
class ProjectFaces:
    """Every face of a project's known photos: X (n, 128), its views, and where each row comes from."""

    X: np.ndarray
    views: dict[str, np.ndarray] = field(default_factory=dict)     # {view: (n, d)}
    rows: list[tuple[str, int]] = field(default_factory=list)        # (task id, face index)
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)   # in %
    areas: list[float] = field(default_factory=list)
    by_task: dict[str, list[int]] = field(default_factory=dict)
    n_tasks: int = 0


def no_model_version(config: LabelingConfig) -> str:
    """The version answered before any model exists for this config (boxes only)."""
    return f"subdisc-0-{config.fingerprint()[:6]}"


class SubdiscModel:
    def __init__(self, redis: redis_lib.Redis, queue_name: str | None = None,
                 options: PipelineOptions | None = None, prior=None, batch_size: int = BATCH_SIZE,
                 pipeline_fingerprint: str | None = None):
        self.redis = redis
        self.queue_name = queue_name or connection.queue_name()
        self.options = options or runtime.pipeline_options()
        # Computing it hashes ~120 MB of model files: a job is handed the server's (the cache keys
        # must agree between server and workers anyway).
        self.fingerprint = pipeline_fingerprint or fingerprint(self.options)
        self.cache = EmbeddingCache(redis, self.fingerprint)
        self.prior = prior
        self.batch_size = batch_size
        self._configs: dict[str, LabelingConfig] = {}
        self._models: dict[str, ProjectModel] = {}

    @classmethod
    def from_env(cls, redis: redis_lib.Redis | None = None,
                 pipeline_fingerprint: str | None = None) -> "SubdiscModel":
        return cls(redis or connection.redis_from_env(), prior=runtime.load_prior(),
                   batch_size=runtime.batch_size(), pipeline_fingerprint=pipeline_fingerprint)

    # --- configs and models ------------------------------------------------------------------
    def config(self, xml: str) -> LabelingConfig:
        if not isinstance(xml, str):
            raise ConfigError(f"the labeling config must be an XML string, not {type(xml).__name__}")
        key = hashlib.sha256(xml.encode()).hexdigest()
        if key not in self._configs:
            if len(self._configs) > 64:
                self._configs.clear()
            self._configs[key] = parse(xml)
        return self._configs[key]

    def project_config(self, st: ProjectState, label_config: str | None = None) -> LabelingConfig:
        """The config Label Studio just sent, else the one from /setup; stored when new."""
        settings = st.settings() or {}
        if label_config and label_config != settings.get("label_config"):
            config = self.config(label_config)   # ConfigError for a config we cannot serve
            st.save_settings(label_config)
            return config
        if not settings.get("label_config"):
            raise ConfigError(f"project {st.id} is not set up: Label Studio's /setup (or a "
                              "label_config in the request) must come first")
        return self.config(settings["label_config"])

    def current_model(self, st: ProjectState, config: LabelingConfig) -> ProjectModel | None:
        """The stored model, if it was fitted for this config (cached while its version holds)."""
        version = st.model_version()
        if version is None:
            return None
        cached = self._models.get(st.id)
        if cached is None or cached.version != version:
            stored = st.load_model()
            if stored is None:
                return None
            try:
                cached = ProjectModel.from_stored(*stored)
            except ModelFormatError:
                return None   # stored by an older version: the next refit replaces it
            self._models[st.id] = cached
        return cached if cached.config_fingerprint == config.fingerprint() else None

    def model_version(self, project, config: LabelingConfig | None = None) -> str:
        st = ProjectState(self.redis, project)
        config = config or self.project_config(st)
        model = self.current_model(st, config)
        return model.version if model is not None else no_model_version(config)

    # --- /setup ------------------------------------------------------------------------------
    def setup(self, project, label_config: str, hostname: str | None = None,
              access_token: str | None = None) -> str:
        """Check and store the project's config and Label Studio address; returns model_version."""
        config = self.config(label_config)
        st = ProjectState(self.redis, project)
        st.save_settings(label_config, hostname, access_token)
        if self.current_model(st, config) is None and st.load_model() is not None:
            self.schedule_refit(st)   # the config changed under a fitted model
        return self.model_version(project, config)

    # --- /predict ----------------------------------------------------------------------------
    def predict(self, tasks: list, project, label_config: str | None = None) -> list[dict]:
        """One prediction per task, in order, within Label Studio's timeout whatever the batch."""
        if not isinstance(tasks, list):
            raise ValueError("'tasks' must be a list of task objects")
        st = ProjectState(self.redis, project)
        config = self.project_config(st, label_config)
        settings = st.settings() or {}
        fetch = runtime.fetch_settings(settings)

        results: list[dict | None] = [None] * len(tasks)
        errors: dict[str, tuple[str, str]] = {}
        registry: dict[str, dict] = {}
        looked_up: list[tuple[int, str, str]] = []
        for i, task in enumerate(tasks):
            tid, source, problem = self._task_source(task, config)
            if problem is not None:
                if tid is not None:
                    errors[tid] = problem
                log.warning("project %s task %s: %s", st.id, tid, problem[1])
                continue
            try:
                identity = source_identity(source, fetch)
            except ImageError as exc:
                errors[tid] = (exc.kind, exc.message)
                continue
            registry[tid] = {"source": source, "identity": identity}
            looked_up.append((i, tid, identity))
        st.register_tasks(registry)
        cached = self.cache.lookup_many([identity for _, _, identity in looked_up])

        model = self.current_model(st, config)
        if model is None and any(r is not None and r.ok and r.faces for r in cached):
            model = self.ensure_model(st, config, inline=True)
        elif model is not None and self._grown(st, model):
            self.schedule_refit(st)
        version = model.version if model is not None else no_model_version(config)

        ready = [(i, tid, r) for (i, tid, _), r in zip(looked_up, cached) if r is not None and r.ok]
        face_predictions = self._face_predictions(model, [r for _, _, r in ready],
                                                  [tid for _, tid, _ in ready])
        shown = {}
        for (i, tid, result), faces in zip(ready, face_predictions):
            results[i], shown[tid] = build(result, faces, config, version)
        for (i, tid, _), result in zip(looked_up, cached):
            if result is not None and not result.ok:
                errors[tid] = (result.error, result.message)
        waiting = [(i, tid) for (i, tid, _), r in zip(looked_up, cached) if r is None]
        for i, _ in waiting:
            results[i] = pending(version + PENDING_SUFFIX)
        if waiting:
            # Label Studio stores these ~12 a second, maybe after the real predictions: the
            # workers look for stale placeholders while it may (a whole hour for a big answer).
            st.placeholders_given(len(waiting), PENDING_TTL)
            fresh = set(st.claim_pending([tid for _, tid in waiting], PENDING_TTL))
            todo = [(tid, registry[tid]["source"]) for _, tid in waiting if tid in fresh]
            if todo:
                from backend.predict_jobs import enqueue_predictions

                enqueue_predictions(self.redis, self.queue_name, st.id, todo, self.options, fetch,
                                    self.batch_size, self.fingerprint)
        st.remember_shown(shown)
        st.record_errors(errors)
        st.clear_errors(list(shown))
        # Whatever could not be read gets an empty result now (the reason is in st.errors()).
        return [r if r is not None else empty(version) for r in results]

    @staticmethod
    def _task_source(task, config: LabelingConfig):
        """(task id, image source, None) or (task id, None, (error kind, message))."""
        if not isinstance(task, dict):
            return None, None, ("bad_task", "a task is not a JSON object")
        if task.get("id") is None:
            return None, None, ("bad_task", "a task has no id")
        try:
            tid = str(label_studio_id(task["id"], "task"))
        except AnnotationError as exc:
            return None, None, ("bad_task", f"a task has {exc}")
        data = task.get("data")
        if not isinstance(data, dict):
            return tid, None, ("bad_task", f"task {tid}: 'data' must be an object, "
                                           f"not {type(data).__name__}")
        source = data.get(config.image_key)
        if not isinstance(source, str) or not source.strip():
            return tid, None, ("no_image", f"task {tid} has no {config.image_key!r} field in its data")
        return tid, source, None

    def _face_predictions(self, model: ProjectModel | None, results: list[ImageResult],
                          task_ids: list[str] | None = None):
        """Per image, the model's FacePredictions (None without a model), in one batched call.

        task_ids (parallel to results) let the model give its planned teaching score to faces it
        was fitted on."""
        if model is None:
            return [None] * len(results)
        counts = [len(r.faces) for r in results]
        per_face = [face_views(f) for r in results for f in r.faces]
        views = stack_views(per_face) if per_face else {"vector": np.zeros((0, 128))}
        keys = None
        if task_ids is not None:
            keys = [f"{tid}:{j}" for tid, r in zip(task_ids, results) for j in range(len(r.faces))]
        faces = model.predict(views, keys)
        out, start = [], 0
        for c in counts:
            out.append(faces[start:start + c])
            start += c
        return out

    def _grown(self, st: ProjectState, model: ProjectModel) -> bool:
        return self.redis.hlen(st.key("tasks")) >= 2 * max(model.n_tasks, 1)

    # --- the async path's second half ----------------------------------------------------------
    def post_predictions(self, project, task_ids: list[str], last_attempt: bool = False) -> dict:
        """Predict tasks whose faces the workers just computed and post them to Label Studio, the
        whole batch in one request where Label Studio takes it (backend/posting.py).

        A post that failed in a way that may pass counts in "retry" (the caller tries again later),
        unless this is the `last_attempt`: then, like any other failure, it is recorded as the
        task's error (the report lists it; the next "Retrieve predictions" asks for it again).
        """
        from backend import posting
        from backend.labelstudio import LabelStudio

        st = ProjectState(self.redis, project)
        config = self.project_config(st)
        url, token = runtime.label_studio_target(st.settings())
        registry = st.tasks(task_ids)
        ids = [str(t) for t in task_ids if str(t) in registry]
        results = self.cache.lookup_many([registry[t]["identity"] for t in ids])
        model = self.ensure_model(st, config, inline=True)
        version = model.version if model is not None else no_model_version(config)
        posted_before = st.posted_versions(ids)
        ok = [(tid, r) for tid, r in zip(ids, results) if r is not None and r.ok]
        faces = self._face_predictions(model, [r for _, r in ok], [tid for tid, _ in ok])
        faces_iter = iter(faces)
        errors, seen_by_task, todo, failures = {}, {}, [], []
        for tid, result in zip(ids, results):
            seen = None    # what the labeler will see, once it is in Label Studio
            if result is None:   # embedded a moment ago, yet not in the cache (evicted by Redis?)
                errors[tid] = ("not_cached", "no embedding in the cache after the job; see the "
                                             "worker's log and Redis' maxmemory policy")
                prediction = empty(version)
            elif not result.ok:
                errors[tid] = (result.error, result.message)
                prediction = empty(version)
            else:
                prediction, seen = build(result, next(faces_iter), config, version)
            if posted_before.get(tid) == version:
                pass   # a retried job: this one is in Label Studio already
            elif url is None:
                failures.append(f"task {tid}: no Label Studio URL (set LABEL_STUDIO_URL)")
                errors[tid] = ("post_failed", failures[-1])
                continue
            else:
                todo.append((tid, prediction))
            if seen is not None:
                seen_by_task[tid] = seen
        outcome = posting.Outcome()
        if todo:
            ls = LabelStudio(url, token, redis=self.redis)
            outcome = posting.send(ls, st, todo, last_attempt=last_attempt)
            failures += outcome.failures
            errors.update({tid: ("post_failed", why) for tid, why in outcome.errors.items()})
        unposted = set(outcome.errors) | ({tid for tid, _ in todo} - set(outcome.posted))
        shown = {tid: s for tid, s in seen_by_task.items() if tid not in unposted}
        st.remember_shown(shown)
        st.record_errors(errors)
        st.clear_errors(list(shown))
        st.release_pending(ids)
        if failures:
            log.warning("project %s: %d predictions not posted: %s", st.id, len(failures), failures[0])
        return {"project": st.id, "tasks": len(ids), "posted": len(outcome.posted),
                "version": version, "errors": len(errors), "failures": failures,
                "retry": outcome.retry, "requests": outcome.requests}

    # --- webhooks ----------------------------------------------------------------------------
    def record_event(self, action: str, payload: dict) -> dict:
        """Record a Label Studio webhook; queue a refit if it changed the confirmations.

        Quick by design (Label Studio waits 1 s): Redis reads and writes only, no fitting here.
        A payload Label Studio would never send raises AnnotationError / ConfigError / ValueError
        naming the field (a 400); in a bulk event, bad annotations are listed under "invalid" and
        the others recorded.
        """
        project = payload.get("project")
        if project is None:
            annotation = payload.get("annotation")
            project = annotation.get("project") if isinstance(annotation, dict) else None
        st = ProjectState(self.redis, project)
        summary = {"action": action, "project": st.id, "changed": 0, "ignored": 0, "refit": None}
        project_config = project.get("label_config") if isinstance(project, dict) else None

        if action == "PROJECT_UPDATED":
            xml = project_config
            if xml and xml != (st.settings() or {}).get("label_config"):
                self.config(xml)   # refuse a config we cannot serve, like /setup does
                st.save_settings(xml)
                summary["changed"] = 1
        elif action in ANNOTATION_EVENTS:
            config = self.project_config(st, project_config if not st.settings() else None)
            annotations = payload.get("annotation")
            tasks = payload.get("task")
            if not isinstance(annotations, list):
                annotations, tasks = [annotations], [tasks]
            if isinstance(tasks, list) and len(tasks) != len(annotations):
                raise ValueError(f"'task' lists {len(tasks)} tasks for {len(annotations)} annotations")
            tasks = tasks if isinstance(tasks, list) else [tasks] * len(annotations)
            invalid = []
            for annotation, task in zip(annotations, tasks):
                try:
                    changed = self._record_annotation(st, config, annotation, task)
                except AnnotationError as exc:
                    invalid.append(str(exc))
                    continue
                summary["changed" if changed else "ignored"] += 1
            if invalid:
                if len(invalid) == len(annotations):
                    raise AnnotationError("; ".join(invalid[:3]))
                summary["invalid"] = invalid
                log.warning("project %s: %d bad annotations in %s: %s", st.id, len(invalid),
                            action, invalid[0])
        elif action in DELETE_EVENTS:
            gone = payload.get("annotations")
            if gone is None:
                gone = [payload.get("annotation")]
            elif not isinstance(gone, list):
                # "123" would be read character by character: annotations 1, 2 and 3.
                raise AnnotationError(f"'annotations' must be a list, not {type(gone).__name__}")
            ids = []
            for annotation in gone:
                if annotation is None:
                    continue
                ids.append(label_studio_id(annotation, "deleted annotation"))
            for aid in ids:    # all checked first: a bad one deletes nothing
                summary["changed" if st.delete_annotation(aid) else "ignored"] += 1
        elif action == "START_TRAINING":
            summary["changed"] = 1
        else:
            summary["ignored"] = 1
        if summary["changed"]:
            summary["refit"] = self.schedule_refit(st)
        return summary

    def _record_annotation(self, st: ProjectState, config: LabelingConfig, annotation, task) -> bool:
        task = task if isinstance(task, dict) else {}
        record = parse_annotation(annotation, config, task_id=task.get("id"))
        tid = str(record.task_id)
        # A task labelled before it was ever predicted: remember its photo so refits can use it.
        data = task.get("data")
        source = data.get(config.image_key) if isinstance(data, dict) else None
        if isinstance(source, str) and source and not st.tasks([tid]):
            try:
                identity = source_identity(source, runtime.fetch_settings(st.settings()))
                st.register_tasks({tid: {"source": source, "identity": identity}})
            except ImageError as exc:
                st.record_errors({tid: (exc.kind, exc.message)})
        return st.record_annotation(record, st.shown(tid))

    def schedule_refit(self, st: ProjectState) -> str | None:
        from backend.refit import schedule_refit

        return schedule_refit(self.redis, self.queue_name, st.id, self.fingerprint)

    # --- refit -------------------------------------------------------------------------------
    def project_faces(self, st: ProjectState) -> ProjectFaces:
        registry = st.tasks()
        ids = sorted(registry, key=lambda t: int(t) if t.isdigit() else t)
        results = self.cache.lookup_many([registry[t]["identity"] for t in ids])
        vectors, per_face, faces = [], [], ProjectFaces(np.zeros((0, 128)), n_tasks=len(ids))
        for tid, result in zip(ids, results):
            if result is None or not result.ok or not result.faces:
                continue
            for j, face in enumerate(result.faces):
                faces.by_task.setdefault(tid, []).append(len(faces.rows))
                faces.rows.append((tid, j))
                faces.boxes.append(box_percent(face.box, result.width, result.height))
                faces.areas.append(float(face.width * face.height))
                vectors.append(face.vector)
                per_face.append(face_views(face))
        if vectors:
            faces.X = np.stack(vectors).astype(np.float64)
            # A view some faces lack (cached before it existed) is left out for the whole project.
            faces.views = stack_views(per_face)
        return faces

    def ensure_model(self, st: ProjectState, config: LabelingConfig, inline: bool = False):
        """The current model, fitted first when there is none for this config or the project has
        doubled since (inline: in this process for small projects; else queued)."""
        model = self.current_model(st, config)
        if model is not None and not self._grown(st, model):
            return model
        if inline and (model is not None or self.redis.hlen(st.key("tasks")) <= INLINE_FIT_TASKS):
            try:
                # With a model to answer with, do not wait long for a running refit; without one,
                # wait (bounded) for the first model rather than post names-less predictions.
                self.refit(st.id, only_if_needed=True,
                           wait=INLINE_LOCK_WAIT if model is not None else None)
            except LockBusy:   # a worker is refitting: answer with what we have, it will store its own
                return self.current_model(st, config) or model
            return self.current_model(st, config) or model
        self.schedule_refit(st)
        return model

    def refit(self, project, only_if_needed: bool = False, wait: float | None = None) -> dict:
        """Re-cluster (when the faces grew), re-name from confirmations, re-score; bump the version
        if the model changed. One at a time per project (a Redis lock), whichever process runs it.

        wait: seconds to wait for another refit's lock (default SUBDISC_REFIT_LOCK_WAIT), then
        LockBusy; also LockBusy when the lock lapsed before the result was stored (nothing stored).
        """
        st = ProjectState(self.redis, project)
        settings = st.settings()
        if not settings:
            return {"project": st.id, "status": "not set up"}
        config = self.config(settings["label_config"])
        # A short TTL renewed while we run: a killed refit frees it within a minute.
        with st.refit_lock(wait=wait) as lock:
            old = st.load_model()
            old_meta = old[1] if old is not None else {}
            if only_if_needed:
                current = self.current_model(st, config)
                if current is not None and not self._grown(st, current):
                    return {"project": st.id, "status": "up to date", "version": current.version}
            started = time.perf_counter()
            faces = self.project_faces(st)
            entries = st.annotations()
            labels, label_stats = confirmed_labels(entries, faces, config)

            clusterings = self._clusterings(st, len(faces.X))
            before = set(clusterings.fitted)
            views = faces.views or {"vector": faces.X}
            model = fit_project(views, labels, config, clusterings, self.prior, self.fingerprint,
                                n_tasks=faces.n_tasks, keys=[f"{t}:{j}" for t, j in faces.rows])
            if set(clusterings.fitted) != before:
                st.save_clusterings(clusterings.to_bytes(), {"n_faces": clusterings.n_faces,
                                                             "pipeline": self.fingerprint})

            content = model.content_hash()
            changed = content != old_meta.get("content_hash")
            number = int(old_meta.get("number", 0)) + int(changed)
            model.version = f"subdisc-{number}-{content[:6]}" if changed else old_meta["version"]
            if not lock.owned():   # lapsed during a Redis outage: another refit may be storing
                raise LockBusy(f"project {st.id}: the refit lock lapsed; this refit stored nothing")
            blob, meta = model.to_stored()
            digest = hashlib.sha256(repr(sorted((a, list(v)) for a, v in labels.items())).encode()).hexdigest()
            meta |= {"number": number, "labels_digest": digest, "label_stats": label_stats,
                     "seconds": round(time.perf_counter() - started, 3)}
            st.save_model(blob, meta)
            self._models[st.id] = model
            if changed or digest != old_meta.get("labels_digest"):
                st.append_history(history_entry(model, meta, acceptance(entries, config), changed))
        log.info("project %s refit: %s (%s) on %d faces in %.2fs", st.id, model.version,
                 "changed" if changed else "unchanged", len(faces.X), meta["seconds"])
        return {"project": st.id, "status": "changed" if changed else "unchanged",
                "version": model.version, "faces": len(faces.X), "seconds": meta["seconds"]}


    def _clusterings(self, st: ProjectState, n_faces: int) -> Clusterings:
        """The stored candidate clusterings, unless the project's faces have doubled since they
        were fitted (or come from another pipeline): then a fresh, empty set."""
        stored = st.load_clusterings()
        if stored is not None:
            blob, meta = stored
            if meta.get("pipeline") == self.fingerprint and n_faces < 2 * max(meta["n_faces"], 1):
                return Clusterings.from_bytes(blob, meta["n_faces"])
        return Clusterings(n_faces=n_faces)


def history_entry(model: ProjectModel, meta: dict, accepted: dict, changed: bool) -> dict:
    """One line of the refit history: per attribute, the choice and its honest scores."""
    attributes = {}
    for name, info in model.info.items():
        sel = info.get("selection") or {}
        scores = sel.get("scores") or {}
        attributes[name] = {
            "status": info["status"], "algo": info.get("algo"), "k": info.get("k"),
            "confirmations": sum(info["confirmations"].values()),
            "accuracy": scores.get("accuracy"), "balanced_accuracy": scores.get("balanced_accuracy"),
            "per_value": scores.get("per_value"),
            "coverage": info.get("coverage"),
            "shown_accuracy": (info.get("gate") or {}).get("shown_accuracy"),
            "view": info.get("view"),
            "shown": accepted.get(name, {}).get("shown", 0),
            "accepted": accepted.get(name, {}).get("accepted", 0)}
    return {"at": time.time(), "version": model.version, "changed": changed,
            "faces": model.n_faces, "tasks": model.n_tasks, "attributes": attributes}


"""Hostile input against the real HTTP server (gunicorn, real Redis): malformed JSON answers a 400
naming the field, never a 500; a task cannot make the backend read files outside its roots.

The property-based tests (hypothesis) throw generated JSON, free-form and Label-Studio-shaped with
any field replaced by any JSON, at /predict, /setup and /webhook.
"""
from __future__ import annotations

import json
import os
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.backend.helpers import TWO_ATTRIBUTES, ls_annotation, webhook
from tests.backend.test_server import PROJECT, ls_task, serve

BOX = (20, 40, 120, 160)


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """A photo folder the backend may read (its only root), and a photo outside it."""
    base = tmp_path_factory.mktemp("hostile")
    inside, outside = base / "photos", base / "elsewhere"
    inside.mkdir()
    outside.mkdir()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(inside / "in.jpg")
    Image.new("RGB", (64, 48), (30, 200, 30)).save(outside / "secret.jpg")
    (outside / "notes.txt").write_text("not an image")
    return inside, outside


@pytest.fixture(scope="module")
def backend(redis_url, roots):
    # The tests' temp dirs are no root here: only the photo folder is.
    with serve(redis_url, SUBDISC_LOCAL_FILES_ROOT=str(roots[0]), SUBDISC_EXTRA_ROOTS="",
               SUBDISC_QUEUE="subdisc-hostile") as server:
        yield server


@pytest.fixture(autouse=True)
def set_up(backend, redis_conn):
    """Each test starts on an emptied Redis (redis_conn) with the project set up."""
    assert backend.setup(TWO_ATTRIBUTES).status_code == 200


def no_tracebacks(backend):
    text = backend.log.read_text()
    assert "Traceback" not in text, text[text.index("Traceback") - 300:][:3000]


# --- the malformed inputs of issue 11, item 6 ---------------------------------------------------

def test_deeply_nested_json_is_a_400(backend):
    for depth in (100, 1_000, 5_000):
        body = '{"tasks": ' + "[" * depth + "]" * depth + "}"
        r = backend.http.post(backend.url + "/predict", data=body,
                              headers={"Content-Type": "application/json"}, timeout=30)
        assert r.status_code == 400 and "nested too deeply" in r.json()["error"], (depth, r.text)
    no_tracebacks(backend)


@pytest.mark.parametrize("route, body, field", [
    ("/predict", {"tasks": [ls_task(1, "x.jpg")], "project": PROJECT, "label_config": 5}, "label_config"),
    ("/predict", {"tasks": [ls_task(1, "x.jpg")], "project": PROJECT, "label_config": ["<View/>"]},
     "label_config"),
    ("/predict", {"tasks": {"id": 1}, "project": PROJECT}, "tasks"),
    ("/predict", {"tasks": [], "project": PROJECT, "params": [1]}, "params"),
    ("/setup", {"project": PROJECT, "schema": 5}, "schema"),
    ("/setup", {"project": PROJECT, "schema": ["<View/>"]}, "schema"),
    ("/setup", {"project": PROJECT, "schema": TWO_ATTRIBUTES, "hostname": ["http://x"]}, "hostname"),
    ("/webhook", {"action": "PROJECT_UPDATED", "project": {"id": 1, "label_config": 5}},
     "labeling config"),
    ("/webhook", {"action": "PROJECT_UPDATED", "project": {"id": 1, "label_config": ["<View/>"]}},
     "labeling config"),
    ("/webhook", {"action": "ANNOTATION_CREATED", "project": {"id": 77, "label_config": 5},
                  "annotation": {"id": 1, "task": 1, "result": []}, "task": {"id": 1}},
     "labeling config"),
])
def test_a_malformed_field_is_a_400_naming_it(backend, route, body, field):
    r = backend.post(route, body)
    assert r.status_code == 400 and field in r.json()["error"], r.text
    no_tracebacks(backend)


def test_malformed_annotations_are_refused_naming_the_field(backend):
    def created(annotation, task=None):
        return backend.post("/webhook", webhook("ANNOTATION_CREATED", annotation,
                                                task or {"id": 1, "data": {"image": "x.jpg"}}))

    good = ls_annotation(501, 1, [(BOX, {"gender": "male"})])
    value_list = json.loads(json.dumps(good))
    value_list["result"][0]["value"] = [1, 2]
    r = created(value_list)
    assert r.status_code == 400 and "result[0].value must be an object" in r.json()["error"]
    chars = json.loads(json.dumps(good))
    chars["result"][1]["value"]["choices"] = "male"       # would match "m", "a", "l", "e" ...
    r = created(chars)
    assert r.status_code == 400 and "choices must be a list of strings" in r.json()["error"]
    r = created(dict(good, result="abc"))
    assert r.status_code == 400 and "'result' must be a list" in r.json()["error"]
    for bad_id in ("1e3", " 7", True, 1.5, 2**63, "9" * 5000, [1]):
        r = created(dict(good, id=bad_id))
        assert r.status_code == 400 and "annotation id" in r.json()["error"], bad_id
    # task.data a list: the annotation is still recorded (its photo just is not registered).
    r = created(good, {"id": 1, "data": ["x.jpg"]})
    assert r.status_code == 200 and r.json()["changed"] == 1
    no_tracebacks(backend)


def test_absurd_timestamps_do_not_freeze_an_annotation(backend, redis_conn):
    task = {"id": 2, "data": {"image": "x.jpg"}}

    def send(updated_at, gender):
        ann = ls_annotation(601, 2, [(BOX, {"gender": gender})], updated_at=updated_at)
        return backend.post("/webhook", webhook("ANNOTATION_UPDATED", ann, task))

    for absurd in (1e308, "9999-12-31T23:59:59Z", -5, "1e308", float("nan")):
        body = webhook("ANNOTATION_UPDATED", ls_annotation(601, 2, [(BOX, {"gender": "male"})]), task)
        body["annotation"]["updated_at"] = absurd
        r = backend.http.post(backend.url + "/webhook", data=json.dumps(body),
                              headers={"Content-Type": "application/json"}, timeout=30)
        assert r.status_code == 400 and "updated_at" in r.json()["error"], (absurd, r.text)
    assert send("2024-05-01T10:00:00Z", "male").json()["changed"] == 1
    assert send("2024-05-02T10:00:00Z", "female").json()["changed"] == 1   # the later update wins
    stored = json.loads(redis_conn.hget("subdisc:v1:project:1:annotations", "601"))
    assert stored["regions"][0]["values"] == {"gender": "female"}


def test_deleted_annotations_must_be_a_list_of_ids(backend, redis_conn):
    task = {"id": 3, "data": {"image": "x.jpg"}}
    for aid in (1, 2, 3):
        ann = ls_annotation(aid, 3, [(BOX, {"gender": "male"})])
        assert backend.post("/webhook", webhook("ANNOTATION_CREATED", ann, task)).status_code == 200
    r = backend.post("/webhook", {"action": "ANNOTATIONS_DELETED", "annotations": "123",
                                  "project": {"id": 1}})
    assert r.status_code == 400 and "'annotations' must be a list" in r.json()["error"]
    r = backend.post("/webhook", {"action": "ANNOTATIONS_DELETED", "project": {"id": 1},
                                  "annotations": [{"id": 1}, {"id": "x"}]})
    assert r.status_code == 400 and "deleted annotation id" in r.json()["error"]
    live = redis_conn.hkeys("subdisc:v1:project:1:annotations")
    assert {b"1", b"2", b"3"} <= set(live)                 # nothing deleted by the refused ones
    r = backend.post("/webhook", {"action": "ANNOTATIONS_DELETED", "project": {"id": 1},
                                  "annotations": [{"id": 2}]})
    assert r.status_code == 200 and r.json()["changed"] == 1
    assert b"2" not in redis_conn.hkeys("subdisc:v1:project:1:annotations")
    # Annotation 2 may come back later (a new id would be usual, but nothing is stuck).
    ann = ls_annotation(1, 3, [(BOX, {"gender": "female"})], updated_at="2024-06-01T00:00:00Z")
    assert backend.post("/webhook", webhook("ANNOTATION_UPDATED", ann, task)).json()["changed"] == 1


def test_bad_tasks_in_predict_are_errors_of_their_own(backend, redis_conn, roots):
    inside, _ = roots
    tasks = [ls_task(11, str(inside / "in.jpg")),
             dict(ls_task(12, "x"), data=["x.jpg"]), dict(ls_task(13, "x"), data="x.jpg"),
             dict(ls_task(14, "x"), id={"a": 1}), dict(ls_task(15, "x"), id="1" * 40), "a task"]
    r = backend.predict(tasks, TWO_ATTRIBUTES)
    assert r.status_code == 200 and len(r.json()["results"]) == 6
    errors = json.loads(redis_conn.hget("subdisc:v1:project:1:errors", "12") or "null")
    assert errors["error"] == "bad_task" and "'data' must be an object" in errors["message"]
    assert b"subdisc:v1:project:1:errors" in redis_conn.keys()
    assert set(redis_conn.hkeys("subdisc:v1:project:1:errors")) >= {b"12", b"13"}
    no_tracebacks(backend)


# --- local reads (item 2) ------------------------------------------------------------------------

def test_a_task_cannot_read_outside_the_roots(backend, redis_conn, roots):
    inside, outside = roots
    sources = {31: "/etc/shadow", 32: "/etc/passwd", 33: "/dev/zero",
               34: os.path.expanduser("~/.ssh/id_rsa"), 35: f"file://{outside / 'secret.jpg'}",
               36: str(outside / "secret.jpg"), 37: str(outside / "notes.txt"),
               38: str(outside / "absent.jpg"), 39: str(inside / ".." / "elsewhere" / "secret.jpg"),
               40: "/data/local-files/?d=../elsewhere/secret.jpg"}
    r = backend.predict([ls_task(t, s) for t, s in sources.items()] +
                        [ls_task(41, str(inside / "in.jpg"))], TWO_ATTRIBUTES)
    assert r.status_code == 200
    raw = redis_conn.hgetall("subdisc:v1:project:1:errors")
    errors = {int(k): json.loads(v) for k, v in raw.items() if int(k) in sources}
    assert set(errors) == set(sources)
    # One kind, one message: no telling which of these files exist.
    assert {e["error"] for e in errors.values()} == {"forbidden_path"}
    assert len({e["message"].replace(repr(sources[t]), "") for t, e in errors.items()}) == 1
    # Nothing outside was registered or queued for the workers; the photo inside was.
    registered = {int(t) for t in redis_conn.hkeys("subdisc:v1:project:1:tasks")}
    assert not registered & set(sources) and 41 in registered
    queued = b" ".join(redis_conn.lrange("rq:queue:subdisc-hostile", 0, -1))
    jobs = [redis_conn.hget(b"rq:job:" + j, "data") or b"" for j in queued.split()]
    assert not any(b"secret" in j or b"shadow" in j for j in jobs)


# --- property-based: generated JSON, never a 500 ---------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) |
    st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children,
                                                                       max_size=4),
    max_leaves=12)


def replace_somewhere(base: dict):
    """`base` with one field (at any depth) replaced by generated JSON, or removed."""
    paths = []

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                paths.append(path + [k])
                walk(v, path + [k])
        elif isinstance(node, list):
            for i, v in enumerate(node):
                paths.append(path + [i])
                walk(v, path + [i])
    walk(base, [])

    @st.composite
    def strategy(draw):
        doc = json.loads(json.dumps(base))
        for _ in range(draw(st.integers(1, 3))):
            path = draw(st.sampled_from(paths))
            node = doc
            try:
                for key in path[:-1]:
                    node = node[key]
                if draw(st.booleans()) and isinstance(node, dict):
                    node.pop(path[-1], None)
                else:
                    node[path[-1]] = draw(json_values)
            except (KeyError, IndexError, TypeError):
                pass     # an earlier replacement removed this path
        return doc
    return strategy()


ANNOTATION = ls_annotation(901, 5, [(BOX, {"gender": "male", "glasses": "no"})], whole=None)
SHAPES = {
    "/predict": {"tasks": [ls_task(5, "/data/upload/1/x.jpg"), ls_task(6, "x.jpg")],
                 "project": PROJECT, "label_config": TWO_ATTRIBUTES, "params": {"login": None}},
    "/setup": {"project": PROJECT, "schema": TWO_ATTRIBUTES, "hostname": "http://ls.invalid",
               "access_token": "t", "model_version": None},
    "/webhook": webhook("ANNOTATION_CREATED", ANNOTATION, {"id": 5, "data": {"image": "x.jpg"}},
                        label_config=TWO_ATTRIBUTES),
}
WEBHOOK_FORMS = [
    SHAPES["/webhook"],
    {"action": "ANNOTATIONS_CREATED", "annotation": [ANNOTATION], "task": [{"id": 5}],
     "project": {"id": 1}},
    {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 901}], "project": {"id": 1}},
    {"action": "PROJECT_UPDATED", "project": {"id": 1, "label_config": TWO_ATTRIBUTES}},
]
ROUTES = ["/predict", "/setup", "/webhook"]
budget = settings(max_examples=int(os.environ.get("SUBDISC_HYPOTHESIS_EXAMPLES", "150")),
                  deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                         HealthCheck.too_slow])
seen = {"requests": 0, "by_status": {}}


def check(backend, route, body):
    r = backend.http.post(backend.url + route, data=json.dumps(body),
                          headers={"Content-Type": "application/json"}, timeout=60)
    seen["requests"] += 1
    seen["by_status"][r.status_code] = seen["by_status"].get(r.status_code, 0) + 1
    assert r.status_code < 500, (route, body, r.text)
    if r.status_code >= 400:
        assert isinstance(r.json().get("error"), str) and r.json()["error"]


@budget
@given(route=st.sampled_from(ROUTES), body=st.dictionaries(st.text(max_size=12), json_values,
                                                           max_size=6))
def test_free_form_json_objects_never_a_500(backend, route, body):
    check(backend, route, body)


@budget
@given(body=replace_somewhere(SHAPES["/predict"]))
def test_predict_shaped_json_never_a_500(backend, body):
    check(backend, "/predict", body)


@budget
@given(body=replace_somewhere(SHAPES["/setup"]))
def test_setup_shaped_json_never_a_500(backend, body):
    check(backend, "/setup", body)


@budget
@given(data=st.data())
def test_webhook_shaped_json_never_a_500(backend, data):
    form = data.draw(st.sampled_from(WEBHOOK_FORMS))
    check(backend, "/webhook", data.draw(replace_somewhere(form)))


def test_no_traceback_after_the_generated_inputs(backend):
    """Runs after the property tests (file order): the server logged no unhandled error."""
    print(f"generated requests: {seen['requests']}, answers by status: {seen['by_status']}")
    no_tracebacks(backend)

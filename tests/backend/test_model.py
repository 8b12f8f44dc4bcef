"""The project model end to end on a real Redis: clusters, names from confirmations, scores, refits.

Faces are synthetic vectors in two groups (a gender-like split), cached like the workers cache real
ones, so every expected figure below is known by construction.
"""
import numpy as np
import pytest
from label_studio_sdk.label_interface import LabelInterface
from rq import Queue

from backend.attributes.centroids import CentroidModel, fit_attribute
from backend.confirmations import acceptance, confirmed_labels
from backend.model import PENDING_SUFFIX, ProjectFaces, SubdiscModel, no_model_version
from backend.labeling_config import ConfigError, parse
from backend.attributes.selection import Candidate, select
from backend.state import ProjectState
from workers.pipeline import PipelineOptions, fingerprint

from tests.backend.helpers import TWO_ATTRIBUTES, group_vectors, ls_annotation, webhook

BOX = (20, 40, 120, 160)   # where CachedPhotos puts a photo's first face


def _project(cached_photos, redis_conn, centres, per_group):
    """2 x per_group one-face photos: tasks 1..per_group 'male' (group 0), the rest 'female'
    (group 1); tasks 1 and per_group + 1 hold each group's exact centre."""
    rng = np.random.default_rng(3)
    vectors = np.concatenate([centres[0][None], group_vectors(rng, centres[0], per_group - 1),
                              centres[1][None], group_vectors(rng, centres[1], per_group - 1)])
    tasks = [{"id": i + 1, "data": {"image": cached_photos.photo(v)}, "annotations": [],
              "predictions": []} for i, v in enumerate(vectors)]
    model = SubdiscModel(redis_conn, queue_name="subdisc-test")
    model.setup("1.1714000000", TWO_ATTRIBUTES, "http://ls.invalid:8080", "secret")
    truth = {t["id"]: ("male" if t["id"] <= per_group else "female") for t in tasks}
    return model, tasks, truth


@pytest.fixture
def project(cached_photos, redis_conn, centres):
    """16 photos, 8 per group: 12 confirmations (the held-out faces a gate needs) leave 4 others."""
    return _project(cached_photos, redis_conn, centres, 8)


@pytest.fixture
def small_project(cached_photos, redis_conn, centres):
    """12 photos, 6 per group: 3 diversity clusters, one holding each group's exact centre."""
    return _project(cached_photos, redis_conn, centres, 6)


def confirm(model, task, aid, gender, updated="2024-05-01T10:00:00Z", action="ANNOTATION_CREATED"):
    ann = ls_annotation(aid, task["id"], [(BOX, {"gender": gender})], updated_at=updated)
    return model.record_event(action, webhook(action, ann, task))


def values(prediction, name):
    return [r["value"]["choices"][0] for r in prediction["result"] if r["from_name"] == name]


def test_before_confirmations_boxes_only_and_cluster_centres_first(small_project):
    model, tasks, truth = small_project
    results = model.predict(tasks, "1.1714000000")
    version = model.model_version(1)
    assert version.startswith("subdisc-1-") and version != no_model_version(parse(TWO_ATTRIBUTES))
    assert all(r["model_version"] == version for r in results)
    assert all([x["type"] for x in r["result"]] == ["rectanglelabels"] for r in results)
    # The teaching order: the first two tasks hold one face of each group (the top split first),
    # the first a most typical face; a strict ranking (one task after the other, the first at 1).
    order = sorted(range(len(tasks)), key=lambda i: -results[i]["score"])
    assert {truth[tasks[i]["id"]] for i in order[:2]} == {"male", "female"}
    assert tasks[order[0]]["id"] in (1, 7) and results[order[0]]["score"] == 1.0
    assert len({r["score"] for r in results}) == len(results)


FOUR = [0, 1, 8, 9]
MORE = [2, 3, 4, 5, 10, 11, 12, 13]   # with FOUR, the 12 held-out faces a gate needs (MIN_SHOWN)


def test_confirmations_name_the_clusters_and_bump_the_version(project, redis_conn):
    model, tasks, truth = project
    model.predict(tasks, 1)
    v1 = model.model_version(1)
    for aid, i in enumerate(FOUR, start=100):
        summary = confirm(model, tasks[i], aid, truth[tasks[i]["id"]])
        assert summary["changed"] == 1
    assert summary["refit"] is None   # one refit queued for all four events (the first queued it)
    assert len(Queue("subdisc-test", connection=redis_conn)) == 1

    # Four confirmations name the clusters right, but four held-out answers cannot show that the
    # model beats guessing: the attribute stays silent (boxes only).
    model.refit(1)
    info = ProjectState(redis_conn, 1).load_model()[1]["info"]
    assert info["gender"]["status"] == "silent"
    assert info["gender"]["selection"]["scores"]["accuracy"] == 1.0
    assert all(values(r, "gender") == [] for r in model.predict(tasks, 1))

    for aid, i in enumerate(MORE, start=104):
        confirm(model, tasks[i], aid, truth[tasks[i]["id"]])
    assert model.refit(1)["status"] == "changed"
    v2 = model.model_version(1)
    assert v2 != v1 and v2.startswith("subdisc-3-")
    results = model.predict(tasks, 1)
    assert [values(r, "gender")[0] for r in results] == [truth[t["id"]] for t in tasks]
    assert all(values(r, "glasses") == [] for r in results)   # no confirmation: boxes only
    for r in results:
        assert LabelInterface(TWO_ATTRIBUTES).validate_prediction(r, return_errors=True) == []
    info = ProjectState(redis_conn, 1).load_model()[1]["info"]
    assert info["gender"]["status"] == "shown" and info["glasses"]["status"] == "collecting"
    assert info["gender"]["confirmations"] == {"male": 6, "female": 6}
    assert info["gender"]["selection"]["scores"]["accuracy"] == 1.0
    assert info["gender"]["coverage"] == 1.0   # the 4 faces not confirmed all get a value

    # The same events again (replays), or an older update arriving late: nothing changes.
    for aid, i in enumerate(FOUR + MORE, start=100):
        assert confirm(model, tasks[i], aid, truth[tasks[i]["id"]])["changed"] == 0
    assert confirm(model, tasks[0], 100, "female", updated="2024-04-01T00:00:00Z",
                   action="ANNOTATION_UPDATED")["changed"] == 0
    history = len(ProjectState(redis_conn, 1).history())
    assert model.refit(1)["status"] == "unchanged" and model.model_version(1) == v2
    assert len(ProjectState(redis_conn, 1).history()) == history   # a no-op refit is not history

    # Deleting the male confirmations leaves one value: back to boxes only, a new version.
    deleted = model.record_event("ANNOTATIONS_DELETED", {"action": "ANNOTATIONS_DELETED",
                                                         "annotations": [{"id": a} for a in
                                                                         (100, 101, 104, 105,
                                                                          106, 107)],
                                                         "project": {"id": 1}})
    assert deleted["changed"] == 6
    model.refit(1)
    assert model.model_version(1) not in (v1, v2)
    assert all(values(r, "gender") == [] for r in model.predict(tasks, 1))


def test_cross_validated_scores_match_a_hand_computation(project, redis_conn):
    """All 16 faces confirmed, one 'male' face labelled 'female': whatever the folds, every held-out
    face gets its group's name, so the mislabelled one alone is wrong: 15/16."""
    model, tasks, truth = project
    model.predict(tasks, 1)
    for i, task in enumerate(tasks):
        label = "female" if task["id"] == 3 else truth[task["id"]]
        confirm(model, task, 200 + i, label)
    model.refit(1)
    sel = ProjectState(redis_conn, 1).load_model()[1]["info"]["gender"]["selection"]
    # All perfect but for the mislabel: the three simplest of the best, simplest first.
    assert sel["chosen"].startswith("committee:clusters:kmeans:2+"), sel["chosen"]
    assert all(sel["cv"][k] == max(sel["cv"].values()) for k in sel["chosen"][10:].split("+"))
    assert sel["scores"]["accuracy"] == pytest.approx(15 / 16)
    assert sel["scores"]["values"] == ["female", "male"]
    assert sel["scores"]["confusion"] == [[8, 1], [0, 7]]
    assert sel["scores"]["per_value"] == pytest.approx({"female": 8 / 9, "male": 1.0})
    # 2k <= 16 faces; mixtures at k = 2 only; every supervised learner on every view.
    assert {"clusters:kmeans:2", "clusters:gmm:2", "clusters:kmeans:4", "mean:vector", "logreg:vector",
            "spread:vector"} <= set(sel["cv"])


def test_a_saved_prior_names_clusters_before_any_confirmation(project, redis_conn, centres):
    model, tasks, truth = project
    rng = np.random.default_rng(11)
    X = np.concatenate([group_vectors(rng, centres[0], 20), group_vectors(rng, centres[1], 20)])
    labels = ["male"] * 20 + ["female"] * 20
    prior = CentroidModel({"gender": fit_attribute(X, labels, "gender", "kmeans", k=2, runs=1)},
                          fingerprint(PipelineOptions()))
    with_prior = SubdiscModel(redis_conn, queue_name="subdisc-test", prior=prior)
    results = with_prior.predict(tasks, 1)
    assert [values(r, "gender")[0] for r in results] == [truth[t["id"]] for t in tasks]
    assert ProjectState(redis_conn, 1).load_model()[1]["info"]["gender"]["status"] == "prior"

    # A prior fitted on vectors of another pipeline is ignored, not misapplied.
    other = CentroidModel(prior.attributes, "0123456789abcdef")
    redis_conn.delete(ProjectState(redis_conn, 1).key("model_version"))
    results = SubdiscModel(redis_conn, queue_name="subdisc-test", prior=other).predict(tasks, 1)
    assert all(values(r, "gender") == [] for r in results)


def test_uncached_tasks_are_queued_once_and_answered_as_pending(project, redis_conn, tmp_path):
    model, tasks, _ = project
    (tmp_path / "new.jpg").write_bytes(b"not computed yet")
    new = [{"id": 50, "data": {"image": str(tmp_path / "new.jpg")}},
           {"id": 51, "data": {"image": str(tmp_path / "missing.jpg")}},
           {"id": 52, "data": {"other": "x"}}]
    results = model.predict(tasks[:1] + new, 1)
    version = model.model_version(1)
    assert results[0]["model_version"] == version and results[0]["result"]
    assert results[1] == {"result": [], "score": None, "model_version": version + PENDING_SUFFIX}
    # Unreadable sources are answered (empty, current version) and the reason recorded.
    assert results[2] == results[3] == {"result": [], "score": 0.0, "model_version": version}
    errors = ProjectState(redis_conn, 1).errors()
    assert errors["51"]["error"] == "not_found" and errors["52"]["error"] == "no_image"
    queue = Queue("subdisc-test", connection=redis_conn)
    assert len(queue) == 1                                   # one job: embed, then post
    assert queue.jobs[0].func_name == "backend.predict_jobs.predict_batch"
    assert queue.jobs[0].args[1:3] == (["50"], [str(tmp_path / "new.jpg")])
    model.predict(new[:1], 1)
    assert len(queue) == 1   # still in flight: not queued twice


def test_a_refit_job_reads_the_cache_entries_its_scheduler_reads(project, redis_conn):
    """The job carries the scheduler's pipeline fingerprint (a worker's own options may differ)."""
    model, _, _ = project
    queue = Queue("subdisc-test", connection=redis_conn)
    queue.empty()
    assert model.schedule_refit(ProjectState(redis_conn, 1)) is not None
    job = queue.jobs[0]
    assert job.func_name == "backend.refit.refit_project"
    assert job.args == ("1", model.fingerprint)


def test_a_config_we_cannot_serve_is_refused_at_setup(redis_conn):
    model = SubdiscModel(redis_conn, queue_name="subdisc-test")
    with pytest.raises(ConfigError, match="RectangleLabels"):
        model.setup(2, "<View><Image name='i' value='$i'/><Choices name='g' toName='i' "
                       "perRegion='true'><Choice value='a'/><Choice value='b'/></Choices></View>")
    with pytest.raises(ConfigError, match="not set up"):
        model.predict([{"id": 1, "data": {"i": "x.jpg"}}], 2)


def test_labels_follow_box_overlap_not_order():
    config = parse(TWO_ATTRIBUTES)
    faces = ProjectFaces(np.zeros((2, 128)), rows=[("5", 0), ("5", 1)],
                         boxes=[(10, 10, 20, 30), (60, 10, 20, 30)], areas=[600, 600],
                         by_task={"5": [0, 1]})
    # The labeler's boxes, listed in the other order, shifted a little, plus one with no face under it.
    entry = {"annotation_id": 1, "task_id": 5, "updated_at": 1.0, "whole": {}, "cancelled": False,
             "regions": [{"box": [61, 11, 19, 29], "values": {"gender": "female"}},
                         {"box": [9, 10, 21, 31], "values": {"gender": "male", "glasses": "yes"}},
                         {"box": [40, 60, 10, 10], "values": {"gender": "male"}}]}
    labels, stats = confirmed_labels([entry], faces, config)
    assert list(labels["gender"]) == ["male", "female"] and list(labels["glasses"]) == ["yes", None]
    assert stats["unmatched"] == 1
    # A later annotation of the same task replaces it; a skipped one does not.
    later = entry | {"annotation_id": 2, "updated_at": 2.0,
                     "regions": [{"box": [10, 10, 20, 30], "values": {"gender": "female"}}]}
    skipped = entry | {"annotation_id": 3, "updated_at": 3.0, "cancelled": True, "regions": []}
    labels, _ = confirmed_labels([entry, later, skipped], faces, config)
    assert list(labels["gender"]) == ["female", None]


def test_accepted_as_is_counts_kept_values_only():
    config = parse(TWO_ATTRIBUTES)
    shown = {"version": "v", "whole": {}, "faces": [
        {"box": [10, 10, 20, 30], "values": {"gender": "male", "glasses": "no"}},
        {"box": [60, 10, 20, 30], "values": {"gender": "female"}}]}
    entry = {"annotation_id": 1, "task_id": 5, "updated_at": 1.0, "whole": {}, "cancelled": False,
             "shown": shown,
             "regions": [{"box": [10, 10, 20, 30], "values": {"gender": "male", "glasses": "yes"}}]}
    # face 1: gender kept, glasses changed; face 2 deleted by the labeler.
    assert acceptance([entry], config) == {"gender": {"shown": 2, "accepted": 1},
                                           "glasses": {"shown": 1, "accepted": 0}}


def test_selection_prefers_the_clustering_that_predicts_held_out_labels():
    y = np.array(["a"] * 6 + ["b"] * 6, dtype=object)
    good = Candidate("good", 2, np.array([0] * 6 + [1] * 6))
    noisy = Candidate("noisy", 2, np.array([0, 1] * 6))
    sel = select([noisy, good], y)
    assert sel.chosen == "good" and sel.cv["good"] == 1.0 and sel.scores.accuracy == 1.0
    assert sel.cv["noisy"] <= 0.5 and sel.folds == 5
    with pytest.raises(ValueError, match="two values"):
        select([good], np.array(["a", "a", "b", None], dtype=object))


def test_report_coverage_and_accuracy_when_shown_by_hand(project, redis_conn):
    """12 of 16 faces confirmed (6 per value), glasses never: gender is shown on the 4 others
    (coverage 4/4), its held-out values were right 12 times of 12; glasses shows nothing (0/16)."""
    from backend import project_report

    model, tasks, truth = project
    model.predict(tasks, 1)
    for aid, i in enumerate(FOUR + MORE, start=300):
        confirm(model, tasks[i], aid, truth[tasks[i]["id"]])
    model.refit(1)
    results = model.predict(tasks, 1)
    confirmed = {tasks[i]["id"] for i in FOUR + MORE}
    others = [r for t, r in zip(tasks, results) if t["id"] not in confirmed]
    shown = sum(bool(values(r, "gender")) for r in others)
    report = project_report.build(redis_conn, 1)
    g, gl = report["attributes"]["gender"], report["attributes"]["glasses"]
    assert shown == 4 and g["coverage"] == shown / len(others) == 1.0
    assert g["status"] == "shown" and g["shown_accuracy"] == 12 / 12 and g["shown_coverage_cv"] == 1.0
    assert g["majority_baseline"] == 0.5
    assert gl["status"] == "collecting" and gl["coverage"] == 0.0
    assert sum(bool(values(r, "glasses")) for r in results) == 0
    text = project_report.text(report)
    assert "shown: accuracy (CV)" in text and "coverage" in text
    line = next(l for l in text.splitlines() if l.split()[:2] == ["gender", "shown"])
    assert "100.0%" in line
    # The model column names what predicts: a committee by its members.
    members = g["chosen"].split(":", 1)[1].split("+")
    assert g["algo"] == "committee" and "mean of " + ", ".join(members) in line
    assert "coverage" in project_report.render_html(report)
    # The confirmations queued refits no worker runs here; while one runs as well, the report
    # says both (its figures are about to change).
    assert report["refit_queued"] and not report["refit_running"]
    assert text.splitlines()[0].endswith("(a refit is queued)")
    with ProjectState(redis_conn, 1).refit_lock(ttl=5.0, wait=0.1):
        report = project_report.build(redis_conn, 1)
    assert report["refit_running"] and report["refit_queued"]
    first_line = project_report.text(report).splitlines()[0]
    assert first_line.endswith("(a refit is running, another is queued)")
    ProjectState(redis_conn, 1).refit_started()
    report = project_report.build(redis_conn, 1)
    assert not report["refit_queued"] and "refit is" not in project_report.text(report).splitlines()[0]
    assert "refit is" not in project_report.render_html(report)

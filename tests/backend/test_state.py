"""Project state in a real Redis: idempotent confirmations, settings, async-path bookkeeping."""
import threading

import pytest

from backend.annotations import AnnotationRecord, Region
from backend.state import ProjectState, project_id


def record(aid, t, value="male", task=5):
    return AnnotationRecord(aid, task, t, [Region((10, 10, 20, 20), {"gender": value})])


@pytest.mark.parametrize("given, expected", [(12, "12"), ("12", "12"), ("12.1700000000", "12"),
                                              ({"id": 7, "title": "x"}, "7")])
def test_project_ids_in_every_form_label_studio_sends(given, expected):
    assert project_id(given) == expected


@pytest.mark.parametrize("bad", [None, "", "abc", {"title": "no id"}])
def test_a_bad_project_reference_is_refused(bad):
    with pytest.raises(ValueError, match="project id"):
        project_id(bad)


def test_replays_and_older_updates_change_nothing(redis_conn):
    st = ProjectState(redis_conn, "3")
    assert st.record_annotation(record(1, 100.0, "male")) is True
    assert st.record_annotation(record(1, 100.0, "male")) is False          # replay
    assert st.record_annotation(record(1, 200.0, "female")) is True         # newer update
    assert st.record_annotation(record(1, 150.0, "male")) is False          # late, older update
    (entry,) = st.annotations()
    assert entry["regions"][0]["values"] == {"gender": "female"} and entry["updated_at"] == 200.0


def test_a_deleted_annotation_stays_deleted(redis_conn):
    st = ProjectState(redis_conn, "3")
    st.record_annotation(record(1, 100.0))
    st.record_annotation(record(2, 100.0, task=6))
    assert st.delete_annotation(1) is True
    assert st.delete_annotation(1) is False
    assert st.record_annotation(record(1, 300.0)) is False   # a replayed create after the delete
    assert [e["annotation_id"] for e in st.annotations()] == [2]


def test_concurrent_updates_keep_the_newest(redis_conn):
    st = ProjectState(redis_conn, "4")
    times = list(range(1, 41))
    threads = [threading.Thread(target=st.record_annotation, args=(record(9, float(t), str(t)),))
               for t in reversed(times)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (entry,) = st.annotations()
    assert entry["updated_at"] == 40.0 and entry["regions"][0]["values"] == {"gender": "40"}


def test_settings_keep_earlier_host_and_token(redis_conn):
    st = ProjectState(redis_conn, "5")
    assert st.settings() is None
    st.save_settings("<View/>", "http://ls:8080", "tok")
    st.save_settings("<View><Image/></View>")
    s = st.settings()
    assert (s["label_config"], s["hostname"], s["access_token"]) == ("<View><Image/></View>",
                                                                     "http://ls:8080", "tok")
    assert ProjectState.projects(redis_conn) == ["5"]
    assert ProjectState(redis_conn, "5.1700000000").settings() == s


def test_pending_tasks_are_claimed_once_until_released(redis_conn):
    st = ProjectState(redis_conn, "6")
    assert st.claim_pending([1, 2, 3], ttl=60) == ["1", "2", "3"]
    assert st.claim_pending([2, 3, 4], ttl=60) == ["4"]
    st.release_pending([2])
    assert st.claim_pending([2], ttl=60) == ["2"]
    assert st.claim_pending([5], ttl=-1) == ["5"] and st.claim_pending([5], ttl=60) == ["5"]  # expired


def test_refit_is_claimed_once_until_it_starts(redis_conn):
    st = ProjectState(redis_conn, "7")
    assert st.claim_refit() is True and st.claim_refit() is False
    st.refit_started()
    assert st.claim_refit() is True


def test_model_and_version_are_saved_together(redis_conn):
    st = ProjectState(redis_conn, "8")
    assert st.load_model() is None and st.model_version() is None
    st.save_model(b"\x00blob", {"version": "subdisc-1-abc"})
    assert st.load_model() == (b"\x00blob", {"version": "subdisc-1-abc"})
    assert st.model_version() == "subdisc-1-abc"

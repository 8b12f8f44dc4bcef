"""Project state in a real Redis: idempotent confirmations, settings, async-path bookkeeping, the
refit lock."""
import threading
import time

import pytest

from backend.annotations import AnnotationRecord, Region
from backend.state import LockBusy, ProjectState, lock_settings, project_id


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


# --- the refit lock: short-lived, renewed while held, bounded wait -------------------------------

LOCK = "subdisc:v1:project:9:lock:refit"


def test_the_refit_lock_is_renewed_while_held_and_short_lived(redis_conn):
    st = ProjectState(redis_conn, "9")
    with st.refit_lock(ttl=1.0, wait=0.5) as lock:
        time.sleep(2.5)                           # over twice its TTL: the renewing thread kept it
        assert lock.owned() and 0 < redis_conn.pttl(LOCK) <= 1000
        with pytest.raises(LockBusy, match="another refit"):
            with st.refit_lock(ttl=1.0, wait=0.5):
                pass
    assert not redis_conn.exists(LOCK)           # released at the end


def test_a_running_refit_is_told_from_a_queued_one(redis_conn):
    st = ProjectState(redis_conn, "10")
    assert not st.refit_running() and not st.refit_queued()
    with st.refit_lock(ttl=5.0, wait=0.1):
        assert st.refit_running() and not st.refit_queued()
        st.claim_refit()
        assert st.refit_running() and st.refit_queued()
    assert not st.refit_running() and st.refit_queued()


def test_a_dead_holders_lock_lapses_within_its_ttl(redis_conn):
    # A holder killed outright leaves its key behind, as a lock restored from the AOF does.
    redis_conn.set(LOCK, "token-of-a-dead-process", px=1500)
    st = ProjectState(redis_conn, "9")
    started = time.monotonic()
    with st.refit_lock(ttl=1.5, wait=3.0) as lock:
        assert lock.owned()
    assert time.monotonic() - started < 2.5


def test_a_waiting_refit_gives_up_after_its_wait(redis_conn):
    st = ProjectState(redis_conn, "9")
    with st.refit_lock(ttl=5.0, wait=0.1):
        started = time.monotonic()
        with pytest.raises(LockBusy):
            with st.refit_lock(ttl=5.0, wait=0.6):
                pass
        assert time.monotonic() - started < 5      # gave up, instead of waiting for the holder


def test_a_lapsed_lock_is_no_longer_owned(redis_conn):
    st = ProjectState(redis_conn, "9")
    with st.refit_lock(ttl=30.0, wait=0.1) as lock:
        redis_conn.delete(LOCK)                  # as when Redis lost it (outage past the TTL)
        assert not lock.owned()
    assert not redis_conn.exists(LOCK)           # and releasing it did not raise or touch others


def test_lock_settings_come_from_the_environment(monkeypatch):
    monkeypatch.delenv("SUBDISC_REFIT_LOCK_TTL", raising=False)
    monkeypatch.delenv("SUBDISC_REFIT_LOCK_WAIT", raising=False)
    assert lock_settings() == (60.0, 90.0)
    monkeypatch.setenv("SUBDISC_REFIT_LOCK_TTL", "100")
    assert lock_settings() == (100.0, 150.0)     # the wait outlasts a dead holder's lock


def test_a_queued_refit_whose_job_is_gone_does_not_block_the_next(redis_conn):
    from backend.refit import schedule_refit

    st = ProjectState(redis_conn, "10")
    first = schedule_refit(redis_conn, "subdisc-state-test", "10")
    assert first and st.queued_refit() == first
    assert schedule_refit(redis_conn, "subdisc-state-test", "10") is None   # queued: one is enough
    redis_conn.delete(f"rq:job:{first}")         # lost (a Redis restart, retries used up)
    second = schedule_refit(redis_conn, "subdisc-state-test", "10")
    assert second and second != first and st.queued_refit() == second


def test_refit_wanted_and_reconcile_claims(redis_conn):
    st = ProjectState(redis_conn, "11")
    assert st.take_refit_wanted() is False
    st.want_refit()
    assert st.take_refit_wanted() is True and st.take_refit_wanted() is False
    assert st.claim_reconcile(0.3) is True and st.claim_reconcile(0.3) is False
    time.sleep(0.4)
    assert st.claim_reconcile(0.3) is True


def test_a_refit_that_finds_the_lock_busy_gives_up_and_the_holder_queues_another(
        redis_conn, redis_url, monkeypatch):
    from backend.refit import refit_project
    from tests.backend.helpers import TWO_ATTRIBUTES

    monkeypatch.setenv("SUBDISC_REDIS_URL", redis_url)       # refit_project outside RQ: this Redis
    monkeypatch.setenv("SUBDISC_QUEUE", "subdisc-state-test")
    monkeypatch.setenv("SUBDISC_REFIT_LOCK_WAIT", "0.3")
    st = ProjectState(redis_conn, "12")
    st.save_settings(TWO_ATTRIBUTES)
    with st.refit_lock(ttl=5.0, wait=0.1):                  # another refit is running
        started = time.monotonic()
        assert refit_project("12")["status"] == "busy"
        assert time.monotonic() - started < 5               # it did not wait for the holder
    assert st.queued_refit() is None
    # The next refit to end sees the note and queues the refit that gave up.
    assert refit_project("12")["status"] in ("changed", "unchanged")
    assert st.queued_refit() is not None and not st.take_refit_wanted()

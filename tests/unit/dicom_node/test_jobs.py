"""The job store on a real SQLite file: idempotent enqueue, leases, retries, forwards, concurrency."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from dicom_node.intake import CHANGE_SEQ, Intake
from dicom_node.jobs import PRIORITY_BACKFILL, JobStore, LeaseLost, NotFoundError, StoreBusy

LEASE = 60.0


def test_enqueue_is_idempotent_while_queued(tmp_path: Path):
    store = JobStore(tmp_path / "jobs.sqlite")
    first = store.enqueue("study-a", "1.2.3")
    again = store.enqueue("study-a", "1.2.3")
    assert first["id"] == again["id"] and len(store.list()) == 1
    assert not again["force"]
    forced = store.enqueue("study-a", "1.2.3", reason="manual", force=True)
    assert forced["id"] == first["id"] and forced["force"]
    claimed, lease = store.claim("w0", LEASE)
    assert claimed["id"] == first["id"] and claimed["state"] == "running" and "lease_token" not in claimed
    # a new event while the job runs queues a second job (the content may have grown)
    second = store.enqueue("study-a", "1.2.3")
    assert second["id"] != first["id"]
    assert store.claim("w1", LEASE) is None  # never two jobs of one study at once
    assert store.finish(lease, "done", result={"x": 1}, timings={"segment": 1.5}) == "done"
    assert store.claim("w1", LEASE)[0]["id"] == second["id"]
    done = store.get(first["id"])
    assert done["result"] == {"x": 1} and done["timings"] == {"segment": 1.5}


def test_live_studies_go_before_backfilled_ones(tmp_path: Path):
    store = JobStore(tmp_path / "jobs.sqlite")
    old = store.enqueue("archive-1", priority=PRIORITY_BACKFILL)
    live = store.enqueue("live-1")
    assert store.claim("w0", LEASE)[0]["id"] == live["id"]
    assert store.claim("w0", LEASE)[0]["id"] == old["id"]


def test_only_the_lease_holder_changes_the_job(tmp_path: Path):
    store = JobStore(tmp_path / "jobs.sqlite")
    job = store.enqueue("study-c", "1.2.5")
    _, lease = store.claim("w0", lease_seconds=0.2)
    store.update(lease, stage="segment")
    time.sleep(0.3)
    assert store.reap(max_attempts=3) == [{"id": job["id"], "worker": "w0", "state": "queued"}]
    _, other = store.claim("w1", LEASE)
    assert not store.holds(lease) and store.holds(other)
    assert not store.heartbeat(lease, LEASE)
    with pytest.raises(LeaseLost):
        store.update(lease, stage="store")
    with pytest.raises(LeaseLost):
        store.record_output(lease, "series-c", "1.2.5", "f", {"orthanc_ids": ["x"]})
    with pytest.raises(LeaseLost):
        store.finish(lease, "done")
    store.record_output(other, "series-c", "1.2.5", "f", {"orthanc_ids": ["y"]})
    store.finish(other, "done")
    finished = store.get(job["id"])
    assert finished["state"] == "done" and finished["worker"] == "w1" and finished["attempts"] == 2
    assert "lost its lease in stage segment" in finished["attempt_errors"][0]["error"]
    assert store.output_for("series-c")["objects"] == {"orthanc_ids": ["y"]}


def test_a_poison_study_fails_after_max_attempts_with_every_error(tmp_path: Path):
    store = JobStore(tmp_path / "jobs.sqlite")
    job = store.enqueue("poison", "1.2.6")
    for attempt in range(1, 4):
        claimed = store.claim(f"w{attempt}", LEASE)
        assert claimed is not None, f"attempt {attempt} not claimable"
        store.fail_attempt(job["id"], f"worker w{attempt} died (exit code -9)", max_attempts=3)
    failed = store.get(job["id"])
    assert failed["state"] == "failed" and failed["attempts"] == 3
    assert [e["attempt"] for e in failed["attempt_errors"]] == [1, 2, 3]
    assert "failed 3 times (MaxAttempts=3)" in failed["error"] and "re-run it explicitly" in failed["error"]
    assert store.claim("w9", LEASE) is None  # no fourth attempt without an explicit re-run


def test_transient_failures_retry_with_backoff_input_errors_do_not(tmp_path: Path):
    store = JobStore(tmp_path / "jobs.sqlite")
    job = store.enqueue("flaky", "1.2.7")
    _, lease = store.claim("w0", LEASE)
    assert store.finish(lease, "failed", error="Orthanc REST error: timeout", retry=True, max_attempts=3) == "queued"
    assert store.claim("w0", LEASE) is None  # backing off
    assert store.get(job["id"])["not_before"] > time.time()
    bad = store.enqueue("bad", "1.2.8")
    _, lease = store.claim("w0", LEASE)
    assert store.finish(lease, "failed", error="lacks PixelSpacing", max_attempts=3) == "failed"
    assert store.get(bad["id"])["error"] == "lacks PixelSpacing"


def test_node_restart_lapses_every_running_job(tmp_path: Path):
    path = tmp_path / "jobs.sqlite"
    store = JobStore(path)
    job = store.enqueue("study-b", "1.2.4")
    store.claim("w0", LEASE)
    reopened = JobStore(path)  # the node restarted
    assert reopened.reap() == []  # the lease is still young
    assert reopened.requeue_all_running("the node stopped") == [{"id": job["id"], "worker": "w0", "state": "queued"}]
    assert reopened.claim("w1", LEASE)[0]["id"] == job["id"]


def test_unknown_job_bad_state_and_cancel(tmp_path: Path):
    store = JobStore(tmp_path / "jobs.sqlite")
    with pytest.raises(NotFoundError):
        store.get(42)
    job = store.enqueue("s", "1")
    assert store.cancel(job["id"]) and store.get(job["id"])["state"] == "cancelled"
    other = store.enqueue("t", "2")
    _, lease = store.claim("w", LEASE)
    with pytest.raises(ValueError):
        store.finish(lease, "exploded")
    assert not store.cancel(other["id"])  # running: it finishes its attempt


def test_forwards_retry_with_backoff_then_give_up_visibly(tmp_path: Path):
    store = JobStore(tmp_path / "jobs.sqlite")
    job = store.enqueue("fwd", "1.2.9")
    _, lease = store.claim("w0", LEASE)
    store.add_forwards(lease, "1.2.9", ["seg-id", "sr-id"], ["pacs", "archive"])
    store.finish(lease, "done")
    first = store.claim_forward(hold_seconds=30)
    second = store.claim_forward(hold_seconds=30)
    assert {first["destination"], second["destination"]} == {"pacs", "archive"}
    assert store.claim_forward(hold_seconds=30) is None  # both held
    assert store.forward_result(first["id"], True, None, max_attempts=2, backoff_seconds=0.1) == "sent"
    assert store.forward_result(second["id"], False, "association refused", max_attempts=2, backoff_seconds=0.1) == "pending"
    assert store.claim_forward(hold_seconds=30) is None  # backing off
    time.sleep(0.15)
    again = store.claim_forward(hold_seconds=30)
    assert again["id"] == second["id"] and again["resources"] == ["seg-id", "sr-id"]
    assert store.forward_result(again["id"], False, "association refused", max_attempts=2, backoff_seconds=0.1) == "failed"
    shown = store.get(job["id"])
    assert shown["state"] == "failed" and "forwarding to archive gave up after 2 attempt(s)" in shown["error"]
    assert {f["destination"]: f["state"] for f in shown["forwards"]} == {"pacs": "sent", "archive": "failed"}


def test_a_locked_store_waits_a_bounded_time_then_says_so(tmp_path: Path):
    path = tmp_path / "jobs.sqlite"
    JobStore(path)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        store = JobStore(path, busy_seconds=0.5)
        started = time.monotonic()
        with pytest.raises(StoreBusy, match="stayed locked"):
            store.enqueue("locked", "1.3")
        assert time.monotonic() - started < 5
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_connections_are_per_thread(tmp_path: Path):
    store = JobStore(tmp_path / "jobs.sqlite")
    errors = []

    def enqueue_many(prefix: str) -> None:
        try:
            for index in range(20):
                store.enqueue(f"{prefix}-{index}")
        except Exception as error:  # noqa: BLE001 - collected for the assertion
            errors.append(error)

    threads = [threading.Thread(target=enqueue_many, args=(f"t{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == [] and len(store.list(limit=1000)) == 80


def test_intake_keeps_missed_events_and_replays_orthancs_change_log(tmp_path: Path):
    store = JobStore(tmp_path / "jobs.sqlite")
    changes = {"last": 7, "log": [
        {"Seq": 8, "ChangeType": "StableStudy", "ResourceType": "Study", "ID": "lost-study"},
        {"Seq": 9, "ChangeType": "NewInstance", "ResourceType": "Instance", "ID": "i"},
        {"Seq": 10, "ChangeType": "Deleted", "ResourceType": "Study", "ID": "gone-study"}]}

    def rest_get(path: str):
        if path == "/changes?last":
            return {"Last": changes["last"], "Changes": [], "Done": True}
        since = int(path.split("since=")[1].split("&")[0])
        page = [c for c in changes["log"] if c["Seq"] > since]
        return {"Changes": page, "Done": True, "Last": max([since, *(c["Seq"] for c in page)])}

    reports = []
    intake = Intake(store, rest_get, report=reports.append)
    assert intake.replay_changes() == 0 and store.get_meta(CHANGE_SEQ) == "7"  # first start: no implicit backfill
    intake.store = JobStore(tmp_path / "jobs.sqlite", busy_seconds=0.2)
    holder = sqlite3.connect(tmp_path / "jobs.sqlite", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    assert intake.stable("busy-study", "1.4") is None and intake.pending() == 1
    holder.execute("ROLLBACK")
    holder.close()
    assert reports and "could not be queued" in reports[0]
    assert intake.retry_missed() == 1 and intake.pending() == 0
    assert intake.replay_changes() == 2  # the node was down when seq 8 and 10 happened
    assert {job["orthanc_study_id"] for job in store.list()} == {"busy-study", "lost-study"}
    assert store.pending_erasures()[0][1] == "gone-study" and store.get_meta(CHANGE_SEQ) == "10"


def _claim_all(path: str, name: str, queue) -> None:
    store = JobStore(path)
    claimed = []
    while (found := store.claim(name, LEASE)) is not None:
        job, lease = found
        claimed.append(job["id"])
        store.finish(lease, "done")
    queue.put(claimed)


def test_concurrent_workers_never_claim_the_same_job(tmp_path: Path):
    path = tmp_path / "jobs.sqlite"
    store = JobStore(path)
    for index in range(60):
        store.enqueue(f"study-{index}", f"1.2.{index}")
    queue = multiprocessing.get_context("spawn").Queue()
    workers = [multiprocessing.get_context("spawn").Process(target=_claim_all, args=(str(path), f"w{i}", queue))
               for i in range(3)]
    for worker in workers:
        worker.start()
    claimed = [job_id for _ in workers for job_id in queue.get(timeout=60)]
    for worker in workers:
        worker.join(30)
    assert sorted(claimed) == sorted(job["id"] for job in store.list(limit=1000))
    assert len(claimed) == len(set(claimed)) == 60


def test_child_logs_rotate_before_a_restart(tmp_path: Path):
    from dicom_node.supervisor import rotate

    log = tmp_path / "worker-0.stderr.log"
    log.write_bytes(b"x" * 2048)
    for generation in range(4):
        rotate(log, max_bytes=1024, backups=2)
        log.write_bytes(bytes([65 + generation]) * 2048)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["worker-0.stderr.log", "worker-0.stderr.log.1",
                                                                "worker-0.stderr.log.2"]
    assert (tmp_path / "worker-0.stderr.log.1").read_bytes()[:1] == b"C"  # the newest backup first

"""The job store on a real SQLite file: idempotent enqueue, atomic claims across processes, restarts."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from dicom_node.jobs import JobStore, NotFoundError


def test_enqueue_is_idempotent_while_queued(tmp_path: Path):
    store = JobStore(tmp_path / "jobs.sqlite")
    first = store.enqueue("study-a", "1.2.3")
    again = store.enqueue("study-a", "1.2.3")
    assert first["id"] == again["id"] and len(store.list()) == 1
    assert not again["force"]
    forced = store.enqueue("study-a", "1.2.3", reason="manual", force=True)
    assert forced["id"] == first["id"] and forced["force"]
    claimed = store.claim("w0")
    assert claimed["id"] == first["id"] and claimed["state"] == "running"
    # a new event while the job runs queues a second job (the content may have grown)
    second = store.enqueue("study-a", "1.2.3")
    assert second["id"] != first["id"]
    assert store.claim("w1") is None  # never two jobs of one study at once
    store.finish(first["id"], "done", result={"x": 1}, timings={"segment": 1.5})
    assert store.claim("w1")["id"] == second["id"]
    done = store.get(first["id"])
    assert done["result"] == {"x": 1} and done["timings"] == {"segment": 1.5}


def test_interrupted_jobs_are_requeued_and_survive_reopen(tmp_path: Path):
    path = tmp_path / "jobs.sqlite"
    store = JobStore(path)
    job = store.enqueue("study-b", "1.2.4")
    store.claim("w0")
    reopened = JobStore(path)  # the node restarted
    assert reopened.requeue_interrupted(timeout_seconds=3600) == []  # still young
    assert reopened.requeue_interrupted() == [job["id"]]
    assert reopened.get(job["id"])["state"] == "queued"
    assert reopened.claim("w1")["id"] == job["id"]


def test_unknown_job_and_bad_state(tmp_path: Path):
    store = JobStore(tmp_path / "jobs.sqlite")
    with pytest.raises(NotFoundError):
        store.get(42)
    job = store.enqueue("s", "1")
    with pytest.raises(ValueError):
        store.finish(job["id"], "exploded")


def test_outputs_record_replaces(tmp_path: Path):
    store = JobStore(tmp_path / "jobs.sqlite")
    store.record_output("series-1", "study-1", "f1", {"orthanc_ids": ["a"]})
    store.record_output("series-1", "study-1", "f2", {"orthanc_ids": ["b"]})
    assert store.output_for("series-1")["fingerprint"] == "f2"
    assert [o["objects"]["orthanc_ids"] for o in store.outputs_of_study("study-1")] == [["b"]]


def _claim_all(path: str, name: str, queue) -> None:
    store = JobStore(path)
    claimed = []
    while (job := store.claim(name)) is not None:
        claimed.append(job["id"])
        store.finish(job["id"], "done")
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

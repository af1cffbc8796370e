"""Metrics on a real job store: job events at every final transition, recorded samples from
several "processes" (connections), and the exposition parsed back with prometheus-client."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dicom_node.jobs import PRIORITY_BACKFILL, JobStore
from dicom_node.metrics import (
    FORWARD_FAILURES,
    INDEX_VECTORS,
    SIMILAR_QUERY_SECONDS,
    STAGE_SECONDS,
    MetricsStore,
    NodeCollector,
    exposition,
    record_attempt,
)

LEASE = 60.0


def scrape(store: JobStore, restarts: dict[str, int] | None = None) -> dict[tuple[str, tuple], float]:
    """Every sample of the exposition, parsed by prometheus-client: (name, sorted labels) -> value."""
    text = exposition(NodeCollector(store, lambda: restarts or {})).decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_every_final_transition_is_one_job_event(tmp_path: Path):
    store = JobStore(tmp_path / "jobs.sqlite")
    done = store.enqueue("s-done", "1.2.1")
    _, lease = store.claim("w0", LEASE)
    store.finish(lease, "done", result={})
    retried = store.enqueue("s-retry", "1.2.2")
    _, lease = store.claim("w0", LEASE)
    assert store.finish(lease, "failed", error="Orthanc down", retry=True, max_attempts=3) == "queued"
    cancelled = store.enqueue("s-cancel", "1.2.3")
    assert store.cancel(cancelled["id"]) and not store.cancel(cancelled["id"])
    store.db.execute("update jobs set not_before = 0 where id = ?", [retried["id"]])
    _, lease = store.claim("w0", LEASE)
    store.fail_attempt(lease.job_id, "worker killed by the watchdog", max_attempts=2)  # attempt 2 of 2: failed
    events = store.events_after(0)
    assert [(e["job_id"], e["state"]) for e in events] == [
        (done["id"], "done"), (cancelled["id"], "cancelled"), (retried["id"], "failed")]
    assert events[-1]["job"]["study_uid"] == "1.2.2" and "killed" in events[-1]["job"]["error"]
    assert store.finished_counts() == {"done": 1, "failed": 1, "skipped": 0, "cancelled": 1}
    assert store.last_event_id() == events[-1]["id"] and store.events_after(events[-1]["id"]) == []


def test_a_forward_that_gives_up_fails_its_done_job_with_an_event(tmp_path: Path):
    store = JobStore(tmp_path / "jobs.sqlite")
    store.enqueue("s-fwd", "1.2.9")
    _, lease = store.claim("w0", LEASE)
    store.add_forwards(lease, "1.2.9", ["orthanc-id"], ["pacs"])
    store.finish(lease, "done", result={})
    forward = store.claim_forward(hold_seconds=10)
    assert store.forward_result(forward["id"], False, "association rejected", max_attempts=1, backoff_seconds=1) == "failed"
    assert [e["state"] for e in store.events_after(0)] == ["done", "failed"]


def test_recorded_samples_and_exposition_parse_back(tmp_path: Path):
    store = JobStore(tmp_path / "jobs.sqlite")
    before = scrape(store)
    assert before[("abscess_node_jobs", (("state", "queued"),))] == 0
    assert before[("abscess_node_jobs_finished_total", (("state", "done"),))] == 0

    job = store.enqueue("s-1", "1.2.1", priority=PRIORITY_BACKFILL)
    store.enqueue("s-2", "1.2.2")
    _, lease = store.claim("w0", LEASE)  # the live one first
    store.finish(lease, "done", result={"seg": {}, "index_size": {"studies": 1, "slice": 40, "roi": 3}},
                 timings={"download": 0.3, "segment": 7.0})
    # a worker records its attempt; another process (the service) records a query, with its own connection
    record_attempt(MetricsStore(store), store.get(lease.job_id))
    other_process = MetricsStore(JobStore(tmp_path / "jobs.sqlite"))
    other_process.observe(SIMILAR_QUERY_SECONDS, 0.02, route="rest")
    other_process.observe(SIMILAR_QUERY_SECONDS, 3.0, route="rest")
    other_process.increment(FORWARD_FAILURES, destination="pacs")
    after = scrape(store, restarts={"worker-0": 2})

    assert after[("abscess_node_jobs", (("state", "queued"),))] == 1 and job["state"] == "queued"
    assert after[("abscess_node_jobs", (("state", "done"),))] == 1
    assert after[("abscess_node_oldest_queued_seconds", ())] >= 0
    assert after[("abscess_node_jobs_finished_total", (("state", "done"),))] == 1
    assert after[("abscess_node_worker_restarts_total", (("process", "worker-0"),))] == 2
    assert after[("abscess_node_stage_seconds_count", (("stage", "segment"),))] == 1
    assert after[("abscess_node_stage_seconds_sum", (("stage", "segment"),))] == pytest.approx(7.0)
    assert after[("abscess_node_stage_seconds_bucket", (("le", "5.0"), ("stage", "segment")))] == 0
    assert after[("abscess_node_stage_seconds_bucket", (("le", "10.0"), ("stage", "segment")))] == 1
    assert after[("abscess_node_stage_seconds_bucket", (("le", "+Inf"), ("stage", "download")))] == 1
    assert after[("abscess_node_study_to_seg_seconds_count", (("source", "live"),))] == 1
    assert after[("abscess_node_similar_query_seconds_count", (("route", "rest"),))] == 2
    assert after[("abscess_node_similar_query_seconds_bucket", (("le", "0.025"), ("route", "rest")))] == 1
    assert after[("abscess_node_similar_query_seconds_bucket", (("le", "+Inf"), ("route", "rest")))] == 2
    assert after[("abscess_node_forward_failures_total", (("destination", "pacs"),))] == 1
    assert after[("abscess_node_index_studies", ())] == 1
    assert after[("abscess_node_index_vectors", (("space", "slice"),))] == 40


def test_recorded_metrics_refuse_wrong_labels_kinds_and_values(tmp_path: Path):
    metrics = MetricsStore(JobStore(tmp_path / "jobs.sqlite"))
    with pytest.raises(ValueError, match=r"takes the labels \['stage'\]"):
        metrics.observe(STAGE_SECONDS, 1.0, study_uid="1.2.3")
    with pytest.raises(ValueError, match="not a gauge"):
        metrics.set(STAGE_SECONDS, 1.0, stage="x")
    with pytest.raises(ValueError, match="counters only go up"):
        metrics.increment(FORWARD_FAILURES, -1, destination="pacs")
    with pytest.raises(ValueError, match="non-finite"):
        metrics.observe(STAGE_SECONDS, float("nan"), stage="x")
    metrics.set(INDEX_VECTORS, 5, space="roi")
    metrics.set(INDEX_VECTORS, 3, space="roi")  # a gauge is replaced, not added up
    assert metrics.samples(INDEX_VECTORS) == {("roi",): {"": 3.0}}

"""Webhooks against a real local HTTP receiver: one call per finished job and subscribed state,
retries with back-off, a timeout, give-up, no patient data, no history replayed."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from dicom_node.config import NodeConfig
from dicom_node.jobs import JobStore
from dicom_node.metrics import NOTIFICATION_FAILURES, MetricsStore
from dicom_node.notifications import NotificationQueue, send_due_notifications
from tooling.webhook_receiver import WebhookReceiver

LEASE = 60.0


@pytest.fixture
def receiver():
    with WebhookReceiver() as server:
        yield server


def config_for(tmp_path: Path, webhooks: list[dict], **extra) -> NodeConfig:
    return NodeConfig.from_section({"JobsDatabase": str(tmp_path / "jobs.sqlite"), "Notifications": webhooks,
                                    "NotificationBackoffSeconds": 1, **extra})


def finish(store: JobStore, orthanc_id: str, state: str, error: str | None = None) -> int:
    job = store.enqueue(orthanc_id, f"1.2.826.0.1.{len(store.list())}")
    _, lease = store.claim("w0", LEASE)
    store.finish(lease, state, error=error, result={})
    return job["id"]


def test_one_call_per_finished_job_in_a_subscribed_state(tmp_path: Path, receiver: WebhookReceiver):
    config = config_for(tmp_path, [{"Url": receiver.url, "On": ["failed", "done"]}])
    store = JobStore(config.jobs_database)
    old = finish(store, "before-the-first-worker", "done")
    queue = NotificationQueue(store)  # the first worker starts: notifications start now, no history replayed
    assert send_due_notifications(queue, config) == 0
    done = finish(store, "s-done", "done")
    failed = finish(store, "s-failed", "failed", error="series 1.2.3: PixelSpacing (0028,0030) missing")
    finish(store, "s-skipped", "skipped", error="no CT series")
    assert send_due_notifications(queue, config) == 2
    assert send_due_notifications(queue, config) == 0  # nothing sent twice
    calls = {call["body"]["job_id"]: call for call in receiver.calls}
    assert sorted(calls) == [done, failed] and old not in calls and len(receiver.calls) == 2
    body = calls[failed]["body"]
    assert calls[failed]["content_type"] == "application/json" and calls[failed]["path"] == "/abscess-node-events"
    assert body["event"] == "job.failed" and body["state"] == "failed" and "PixelSpacing" in body["error"]
    assert body["orthanc_study_id"] == "s-failed" and body["study_uid"].startswith("1.2.826.0.1.")
    assert body["job_url"] == f"/abscess-node/jobs/{failed}"
    assert not {"patient_name", "patient_id", "PatientName", "PatientID"} & set(body)
    assert [d["state"] for d in queue.deliveries()] == ["sent", "sent"]


def test_a_failing_receiver_is_retried_then_given_up(tmp_path: Path, receiver: WebhookReceiver):
    config = config_for(tmp_path, [{"Url": receiver.url, "On": ["done"]}], NotificationRetries=3)
    store = JobStore(config.jobs_database)
    queue = NotificationQueue(store)
    send_due_notifications(queue, config)
    receiver.failures = 1
    job_id = finish(store, "s-flaky", "done")
    assert send_due_notifications(queue, config) == 1  # 500: retried after the back-off, not at once
    assert send_due_notifications(queue, config) == 0
    time.sleep(1.1)
    assert send_due_notifications(queue, config) == 1
    assert [d["state"] for d in queue.deliveries(job_id)] == ["sent"] and len(receiver.calls) == 2

    receiver.failures = 10
    job_id = finish(store, "s-down", "done")
    for wait in (0, 1.1, 2.1):  # back-off 1 s, then 2 s
        time.sleep(wait)
        assert send_due_notifications(queue, config) == 1
    delivery = queue.deliveries(job_id)[0]
    assert delivery["state"] == "failed" and delivery["attempts"] == 3 and delivery["last_error"] == "HTTP 500"
    assert MetricsStore(store).samples(NOTIFICATION_FAILURES) == {(): {"": 4.0}}


def test_a_slow_receiver_times_out_and_an_unreachable_one_is_named(tmp_path: Path, receiver: WebhookReceiver):
    config = config_for(tmp_path, [{"Url": receiver.url, "On": ["done"]}, {"Url": "http://127.0.0.1:9/", "On": ["done"]}],
                        NotificationTimeoutSeconds=1, NotificationRetries=1)
    store = JobStore(config.jobs_database)
    queue = NotificationQueue(store)
    send_due_notifications(queue, config)
    receiver.delay = 3.0
    job_id = finish(store, "s-slow", "done")
    started = time.monotonic()
    assert send_due_notifications(queue, config) == 2
    assert time.monotonic() - started < 2.9  # the call was not waited for to the end
    errors = sorted(d["last_error"] for d in queue.deliveries(job_id))
    assert errors == ["no answer within 1 s", "unreachable (ConnectionError)"]


def test_without_webhooks_the_cursor_still_moves(tmp_path: Path, receiver: WebhookReceiver):
    quiet = config_for(tmp_path, [])
    store = JobStore(quiet.jobs_database)
    queue = NotificationQueue(store)
    send_due_notifications(queue, quiet)
    finish(store, "while-off", "failed", error="x")
    send_due_notifications(queue, quiet)
    loud = config_for(tmp_path, [{"Url": receiver.url, "On": ["failed"]}])
    assert send_due_notifications(queue, loud) == 0 and receiver.calls == []

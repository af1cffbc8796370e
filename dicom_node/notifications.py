"""Webhooks: the workers tell other systems when a job ends (the ``Notifications`` key).

Every job that reaches a final state is logged in the job store's ``job_events`` in the very
transaction that ends it, whichever process ends it (a worker, the plugin's watchdog, a cancel
from the dashboard, a forward that gave up). The workers turn those events into deliveries,
one per (event, subscribed webhook), in table ``notifications``, and send them outside any
transaction: ``POST`` of a JSON payload, a timeout per call (``NotificationTimeoutSeconds``),
retries with doubling back-off (``NotificationBackoffSeconds``) up to ``NotificationRetries``
attempts, then given up (logged, and counted in ``abscess_node_notification_failures_total``).

A cursor in the job store's ``meta`` says up to which event deliveries were planned; it starts
at the latest event when the first worker ever starts, and moves on whether or not webhooks
are configured (enabling them later does not replay history).
The payload names the job, its state, its UIDs and its error, never a patient's name or ID
(job errors carry UIDs only: :mod:`dicom_node.phi`).
"""

from __future__ import annotations

import json
import logging
import time
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any

import requests

from dicom_node.config import NodeConfig, Webhook
from dicom_node.jobs import JobStore
from dicom_node.metrics import NOTIFICATION_FAILURES, MetricsStore

log = logging.getLogger("abscess_node.notifications")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS notifications (
    id INTEGER PRIMARY KEY, event_id INTEGER NOT NULL, url TEXT NOT NULL, payload TEXT NOT NULL,
    state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_attempt REAL NOT NULL,
    claimed_until REAL, last_error TEXT, updated REAL, UNIQUE (event_id, url)
);
CREATE INDEX IF NOT EXISTS idx_notifications_due ON notifications (state, next_attempt);
"""
CURSOR = "notifications_event_cursor"
PAYLOAD_FIELDS = ("study_uid", "orthanc_study_id", "series_uid", "attempts", "reason", "error", "created", "finished")

Poster = Callable[[str, dict[str, Any], float], str | None]
"""Sends one payload to a URL within a timeout; returns None when delivered, else the error in words."""


def payload(event: dict[str, Any]) -> dict[str, Any]:
    """The JSON a webhook receives for one job event (UIDs, ids, state and error; no patient data)."""
    job = event["job"]
    return {"event": f"job.{event['state']}", "job_id": event["job_id"], "state": event["state"],
            **{name: job.get(name) for name in PAYLOAD_FIELDS}, "job_url": f"/abscess-node/jobs/{event['job_id']}"}


def post_json(url: str, body: dict[str, Any], timeout_seconds: float) -> str | None:
    """POST ``body`` as JSON; None when the receiver answered 2xx, else why not (no URL in the words:
    it may hold a secret)."""
    try:
        response = requests.post(url, json=body, timeout=timeout_seconds, allow_redirects=False,
                                 headers={"User-Agent": "abscess-node"})
    except requests.Timeout:
        return f"no answer within {timeout_seconds:g} s"
    except requests.RequestException as error:
        return f"unreachable ({type(error).__name__})"
    return None if 200 <= response.status_code < 300 else f"HTTP {response.status_code}"


class NotificationQueue:
    """The deliveries of webhook notifications, in the job store's database.

    Args:
        store: the job store.
    """

    def __init__(self, store: JobStore) -> None:
        self.store = store
        store.db.executescript(_SCHEMA)
        if store.get_meta(CURSOR) is None:  # a new node: its notifications start now
            store.set_meta(CURSOR, str(store.last_event_id()))

    def plan(self, webhooks: Sequence[Webhook]) -> int:
        """Turn the job events since the cursor into deliveries for the webhooks subscribed to their state.

        Returns:
            The number of deliveries added.
        """
        if self.store.last_event_id() <= int(self.store.get_meta(CURSOR) or 0):
            return 0  # nothing new: no write transaction
        added = 0
        with self.store.transaction():
            events = self.store.events_after(int(self.store.get_meta(CURSOR) or 0))
            for event in events:
                body = json.dumps(payload(event))
                for webhook in webhooks:
                    if event["state"] in webhook.on:
                        added += self.store.db.execute(
                            "insert or ignore into notifications (event_id, url, payload, state, next_attempt, updated) "
                            "values (?, ?, ?, 'pending', 0, ?)", [event["id"], webhook.url, body, time.time()]).rowcount
            if events:
                self.store.set_meta(CURSOR, str(events[-1]["id"]))
        return added

    def claim(self, hold_seconds: float) -> dict[str, Any] | None:
        """Take one due delivery (pending, past its back-off, not held by another worker)."""
        now = time.time()
        with self.store.transaction():
            row = self.store.db.execute(
                "select * from notifications where state = 'pending' and next_attempt <= ? and "
                "(claimed_until is null or claimed_until < ?) order by next_attempt, id limit 1", [now, now]).fetchone()
            if row is None:
                return None
            self.store.db.execute("update notifications set claimed_until = ? where id = ?", [now + hold_seconds, row["id"]])
        return {**dict(row), "payload": json.loads(row["payload"])}

    def result(self, delivery_id: int, error: str | None, max_attempts: int, backoff_seconds: float) -> str:
        """Record one attempt (``error`` None: delivered); returns the new state: sent, pending or failed."""
        with self.store.transaction():
            attempts = self.store.db.execute("select attempts from notifications where id = ?",
                                             [delivery_id]).fetchone()["attempts"] + 1
            if error is None:
                state, next_attempt = "sent", 0.0
            elif attempts >= max_attempts:
                state, next_attempt = "failed", 0.0
            else:
                state, next_attempt = "pending", time.time() + backoff_seconds * 2 ** (attempts - 1)
            self.store.db.execute(
                "update notifications set state = ?, attempts = ?, next_attempt = ?, claimed_until = null, "
                "last_error = ?, updated = ? where id = ?", [state, attempts, next_attempt, error, time.time(), delivery_id])
        return state

    def deliveries(self, job_id: int | None = None) -> list[dict[str, Any]]:
        """Every delivery (of one job's events), oldest first, with its payload."""
        rows = self.store.db.execute("select * from notifications order by id").fetchall()
        found = [{**dict(row), "payload": json.loads(row["payload"])} for row in rows]
        return [d for d in found if job_id is None or d["payload"]["job_id"] == job_id]


def send_due_notifications(queue: NotificationQueue, config: NodeConfig, post: Poster = post_json) -> int:
    """Plan the new events, then try every delivery whose back-off has passed; the number attempted."""
    if not config.notifications:
        queue.plan(())  # keep the cursor current: webhooks enabled later start from then
        return 0
    queue.plan(config.notifications)
    metrics = MetricsStore(queue.store)
    attempted = 0
    while (delivery := queue.claim(hold_seconds=config.notification_timeout_seconds + 30)) is not None:
        attempted += 1
        error = post(delivery["url"], delivery["payload"], config.notification_timeout_seconds)
        state = queue.result(delivery["id"], error, config.notification_retries, config.notification_backoff_seconds)
        if error is not None:
            metrics.increment(NOTIFICATION_FAILURES)
            host = urllib.parse.urlsplit(delivery["url"]).hostname
            log.warning("webhook to %s for job %s (%s): %s; %s", host, delivery["payload"]["job_id"],
                        delivery["payload"]["state"], error,
                        "given up" if state == "failed" else f"retrying (attempt {delivery['attempts'] + 1})")
    return attempted

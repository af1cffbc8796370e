"""The job store: one SQLite file (WAL) shared by the plugin, the workers and the service.

A job is a **lease**, not a row with a timeout:

* :meth:`JobStore.enqueue` is idempotent per study: while a job for the study is queued,
  another STABLE_STUDY event returns that job instead of adding one.
* :meth:`JobStore.claim` hands the best queued job (priority, then age) to one worker with a
  lease: a random token that expires ``lease_seconds`` later unless the worker renews it
  (:meth:`JobStore.heartbeat`). Never two running jobs of the same study.
* Only the lease holder may :meth:`update`, :meth:`record_output` or :meth:`finish` the job
  (:class:`LeaseLost` otherwise): a worker that was stopped, hung or cut off changes nothing
  once its lease has lapsed and another worker holds the job.
* :meth:`JobStore.reap` re-queues running jobs whose lease lapsed (a killed worker), with
  the reason kept in the job's ``attempt_errors``; after ``max_attempts`` the job ends
  ``failed`` (a poison study is not retried forever). A re-run is then explicit.
* ``outputs`` remembers, per source series, the content fingerprint and the SEG/SR we stored;
  ``forwards`` what is sent to which destination (retried with back-off until it succeeds or
  gives up, visibly); ``erasures`` the studies Orthanc deleted.
* ``job_events`` is an append-only log of every job reaching a final state (done, failed,
  skipped, cancelled), written in the transaction that ends it, whichever process does so: the
  finished-jobs counters of the metrics and the webhooks (:mod:`dicom_node.notifications`) read it.

Every process and thread has its own connection; waits for the write lock are bounded
(``busy_seconds``), and a wait that runs out raises :class:`StoreBusy` with a clear message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

STATES = ("queued", "running", "done", "failed", "skipped", "cancelled")
FINAL_STATES = ("done", "failed", "skipped", "cancelled")
PRIORITY_LIVE = 0
"""Studies that arrive from the PACS (and manual re-runs) go before backfilled ones."""
PRIORITY_BACKFILL = 10
RETRY_BACKOFF_SECONDS = 10.0
"""A retried attempt waits ``attempt x`` this long before it may be claimed again."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY, orthanc_study_id TEXT NOT NULL, study_uid TEXT, state TEXT NOT NULL,
    reason TEXT, force INTEGER, created TEXT NOT NULL, started TEXT, finished TEXT, worker TEXT,
    attempts INTEGER, series_uid TEXT, selection TEXT, timings TEXT, result TEXT, error TEXT
);
CREATE INDEX IF NOT EXISTS idx_jobs_state_id ON jobs (state, id);
CREATE INDEX IF NOT EXISTS idx_jobs_orthanc_study_id ON jobs (orthanc_study_id);
CREATE TABLE IF NOT EXISTS outputs (
    series_uid TEXT PRIMARY KEY, study_uid TEXT, fingerprint TEXT, objects TEXT, updated TEXT
);
CREATE TABLE IF NOT EXISTS erasures (
    id INTEGER PRIMARY KEY, orthanc_study_id TEXT NOT NULL, requested TEXT NOT NULL, done TEXT
);
CREATE TABLE IF NOT EXISTS forwards (
    id INTEGER PRIMARY KEY, job_id INTEGER NOT NULL, study_uid TEXT, destination TEXT NOT NULL,
    resources TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL, claimed_until REAL, last_error TEXT, updated TEXT
);
CREATE INDEX IF NOT EXISTS idx_forwards_due ON forwards (state, next_attempt);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS job_events (
    id INTEGER PRIMARY KEY, job_id INTEGER NOT NULL, state TEXT NOT NULL, at REAL NOT NULL, job TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_job_events_state ON job_events (state);
"""
EVENT_FIELDS = ("id", "state", "reason", "study_uid", "orthanc_study_id", "series_uid", "attempts", "error", "created",
                "finished", "priority")
"""What a job event keeps of the job (UIDs and states only: no patient name or ID is ever in a job)."""
# columns added after the first release: (name, declaration); added to old databases at open
_ADDED_COLUMNS = (
    ("priority", "INTEGER NOT NULL DEFAULT 0"),
    ("lease_token", "TEXT"),
    ("lease_expires", "REAL"),
    ("heartbeat", "REAL"),
    ("stage", "TEXT"),
    ("stage_started", "REAL"),
    ("not_before", "REAL NOT NULL DEFAULT 0"),
    ("attempt_errors", "TEXT"),
)
_COLUMNS = ("orthanc_study_id", "study_uid", "state", "reason", "force", "created", "started", "finished", "worker",
            "attempts", "series_uid", "selection", "timings", "result", "error", "priority", "stage")
_JSON_COLUMNS = ("selection", "timings", "result", "objects", "attempt_errors", "resources")


class NotFoundError(KeyError):
    """No job with that id."""


class LeaseLost(RuntimeError):
    """The worker no longer holds the job (its lease lapsed and the job went back to the queue)."""


class StoreBusy(RuntimeError):
    """The job store stayed locked by another process longer than the bounded wait."""


@dataclasses.dataclass(frozen=True)
class Lease:
    """A worker's hold on a running job: only the token's holder may change the job."""

    job_id: int
    token: str
    worker: str


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


class JobStore:
    """Jobs, outputs, forwards and erasures in one SQLite database.

    Args:
        path: the database file (created with its tables if missing).
        busy_seconds: longest wait for another process's write lock before :class:`StoreBusy`.
    """

    def __init__(self, path: Path | str, busy_seconds: float = 10.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.busy_seconds = busy_seconds
        self._local = threading.local()
        self.db.executescript(_SCHEMA)
        known = {row["name"] for row in self.db.execute("PRAGMA table_info(jobs)")}
        for name, declaration in _ADDED_COLUMNS:
            if name not in known:
                with contextlib.suppress(sqlite3.OperationalError):  # another process added it first
                    self.db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {declaration}")
        self.db.execute("CREATE INDEX IF NOT EXISTS idx_jobs_claim ON jobs (state, priority, id)")

    @property
    def db(self) -> sqlite3.Connection:
        """This thread's connection (SQLite connections are not shared across threads)."""
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = sqlite3.connect(str(self.path), timeout=self.busy_seconds, isolation_level=None)
            connection.row_factory = sqlite3.Row
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute(f"PRAGMA busy_timeout={int(self.busy_seconds * 1000)}")
            self._local.connection = connection
        return connection

    # ----------------------------------------------------------------- queue
    def enqueue(self, orthanc_study_id: str, study_uid: str | None = None, reason: str = "stable",
                force: bool = False, priority: int = PRIORITY_LIVE) -> dict[str, Any]:
        """Queue the study unless a job for it is already waiting; return that job.

        Args:
            orthanc_study_id: Orthanc's identifier of the study.
            study_uid: StudyInstanceUID when known (the worker fills it in otherwise).
            reason: why (``stable``, ``manual``, ``reconcile``, ``backfill``, ``reindex``).
            force: re-process even if the content did not change (manual re-runs).
            priority: lower goes first (:data:`PRIORITY_LIVE`, :data:`PRIORITY_BACKFILL`); a
                waiting job takes the more urgent of its own and the new priority.
        """
        with self._immediate():
            waiting = self.db.execute(
                "select id, priority from jobs where orthanc_study_id = ? and state = 'queued' order by id limit 1",
                [orthanc_study_id]).fetchone()
            if waiting:
                job_id = waiting["id"]
                self.db.execute("update jobs set priority = min(priority, ?) where id = ?", [priority, job_id])
                if force:
                    self.db.execute("update jobs set force = 1, reason = ? where id = ?", [reason, job_id])
            else:
                job_id = self.db.execute(
                    "insert into jobs (orthanc_study_id, study_uid, state, reason, force, created, attempts, priority, "
                    "not_before) values (?, ?, 'queued', ?, ?, ?, 0, ?, 0)",
                    [orthanc_study_id, study_uid, reason, int(force), _now(), priority]).lastrowid
        return self.get(job_id)

    def claim(self, worker: str, lease_seconds: float) -> tuple[dict[str, Any], Lease] | None:
        """Atomically take the most urgent claimable job whose study has no running job.

        Returns:
            The job and the lease that lets this worker change it, or None when nothing is queued.
        """
        now = time.time()
        token = secrets.token_hex(16)
        with self._immediate():
            row = self.db.execute(
                "select id from jobs where state = 'queued' and not_before <= ? and orthanc_study_id not in "
                "(select orthanc_study_id from jobs where state = 'running') order by priority, id limit 1",
                [now]).fetchone()
            if row is None:
                return None
            job_id = row["id"]
            self.db.execute(
                "update jobs set state = 'running', started = ?, finished = null, worker = ?, attempts = attempts + 1, "
                "error = null, lease_token = ?, lease_expires = ?, heartbeat = ?, stage = 'claimed', stage_started = ? "
                "where id = ?", [_now(), worker, token, now + lease_seconds, now, now, job_id])
        return self.get(job_id), Lease(job_id, token, worker)

    def heartbeat(self, lease: Lease, lease_seconds: float) -> bool:
        """Renew the lease; False when it is no longer held (the worker must stop working on the job)."""
        now = time.time()
        changed = self.db.execute(
            "update jobs set lease_expires = ?, heartbeat = ? where id = ? and lease_token = ? and state = 'running'",
            [now + lease_seconds, now, lease.job_id, lease.token]).rowcount
        return changed == 1

    def holds(self, lease: Lease) -> bool:
        """Whether the lease is still the job's (checked before anything is written outside the store)."""
        row = self.db.execute("select 1 from jobs where id = ? and lease_token = ? and state = 'running'",
                              [lease.job_id, lease.token]).fetchone()
        return row is not None

    def update(self, lease: Lease, **fields: Any) -> None:
        """Record progress of a running job (study_uid, series_uid, selection, stage ...).

        Raises:
            LeaseLost: the job is no longer this lease's.
        """
        unknown = set(fields) - set(_COLUMNS)
        if unknown:
            raise ValueError(f"update(): unknown job field(s) {sorted(unknown)}")
        if "stage" in fields:
            fields["stage_started"] = time.time()
        assignments = ", ".join(f"{name} = ?" for name in fields)
        changed = self.db.execute(
            f"update jobs set {assignments} where id = ? and lease_token = ? and state = 'running'",
            [*(_encode(v) for v in fields.values()), lease.job_id, lease.token]).rowcount
        if changed != 1:
            raise LeaseLost(f"job {lease.job_id} is no longer held by {lease.worker}")

    def finish(self, lease: Lease, state: str, *, error: str | None = None, result: dict[str, Any] | None = None,
               timings: dict[str, float] | None = None, retry: bool = False, max_attempts: int = 3) -> str:
        """End the attempt: done, failed or skipped; a failed attempt with ``retry`` goes back to the queue
        (after a back-off) while attempts remain. Returns the job's new state.

        Raises:
            LeaseLost: the job is no longer this lease's (nothing is changed).
        """
        if state not in ("done", "failed", "skipped"):
            raise ValueError(f"finish(): state must be done, failed or skipped, not {state!r}")
        with self._immediate():
            row = self.db.execute("select attempts, attempt_errors from jobs where id = ? and lease_token = ? "
                                  "and state = 'running'", [lease.job_id, lease.token]).fetchone()
            if row is None:
                raise LeaseLost(f"job {lease.job_id} is no longer held by {lease.worker}")
            errors = json.loads(row["attempt_errors"] or "[]")
            if error and state == "failed":
                errors.append({"attempt": row["attempts"], "at": _now(), "error": error})
            new_state = state
            fields: dict[str, Any] = {"attempt_errors": errors, "lease_token": None, "lease_expires": None,
                                      "stage": None}
            if state == "failed" and retry and row["attempts"] < max_attempts:
                new_state = "queued"
                fields.update(state="queued", reason="retry", worker=None,
                              not_before=time.time() + RETRY_BACKOFF_SECONDS * row["attempts"])
            else:
                fields.update(state=state, finished=_now(), error=_final_error(state, error, errors, max_attempts))
            if result is not None:
                fields["result"] = result
            if timings is not None:
                fields["timings"] = timings
            self._set(lease.job_id, fields)
            if new_state != "queued":
                self._ended(lease.job_id)
        return new_state

    def reap(self, max_attempts: int = 3, now: float | None = None) -> list[dict[str, Any]]:
        """Re-queue running jobs whose lease lapsed (their worker died or hung); fail them after
        ``max_attempts``. Returns the reaped jobs (id, worker, new state) so the caller can clean up."""
        now = time.time() if now is None else now
        with self._immediate():
            rows = self.db.execute("select id, worker, attempts, stage, attempt_errors from jobs "
                                   "where state = 'running' and lease_expires < ?", [now]).fetchall()
            return [self._lapse(row, max_attempts, f"worker {row['worker']} lost its lease in stage "
                                f"{row['stage']} (killed, hung or cut off)", "lease-lapsed") for row in rows]

    def requeue_all_running(self, reason: str, max_attempts: int = 3) -> list[dict[str, Any]]:
        """At node start no worker can hold a job: every running job is lapsed at once."""
        with self._immediate():
            rows = self.db.execute("select id, worker, attempts, stage, attempt_errors from jobs "
                                   "where state = 'running'").fetchall()
            return [self._lapse(row, max_attempts, reason, "restart") for row in rows]

    def fail_attempt(self, job_id: int, message: str, max_attempts: int = 3) -> dict[str, Any] | None:
        """End the running attempt of a job from outside (the supervisor killed its worker)."""
        with self._immediate():
            row = self.db.execute("select id, worker, attempts, stage, attempt_errors from jobs "
                                  "where id = ? and state = 'running'", [job_id]).fetchone()
            return self._lapse(row, max_attempts, message, "retry") if row else None

    def _lapse(self, row: sqlite3.Row, max_attempts: int, message: str, reason: str) -> dict[str, Any]:
        errors = json.loads(row["attempt_errors"] or "[]")
        errors.append({"attempt": row["attempts"], "at": _now(), "error": message})
        fields: dict[str, Any] = {"attempt_errors": errors, "lease_token": None, "lease_expires": None, "stage": None}
        if row["attempts"] >= max_attempts:
            fields.update(state="failed", finished=_now(), error=_final_error("failed", message, errors, max_attempts))
        else:
            fields.update(state="queued", reason=reason, worker=None, not_before=0)
        self._set(row["id"], fields)
        if fields["state"] == "failed":
            self._ended(row["id"])
        return {"id": row["id"], "worker": row["worker"], "state": fields["state"]}

    def cancel(self, job_id: int) -> bool:
        """Cancel a queued job (a running one finishes its attempt); True when it was cancelled."""
        with self._immediate():
            changed = self.db.execute("update jobs set state = 'cancelled', finished = ? where id = ? and state = 'queued'",
                                      [_now(), job_id]).rowcount
            if changed == 1:
                self._ended(job_id)
        return changed == 1

    def running_jobs(self) -> list[dict[str, Any]]:
        """The running jobs with their worker, stage and timestamps (the supervisor's watchdog)."""
        rows = self.db.execute("select id, worker, started, stage, stage_started, heartbeat, lease_expires "
                               "from jobs where state = 'running'").fetchall()
        return [dict(row) for row in rows]

    def counts(self) -> dict[str, int]:
        """Number of jobs in each state."""
        counted = {state: 0 for state in STATES}
        for row in self.db.execute("select state, count(*) as n from jobs group by state"):
            counted[row["state"]] = row["n"]
        return counted

    def requeue_for_reindex(self) -> int:
        """After the case index was rebuilt empty: queue every processed study again (backfill priority)."""
        rows = self.db.execute("select orthanc_study_id, max(study_uid) as study_uid from jobs where state = 'done' "
                               "group by orthanc_study_id").fetchall()
        for row in rows:
            self.enqueue(row["orthanc_study_id"], row["study_uid"], reason="reindex", force=True,
                         priority=PRIORITY_BACKFILL)
        return len(rows)

    def known_orthanc_studies(self) -> set[str]:
        """Orthanc ids of every study that ever had a job (the start-up reconciliation skips them)."""
        return {row[0] for row in self.db.execute("select distinct orthanc_study_id from jobs")}

    # ----------------------------------------------------------------- reads
    def get(self, job_id: int) -> dict[str, Any]:
        """One job as a JSON-ready dict (with its forwards).

        Raises:
            NotFoundError: no such job.
        """
        row = self.db.execute("select * from jobs where id = ?", [job_id]).fetchone()
        if row is None:
            raise NotFoundError(job_id)
        return self._with_forwards([_decode(row)])[0]

    def list(self, state: str | None = None, study_uid: str | None = None,
             orthanc_study_id: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Most recent jobs first, optionally filtered."""
        clauses, params = [], []
        for column, value in (("state", state), ("study_uid", study_uid), ("orthanc_study_id", orthanc_study_id)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        where = ("where " + " and ".join(clauses)) if clauses else ""
        rows = self.db.execute(f"select * from jobs {where} order by id desc limit ?", [*params, int(limit)])
        return self._with_forwards([_decode(row) for row in rows])

    def _with_forwards(self, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not jobs:
            return jobs
        ids = [job["id"] for job in jobs]
        rows = self.db.execute(
            f"select job_id, destination, state, attempts, last_error, updated from forwards where job_id in "
            f"({', '.join('?' * len(ids))}) order by id", ids).fetchall()
        by_job: dict[int, list[dict[str, Any]]] = {}
        for row in rows:
            by_job.setdefault(row["job_id"], []).append(
                {key: row[key] for key in ("destination", "state", "attempts", "last_error", "updated")})
        for job in jobs:
            job["forwards"] = by_job.get(job["id"], [])
            for private in ("lease_token",):
                job.pop(private, None)
        return jobs

    # --------------------------------------------------------------- outputs
    def output_for(self, series_uid: str) -> dict[str, Any] | None:
        """What we stored for this source series last time (fingerprint and objects), if anything."""
        row = self.db.execute("select * from outputs where series_uid = ?", [series_uid]).fetchone()
        return _decode(row) if row else None

    def outputs_of_study(self, study_uid: str) -> list[dict[str, Any]]:
        """Every source series of the study we produced objects for."""
        return [_decode(r) for r in self.db.execute("select * from outputs where study_uid = ?", [study_uid])]

    def record_output(self, lease: Lease, series_uid: str, study_uid: str, fingerprint: str,
                      objects: dict[str, Any]) -> None:
        """Remember the objects stored for a source series (replaces the previous record).

        Raises:
            LeaseLost: the job is no longer this lease's (nothing is recorded).
        """
        with self._immediate():
            if not self.db.execute("select 1 from jobs where id = ? and lease_token = ? and state = 'running'",
                                   [lease.job_id, lease.token]).fetchone():
                raise LeaseLost(f"job {lease.job_id} is no longer held by {lease.worker}")
            self.db.execute(
                "insert or replace into outputs (series_uid, study_uid, fingerprint, objects, updated) "
                "values (?, ?, ?, ?, ?)", [series_uid, study_uid, fingerprint, json.dumps(objects), _now()])

    # -------------------------------------------------------------- forwards
    def add_forwards(self, lease: Lease, study_uid: str, resources: list[str], destinations: list[str]) -> None:
        """Queue the sending of ``resources`` to each destination (replacing this job's earlier forwards)."""
        with self._immediate():
            if not self.db.execute("select 1 from jobs where id = ? and lease_token = ?",
                                   [lease.job_id, lease.token]).fetchone():
                raise LeaseLost(f"job {lease.job_id} is no longer held by {lease.worker}")
            self.db.execute("delete from forwards where job_id = ?", [lease.job_id])
            self.db.executemany(
                "insert into forwards (job_id, study_uid, destination, resources, state, attempts, next_attempt, updated) "
                "values (?, ?, ?, ?, 'pending', 0, 0, ?)",
                [(lease.job_id, study_uid, destination, json.dumps(resources), _now()) for destination in destinations])

    def claim_forward(self, hold_seconds: float) -> dict[str, Any] | None:
        """Take one due forward (pending, past its back-off, not held by another process)."""
        now = time.time()
        with self._immediate():
            row = self.db.execute(
                "select * from forwards where state = 'pending' and next_attempt <= ? and "
                "(claimed_until is null or claimed_until < ?) order by next_attempt, id limit 1", [now, now]).fetchone()
            if row is None:
                return None
            self.db.execute("update forwards set claimed_until = ? where id = ?", [now + hold_seconds, row["id"]])
        return _decode(row)

    def forward_result(self, forward_id: int, sent: bool, error: str | None, max_attempts: int,
                       backoff_seconds: float) -> str:
        """Record one attempt: sent, retried later (back-off doubling), or given up. Returns the new state."""
        with self._immediate():
            row = self.db.execute("select attempts, job_id, destination from forwards where id = ?", [forward_id]).fetchone()
            attempts = row["attempts"] + 1
            if sent:
                state, next_attempt = "sent", 0.0
            elif attempts >= max_attempts:
                state, next_attempt = "failed", 0.0
            else:
                state, next_attempt = "pending", time.time() + backoff_seconds * 2 ** (attempts - 1)
            self.db.execute("update forwards set state = ?, attempts = ?, next_attempt = ?, claimed_until = null, "
                            "last_error = ?, updated = ? where id = ?",
                            [state, attempts, next_attempt, None if sent else error, _now(), forward_id])
            if state == "failed":  # given up: the job says so
                changed = self.db.execute(
                    "update jobs set state = 'failed', error = ? where id = ? and state in ('done', 'failed')",
                    [f"SEG and SRs stored, but forwarding to {row['destination']} gave up after {attempts} attempt(s): "
                     f"{error}", row["job_id"]]).rowcount
                if changed:
                    self._ended(row["job_id"])
        return state

    # ------------------------------------------------------------- erasures
    def request_erasure(self, orthanc_study_id: str) -> None:
        """Remember that Orthanc deleted a study: the similar-cases service erases it from the index."""
        self.db.execute("insert into erasures (orthanc_study_id, requested) values (?, ?)", [orthanc_study_id, _now()])

    def pending_erasures(self, limit: int = 100) -> list[tuple[int, str]]:
        """(erasure id, Orthanc study id) of the erasures not done yet, oldest first."""
        rows = self.db.execute("select id, orthanc_study_id from erasures where done is null order by id limit ?",
                               [int(limit)])
        return [(row["id"], row["orthanc_study_id"]) for row in rows]

    def erasure_done(self, erasure_id: int) -> None:
        """Mark an erasure done (the study is gone from the index)."""
        self.db.execute("update erasures set done = ? where id = ?", [_now(), erasure_id])

    # ----------------------------------------------------------------- events
    def _ended(self, job_id: int) -> None:
        """Log that a job reached a final state (inside the transaction that ended it)."""
        row = self.db.execute(f"select {', '.join(EVENT_FIELDS)} from jobs where id = ?", [job_id]).fetchone()
        self.db.execute("insert into job_events (job_id, state, at, job) values (?, ?, ?, ?)",
                        [job_id, row["state"], time.time(), json.dumps(dict(row))])

    def events_after(self, event_id: int, limit: int = 500) -> list[dict[str, Any]]:
        """Job events with an id above ``event_id``, oldest first: id, job_id, state, at, job (a snapshot)."""
        rows = self.db.execute("select * from job_events where id > ? order by id limit ?", [int(event_id), int(limit)])
        return [{**dict(row), "job": json.loads(row["job"])} for row in rows]

    def last_event_id(self) -> int:
        """The id of the latest job event (0 when there is none)."""
        return int(self.db.execute("select coalesce(max(id), 0) from job_events").fetchone()[0])

    def finished_counts(self) -> dict[str, int]:
        """How many times a job reached each final state, ever (a counter: the log is append-only)."""
        counted = {state: 0 for state in FINAL_STATES}
        for row in self.db.execute("select state, count(*) as n from job_events group by state"):
            counted[row["state"]] = row["n"]
        return counted

    def transaction(self) -> contextlib.AbstractContextManager[None]:
        """One write transaction on this database (``BEGIN IMMEDIATE``, bounded wait), for the modules that
        keep tables of their own in it (:mod:`dicom_node.metrics`, :mod:`dicom_node.notifications`)."""
        return self._immediate()

    # ------------------------------------------------------------------ meta
    def get_meta(self, key: str) -> str | None:
        """A value the node keeps across restarts (e.g. the last Orthanc change it saw)."""
        row = self.db.execute("select value from meta where key = ?", [key]).fetchone()
        return None if row is None else row["value"]

    def set_meta(self, key: str, value: str) -> None:
        """Remember a value across restarts."""
        self.db.execute("insert or replace into meta (key, value) values (?, ?)", [key, value])

    # -------------------------------------------------------------- helpers
    def _set(self, job_id: int, fields: dict[str, Any]) -> None:
        assignments = ", ".join(f"{name} = ?" for name in fields)
        self.db.execute(f"update jobs set {assignments} where id = ?", [*(_encode(v) for v in fields.values()), job_id])

    @contextlib.contextmanager
    def _immediate(self) -> Iterator[None]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``: one writer at a time across processes, bounded wait."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as error:
            if "locked" in str(error):
                raise StoreBusy(f"the job store {self.path} stayed locked for more than {self.busy_seconds:.0f} s "
                                "by another process") from None
            raise
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")


def _final_error(state: str, error: str | None, errors: list[dict[str, Any]], max_attempts: int) -> str | None:
    """The error a finished job shows: its own, and for a job that used up its attempts, all of them."""
    if state != "failed":
        return error
    if len(errors) >= max_attempts and len(errors) > 1:
        listed = "; ".join(f"attempt {e['attempt']}: {e['error']}" for e in errors)
        return f"failed {len(errors)} times (MaxAttempts={max_attempts}); re-run it explicitly: {listed}"
    return error


def _encode(value: Any) -> Any:
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def _decode(row: sqlite3.Row) -> dict[str, Any]:
    decoded = dict(row)
    for column in _JSON_COLUMNS:
        if isinstance(decoded.get(column), str):
            decoded[column] = json.loads(decoded[column])
    if "force" in decoded:
        decoded["force"] = bool(decoded["force"])
    return decoded

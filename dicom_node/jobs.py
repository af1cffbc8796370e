"""The job store: one SQLite file (WAL) shared by the plugin and the workers.

States: ``queued`` -> ``running`` -> ``done`` | ``failed`` | ``skipped``.

* :meth:`JobStore.enqueue` is idempotent per study: while a job for the study is still queued,
  another STABLE_STUDY event returns that job instead of adding one.
* :meth:`JobStore.claim` hands the oldest queued job to one worker atomically, never two jobs of
  the same study at once.
* :meth:`JobStore.requeue_interrupted` puts jobs that were running when the node died (or that
  outlived the job timeout) back in the queue.
* ``outputs`` remembers, per source series, the content fingerprint and the SEG/SR we stored, so
  that a re-run of the same content does nothing and new content replaces the old objects.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

STATES = ("queued", "running", "done", "failed", "skipped")
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
"""
_COLUMNS = ("orthanc_study_id", "study_uid", "state", "reason", "force", "created", "started", "finished", "worker",
            "attempts", "series_uid", "selection", "timings", "result", "error")


class NotFoundError(KeyError):
    """No job with that id."""


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


class JobStore:
    """Jobs and per-series outputs in one SQLite database.

    Args:
        path: the database file (created with its tables if missing).
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.path), timeout=30, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA busy_timeout=30000")
        self.db.executescript(_SCHEMA)

    # ----------------------------------------------------------------- queue
    def enqueue(self, orthanc_study_id: str, study_uid: str | None = None, reason: str = "stable",
                force: bool = False) -> dict[str, Any]:
        """Queue the study unless a job for it is already waiting; return that job.

        Args:
            orthanc_study_id: Orthanc's identifier of the study.
            study_uid: StudyInstanceUID when known (the worker fills it in otherwise).
            reason: why (``stable``, ``manual``, ``restart``).
            force: re-process even if the content did not change (manual re-runs).
        """
        with self._immediate():
            waiting = self.db.execute(
                "select id from jobs where orthanc_study_id = ? and state = 'queued' order by id limit 1",
                [orthanc_study_id]).fetchone()
            if waiting:
                job_id = waiting["id"]
                if force:
                    self.db.execute("update jobs set force = 1, reason = ? where id = ?", [reason, job_id])
            else:
                job_id = self.db.execute(
                    "insert into jobs (orthanc_study_id, study_uid, state, reason, force, created, attempts) "
                    "values (?, ?, 'queued', ?, ?, ?, 0)",
                    [orthanc_study_id, study_uid, reason, int(force), _now()]).lastrowid
        return self.get(job_id)

    def claim(self, worker: str) -> dict[str, Any] | None:
        """Atomically take the oldest queued job whose study has no running job."""
        with self._immediate():
            row = self.db.execute(
                "select id from jobs where state = 'queued' and orthanc_study_id not in "
                "(select orthanc_study_id from jobs where state = 'running') order by id limit 1").fetchone()
            if row is None:
                return None
            job_id = row["id"]
            self.db.execute(
                "update jobs set state = 'running', started = ?, finished = null, worker = ?, "
                "attempts = attempts + 1, error = null where id = ?", [_now(), worker, job_id])
        return self.get(job_id)

    def update(self, job_id: int, **fields: Any) -> None:
        """Record progress of a running job (study_uid, series_uid, selection, timings ...)."""
        unknown = set(fields) - set(_COLUMNS)
        if unknown:
            raise ValueError(f"update(): unknown job field(s) {sorted(unknown)}")
        assignments = ", ".join(f"{name} = ?" for name in fields)
        self.db.execute(f"update jobs set {assignments} where id = ?", [*(_encode(v) for v in fields.values()), job_id])

    def finish(self, job_id: int, state: str, *, error: str | None = None,
               result: dict[str, Any] | None = None, timings: dict[str, float] | None = None) -> None:
        """Mark a job done, failed or skipped."""
        if state not in ("done", "failed", "skipped"):
            raise ValueError(f"finish(): state must be done, failed or skipped, not {state!r}")
        fields: dict[str, Any] = {"state": state, "finished": _now(), "error": error}
        if result is not None:
            fields["result"] = result
        if timings is not None:
            fields["timings"] = timings
        self.update(job_id, **fields)

    def requeue_interrupted(self, timeout_seconds: float | None = None) -> list[int]:
        """Put running jobs back in the queue.

        Args:
            timeout_seconds: only jobs started longer ago than this; ``None`` means all of them
                (the node is starting, so no worker can be running one).
        """
        with self._immediate():
            rows = self.db.execute("select id, started from jobs where state = 'running'").fetchall()
            if timeout_seconds is not None:
                limit = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=timeout_seconds)
                rows = [r for r in rows if r["started"] and dt.datetime.fromisoformat(r["started"]) < limit]
            ids = [r["id"] for r in rows]
            for job_id in ids:
                self.db.execute("update jobs set state = 'queued', worker = null, "
                                "reason = 'restart' where id = ?", [job_id])
        return ids

    # ----------------------------------------------------------------- reads
    def get(self, job_id: int) -> dict[str, Any]:
        """One job as a JSON-ready dict.

        Raises:
            NotFoundError: no such job.
        """
        row = self.db.execute("select * from jobs where id = ?", [job_id]).fetchone()
        if row is None:
            raise NotFoundError(job_id)
        return _decode(row)

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
        return [_decode(row) for row in rows]

    # --------------------------------------------------------------- outputs
    def output_for(self, series_uid: str) -> dict[str, Any] | None:
        """What we stored for this source series last time (fingerprint and objects), if anything."""
        row = self.db.execute("select * from outputs where series_uid = ?", [series_uid]).fetchone()
        return _decode(row) if row else None

    def outputs_of_study(self, study_uid: str) -> list[dict[str, Any]]:
        """Every source series of the study we produced objects for."""
        return [_decode(r) for r in self.db.execute("select * from outputs where study_uid = ?", [study_uid])]

    def record_output(self, series_uid: str, study_uid: str, fingerprint: str,
                      objects: dict[str, Any]) -> None:
        """Remember the objects stored for a source series (replaces the previous record)."""
        self.db.execute(
            "insert or replace into outputs (series_uid, study_uid, fingerprint, objects, updated) values (?, ?, ?, ?, ?)",
            [series_uid, study_uid, fingerprint, json.dumps(objects), _now()])

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

    # -------------------------------------------------------------- helpers
    @contextlib.contextmanager
    def _immediate(self) -> Iterator[None]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``: one writer at a time across processes."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")


def _encode(value: Any) -> Any:
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def _decode(row: sqlite3.Row) -> dict[str, Any]:
    decoded = dict(row)
    for column in ("selection", "timings", "result", "objects"):
        if isinstance(decoded.get(column), str):
            decoded[column] = json.loads(decoded[column])
    if "force" in decoded:
        decoded["force"] = bool(decoded["force"])
    return decoded

"""The job store: one SQLite file (sqlite-utils, WAL) shared by the plugin and the workers.

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

import datetime as dt
import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import sqlite_utils

STATES = ("queued", "running", "done", "failed", "skipped")


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
        connection = sqlite3.connect(str(self.path), timeout=30, isolation_level=None,
                                     check_same_thread=False)
        self.db = sqlite_utils.Database(connection)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA busy_timeout=30000")
        if "jobs" not in self.db.table_names():
            self.db["jobs"].create({
                "id": int, "orthanc_study_id": str, "study_uid": str, "state": str, "reason": str,
                "force": int, "created": str, "started": str, "finished": str, "worker": str,
                "attempts": int, "series_uid": str, "selection": str, "timings": str,
                "result": str, "error": str,
            }, pk="id", not_null={"orthanc_study_id", "state", "created"}, if_not_exists=True)
            self.db["jobs"].create_index(["state", "id"], if_not_exists=True)
            self.db["jobs"].create_index(["orthanc_study_id"], if_not_exists=True)
        if "outputs" not in self.db.table_names():
            self.db["outputs"].create({
                "series_uid": str, "study_uid": str, "fingerprint": str, "objects": str, "updated": str,
            }, pk="series_uid", if_not_exists=True)

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
            waiting = list(self.db.query(
                "select id from jobs where orthanc_study_id = ? and state = 'queued' order by id limit 1",
                [orthanc_study_id]))
            if waiting:
                job_id = waiting[0]["id"]
                if force:
                    self.db["jobs"].update(job_id, {"force": 1, "reason": reason})
            else:
                job_id = self.db["jobs"].insert({
                    "orthanc_study_id": orthanc_study_id, "study_uid": study_uid, "state": "queued",
                    "reason": reason, "force": int(force), "created": _now(), "attempts": 0,
                }).last_pk
        return self.get(job_id)

    def claim(self, worker: str) -> dict[str, Any] | None:
        """Atomically take the oldest queued job whose study has no running job."""
        with self._immediate():
            rows = list(self.db.query(
                "select id from jobs where state = 'queued' and orthanc_study_id not in "
                "(select orthanc_study_id from jobs where state = 'running') order by id limit 1"))
            if not rows:
                return None
            job_id = rows[0]["id"]
            self.db.execute(
                "update jobs set state = 'running', started = ?, finished = null, worker = ?, "
                "attempts = attempts + 1, error = null where id = ?", [_now(), worker, job_id])
        return self.get(job_id)

    def update(self, job_id: int, **fields: Any) -> None:
        """Record progress of a running job (study_uid, series_uid, selection, timings ...)."""
        self.db["jobs"].update(job_id, {k: _encode(v) for k, v in fields.items()})

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
            rows = list(self.db.query("select id, started from jobs where state = 'running'"))
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
        try:
            row = self.db["jobs"].get(job_id)
        except sqlite_utils.db.NotFoundError:
            raise NotFoundError(job_id) from None
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
        rows = self.db.query(f"select * from jobs {where} order by id desc limit ?", [*params, int(limit)])
        return [_decode(row) for row in rows]

    # --------------------------------------------------------------- outputs
    def output_for(self, series_uid: str) -> dict[str, Any] | None:
        """What we stored for this source series last time (fingerprint and objects), if anything."""
        rows = list(self.db.query("select * from outputs where series_uid = ?", [series_uid]))
        return _decode(rows[0]) if rows else None

    def outputs_of_study(self, study_uid: str) -> list[dict[str, Any]]:
        """Every source series of the study we produced objects for."""
        return [_decode(r) for r in self.db.query("select * from outputs where study_uid = ?", [study_uid])]

    def record_output(self, series_uid: str, study_uid: str, fingerprint: str,
                      objects: dict[str, Any]) -> None:
        """Remember the objects stored for a source series (replaces the previous record)."""
        self.db["outputs"].upsert({
            "series_uid": series_uid, "study_uid": study_uid, "fingerprint": fingerprint,
            "objects": json.dumps(objects), "updated": _now(),
        }, pk="series_uid")

    # -------------------------------------------------------------- helpers
    def _immediate(self) -> "_Immediate":
        return _Immediate(self.db.conn)


class _Immediate:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``: one writer at a time across processes."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self.connection = connection

    def __enter__(self) -> None:
        self.connection.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.connection.execute("ROLLBACK" if exc_type else "COMMIT")


def _encode(value: Any) -> Any:
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    decoded = dict(row)
    for column in ("selection", "timings", "result", "objects"):
        if isinstance(decoded.get(column), str):
            decoded[column] = json.loads(decoded[column])
    if "force" in decoded:
        decoded["force"] = bool(decoded["force"])
    return decoded

"""The case index shared by several machines: PostgreSQL holds the truth, each machine a cache.

:class:`SharedCaseIndex` is a :class:`~index.store.CaseIndex` whose rows, embeddings and
lesions live in PostgreSQL (``IndexDatabase``), next to a change log with a monotonic id. The
index directory of each machine (a worker, a query service) is a *cache*: the usual SQLite
rows and FAISS HNSW files, filled from PostgreSQL and kept in step with it by replaying the
change log incrementally (:meth:`SharedCaseIndex.pull`). Every query service therefore ranks
the same rows with the same algorithm and answers the same results, and a cache that is lost
or damaged is rebuilt from PostgreSQL.

Writing (:meth:`SharedCaseIndex.replace_study`, :meth:`SharedCaseIndex.delete_study`):

1. one PostgreSQL transaction under an advisory lock replaces the study's rows and appends a
   change; the lock serialises writers, so change ids become visible in increasing order and a
   reader that has applied change *n* never sees a change below *n* appear later;
2. the writer then pulls, which applies its own change (and any others) to its cache.

The cache's FAISS files are written at close and after a batch, not at every pull (a query
would pay for writing the whole graph); the consistency check at open adds what they lack from
the cache's rows, as after a crash.

Reading: every query first pulls (one indexed ``max(change_id)`` look-up when nothing changed;
``bench/scale_out.py`` measures it). The cache keeps the last applied change id and the id of
the PostgreSQL database it mirrors; a cache of another database is emptied and refilled.

Re-ranking reads candidates' embeddings from the local cache, not over the network: that is
why the cache keeps the rows and not only the FAISS files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import psycopg

from index.lesions import Lesion
from index.records import SliceRecord, StudyRecord
from index.store import CaseIndex, CaseIndexError, StudyNotIndexed

log = logging.getLogger(__name__)

WRITE_LOCK_KEY = 0x1DE7
"""PostgreSQL advisory lock of the index's writers (a transaction-level lock)."""
SCHEMA_LOCK_KEY = 0x1DE8
APPLIED_CHANGE = "shared_change_id"
"""Local meta key: the last change of the PostgreSQL log applied to this cache."""
MIRRORED_DATABASE = "shared_database_id"
"""Local meta key: the id of the PostgreSQL index this cache mirrors."""
_SCHEMA = """
CREATE TABLE IF NOT EXISTS index_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS index_studies (
    study_uid TEXT PRIMARY KEY, record TEXT NOT NULL, lesions TEXT NOT NULL, change_id BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS index_slices (
    study_uid TEXT NOT NULL REFERENCES index_studies (study_uid) ON DELETE CASCADE,
    slice_index INTEGER NOT NULL, sop_instance_uid TEXT NOT NULL, z_position_mm DOUBLE PRECISION,
    embedding BYTEA NOT NULL, roi_embedding BYTEA,
    PRIMARY KEY (study_uid, slice_index)
);
CREATE TABLE IF NOT EXISTS index_changes (
    change_id BIGSERIAL PRIMARY KEY, study_uid TEXT NOT NULL, kind TEXT NOT NULL,
    changed_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS index_changes_study ON index_changes (study_uid, change_id);
"""


class SharedIndexUnavailable(CaseIndexError, RuntimeError):
    """PostgreSQL, which holds the shared index, cannot be reached (the cache is not queried stale)."""


@contextlib.contextmanager
def _reachable() -> Iterator[None]:
    """PostgreSQL's connection errors as :class:`SharedIndexUnavailable` (what callers handle)."""
    try:
        yield
    except psycopg.OperationalError as error:
        raise SharedIndexUnavailable(f"the shared case index in PostgreSQL is unreachable: "
                                     f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from None


class SharedCaseIndex(CaseIndex):
    """A case index whose truth is in PostgreSQL; ``directory`` is this machine's cache.

    Args:
        directory: the local cache (SQLite rows + FAISS files), created when missing.
        database_url: ``postgresql://`` URL of the shared index (no password in it: libpq's
            ``passfile`` or ``~/.pgpass``).
        **options: the keyword arguments of :class:`~index.store.CaseIndex`.
    """

    @classmethod
    def open(cls, directory: str | os.PathLike[str], database_url: str = "", **options: Any) -> SharedCaseIndex:
        """Open the cache in ``directory`` and bring it up to date with ``database_url``."""
        return cls(directory, database_url, **options)

    def __init__(self, directory: str | os.PathLike[str], database_url: str, **options: Any) -> None:
        if not database_url:
            raise ValueError("SharedCaseIndex needs the postgresql:// URL of the shared index")
        if options.get("read_only"):
            raise ValueError("a SharedCaseIndex writes its cache when it pulls: it cannot be read_only")
        self._pulling = 0
        self._unsaved = False
        super().__init__(directory, **options)
        self.database_url = database_url
        with _reachable():
            self._pg = psycopg.connect(database_url, autocommit=True, application_name="abscess-node-index",
                                       connect_timeout=10)
        with _reachable(), self._pg.transaction():
            self._pg.execute("SELECT pg_advisory_xact_lock(%s)", [SCHEMA_LOCK_KEY])
            self._pg.execute(_SCHEMA)
            self._pg.execute("INSERT INTO index_meta (key, value) VALUES ('database_id', %s) ON CONFLICT DO NOTHING",
                             [uuid.uuid4().hex])
        self.database_id = self._pg.execute("SELECT value FROM index_meta WHERE key = 'database_id'").fetchone()[0]
        if self.pull():
            self.save_cache()  # a cache built or brought up to date at start is kept for the next start

    def close(self) -> None:
        """Write the FAISS files if the cache changed since they were written; close the connections."""
        self.save_cache()
        self._pg.close()
        super().close()

    def save_cache(self) -> None:
        """Write the FAISS files when pulls changed the cache since they were last written.

        Pulls do not write them (a query would pay for writing the whole graph): the files lag,
        the cache's SQLite rows do not, and the consistency check at open adds what the files
        lack from those rows (as after a crash).
        """
        with self._lock:
            if self._unsaved and self.dim is not None:
                super()._save_indexes()
                self._unsaved = False

    # -- writing: PostgreSQL first, then the cache follows the log ------------------------------
    def replace_study(
        self,
        study: StudyRecord,
        slices: Sequence[SliceRecord],
        slice_embeddings: np.ndarray,
        roi_embeddings: np.ndarray | None = None,
        lesions: Iterable[Lesion] = (),
    ) -> None:
        """Index a study in PostgreSQL (replacing its earlier rows), then bring the cache up to date.

        Same arguments and errors as :meth:`index.store.CaseIndex.replace_study`.
        """
        slice_vectors, roi_vectors, roi_rows = self._validate(study, slices, slice_embeddings, roi_embeddings)
        lesions = list(lesions)
        if not all(isinstance(lesion, Lesion) for lesion in lesions):
            raise TypeError("lesions must be index.lesions.Lesion objects")
        roi_by_row = dict(zip(roi_rows.tolist(), roi_vectors))
        with self._lock, self._writing() as cursor:
            cursor.execute("DELETE FROM index_slices WHERE study_uid = %s", [study.study_uid])
            change_id = self._log_change(cursor, study.study_uid, "replace")
            cursor.execute(
                "INSERT INTO index_studies (study_uid, record, lesions, change_id) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (study_uid) DO UPDATE SET record = excluded.record, lesions = excluded.lesions, "
                "change_id = excluded.change_id",
                [study.study_uid, json.dumps(study.as_dict()), json.dumps([lesion.as_dict() for lesion in lesions]),
                 change_id])
            with cursor.copy("COPY index_slices (study_uid, slice_index, sop_instance_uid, z_position_mm, embedding, "
                             "roi_embedding) FROM STDIN") as copy:
                for row, (record, vector) in enumerate(zip(slices, slice_vectors)):
                    roi = roi_by_row.get(row)
                    copy.write_row([study.study_uid, int(record.slice_index), record.sop_instance_uid,
                                    record.z_position_mm, vector.tobytes(), None if roi is None else roi.tobytes()])
        self.pull()

    def delete_study(self, study_uid: str) -> None:
        """Remove a study from the shared index (every cache follows at its next pull).

        Raises:
            StudyNotIndexed: If the study is not indexed.
        """
        with self._lock, self._writing() as cursor:
            cursor.execute("DELETE FROM index_studies WHERE study_uid = %s", [study_uid])
            if cursor.rowcount == 0:
                raise StudyNotIndexed(study_uid)
            self._log_change(cursor, study_uid, "delete")
        self.pull()

    # -- the cache follows the change log ---------------------------------------------------------
    def pull(self) -> int:
        """Apply the changes committed in PostgreSQL since this cache's last one; how many studies changed.

        Each study changed since then is applied once, in the order of its latest change: its
        current rows are copied into the cache (or it is removed when it is gone).

        Raises:
            SharedIndexUnavailable: PostgreSQL cannot be reached.
        """
        with self._lock, _reachable():
            applied = int(self._meta(APPLIED_CHANGE) or 0)
            if self._meta(MIRRORED_DATABASE) != self.database_id:
                applied = self._forget_other_database()
            latest = self._pg.execute("SELECT coalesce(max(change_id), 0) FROM index_changes").fetchone()[0]
            if latest <= applied:
                return 0
            changed = self._pg.execute(
                "SELECT study_uid, max(change_id) AS last FROM index_changes WHERE change_id > %s AND change_id <= %s "
                "GROUP BY study_uid ORDER BY last", [applied, latest]).fetchall()
            with self._applying():
                for study_uid, _ in changed:
                    self._apply(study_uid)
            with self._transaction():
                self._set_meta(APPLIED_CHANGE, str(latest))
            log.info("case index cache %s: %d studies applied up to change %d", self.directory, len(changed), latest)
            return len(changed)

    def applied_change(self) -> int:
        """The last change of the shared log this cache has applied."""
        return int(self._meta(APPLIED_CHANGE) or 0)

    def _apply(self, study_uid: str) -> None:
        row = self._pg.execute("SELECT record, lesions FROM index_studies WHERE study_uid = %s", [study_uid]).fetchone()
        if row is None:
            with contextlib.suppress(StudyNotIndexed):
                CaseIndex.delete_study(self, study_uid)
            return
        record, lesions = row
        rows = self._pg.execute(
            "SELECT slice_index, sop_instance_uid, z_position_mm, embedding, roi_embedding FROM index_slices "
            "WHERE study_uid = %s ORDER BY slice_index", [study_uid]).fetchall()
        slice_embeddings = np.frombuffer(b"".join(r[3] for r in rows), dtype=np.float32).reshape(len(rows), -1)
        roi_embeddings = np.zeros_like(slice_embeddings)
        for position, r in enumerate(rows):
            if r[4] is not None:
                roi_embeddings[position] = np.frombuffer(r[4], dtype=np.float32)
        CaseIndex.replace_study(
            self, StudyRecord(**json.loads(record)), [SliceRecord(r[0], r[1], r[2]) for r in rows],
            slice_embeddings, roi_embeddings, [Lesion.from_dict(lesion) for lesion in json.loads(lesions)])

    def _forget_other_database(self) -> int:
        """The cache mirrors another PostgreSQL index (or none yet): empty it; returns 0 (nothing applied)."""
        stale = CaseIndex.study_uids(self)
        if stale:
            log.warning("case index cache %s mirrors another database: dropping its %d studies", self.directory,
                        len(stale))
        with self._applying():
            for study_uid in stale:
                CaseIndex.delete_study(self, study_uid)
        with self._transaction():
            self._set_meta(MIRRORED_DATABASE, self.database_id)
            self._set_meta(APPLIED_CHANGE, "0")
        return 0

    @contextlib.contextmanager
    def _applying(self) -> Iterator[None]:
        """Changes applied to the cache: one batch (compaction checked once, at its end), files not written."""
        self._pulling += 1
        try:
            with CaseIndex.batch(self):
                yield
        finally:
            self._pulling -= 1

    def _save_indexes(self) -> None:
        """Inside a pull the FAISS files are only marked stale (:meth:`save_cache` writes them)."""
        if self._pulling:
            self._unsaved = True
        else:
            super()._save_indexes()
            self._unsaved = False

    @contextlib.contextmanager
    def _writing(self) -> Iterator[psycopg.Cursor]:
        with _reachable(), self._pg.transaction(), self._pg.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [WRITE_LOCK_KEY])
            yield cursor

    @staticmethod
    def _log_change(cursor: psycopg.Cursor, study_uid: str, kind: str) -> int:
        cursor.execute("INSERT INTO index_changes (study_uid, kind) VALUES (%s, %s) RETURNING change_id",
                       [study_uid, kind])
        return cursor.fetchone()[0]

    # -- reading: the cache is brought up to date first ---------------------------------------------
    def search_slices(self, query_embeddings: np.ndarray, k: int = 10, **options: Any) -> list:
        """:meth:`index.store.CaseIndex.search_slices` after a pull."""
        self.pull()
        return super().search_slices(query_embeddings, k, **options)

    def search_studies(self, query_embeddings: np.ndarray, **options: Any) -> list:
        """:meth:`index.store.CaseIndex.search_studies` after a pull."""
        self.pull()
        return super().search_studies(query_embeddings, **options)

    def similar_studies(self, study_uid: str, **options: Any) -> list:
        """:meth:`index.store.CaseIndex.similar_studies` after a pull."""
        self.pull()
        return super().similar_studies(study_uid, **options)

    def get_study(self, study_uid: str) -> StudyRecord:
        """:meth:`index.store.CaseIndex.get_study` after a pull."""
        self.pull()
        return super().get_study(study_uid)

    def study_uids(self) -> list[str]:
        """:meth:`index.store.CaseIndex.study_uids` after a pull."""
        self.pull()
        return super().study_uids()

    def study_uids_with(self, orthanc_study_id: str) -> list[str]:
        """:meth:`index.store.CaseIndex.study_uids_with` after a pull."""
        self.pull()
        return super().study_uids_with(orthanc_study_id)

    def orthanc_study_ids(self) -> dict[str, str]:
        """:meth:`index.store.CaseIndex.orthanc_study_ids` after a pull."""
        self.pull()
        return super().orthanc_study_ids()

"""The case index: FAISS HNSW vector indexes + SQLite metadata, with crash-safe persistence.

(Over 500 lines on purpose: :class:`CaseIndex` is one object because every write and query
shares its lock, its generation counter and its two vector spaces; the FAISS side and the
ranking already live in :mod:`index.vectors` and :mod:`index.retrieval`.)

Layout of an index directory::

    index.sqlite    studies, slices, rois, lesions, meta (sqlite3, WAL mode)
    slices.faiss    IndexIDMap2(HNSW graph, inner product) over the slice embeddings
    rois.faiss      the same over the ROI embeddings (slices with a predicted mask only)

**SQLite is the source of truth.** Every slice and ROI row keeps its float32 embedding, so
both FAISS files can always be rebuilt. A vector's id is its row id (AUTOINCREMENT: never
reused, so ids grow with commit order). Re-indexing a study marks its old rows dead
(``live = 0``, ``retired`` = the generation that killed them) in the same transaction that
inserts the new ones: HNSW cannot delete, so dead vectors stay in the graph as tombstones and
every search excludes them (a FAISS ``IDSelector`` on the HNSW search, so the graph walk
continues past them instead of returning fewer results). When tombstones exceed
``compact_fraction`` of a FAISS index, it is rebuilt from the live embeddings (compaction),
the dead rows are deleted and ``meta.compacted`` records the generation.

**Vector encodings.** ``flat`` graphs keep float32 vectors; ``sq8`` graphs keep them 8-bit
scalar-quantised (a quarter of the memory, see ``bench/index.py`` for the recall). The encoding
is recorded in ``meta.vector_encoding``; a writer opened with another encoding converts the
index (rebuild) and readers follow.

**Crash safety.** A study is committed to SQLite first, then added to the in-memory indexes,
then the FAISS files are written atomically (temp file, fsync, ``os.replace``, fsync of the
directory). At open a consistency check compares the ids in each FAISS file with the rows:
ids missing from the file (a crash after the commit) are added from the stored embeddings;
an unreadable file, a count mismatch (ntotal vs id map) or ids the database does not know
(a stale file) make it rebuild the index from the stored embeddings. A ``kill -9`` at any
point therefore leaves an index that opens, passes the check and answers queries.

**Writers and readers.** Use one writer at a time (the node serialises its workers with a
file lock). Any number of processes may read: each notices commits by the ``generation``
counter in ``meta`` and catches up *incrementally* before it searches (rows above the largest
id it has seen, tombstones retired after the generation it has seen; no full check). A
``read_only`` index (the query service's) never writes and never waits for a writer: SQLite
in WAL mode lets it read while a writer commits, it takes no file lock, it keeps new vectors
in a small exact-search tier instead of changing a graph that searches are walking, and it
swaps in a freshly loaded graph in a background thread when that tier grows or a writer
compacted. Its searches run outside its lock.

The FAISS side (files, consistency check, repair, GPU build, snapshots) is
:mod:`index.vectors`; the ranking algorithms are :mod:`index.retrieval`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np

from index.lesions import Lesion
from index.records import SliceRecord, StudyRecord
from index.retrieval import (
    DEFAULT_IMAGE_WEIGHT,
    HIT_TABLE_K,
    LOCALIZATION_L,
    LesionFilter,
    SliceHit,
    StudyHit,
    mixed_score,
    normalize_rows,
    parse_filters,
    rank_studies,
)
from index.vectors import ENCODINGS, SPACES, ConsistencyReport, VectorSpace, remove_orphaned_temporaries

__all__ = [
    "CaseIndex",
    "CaseIndexError",
    "ConsistencyReport",
    "DimensionMismatch",
    "ReadOnlyIndex",
    "SliceRecord",
    "StudyNotIndexed",
    "StudyRecord",
]

log = logging.getLogger(__name__)

DB_FILE = "index.sqlite"
REFRESH_VECTORS = 5_000
"""A read-only index reloads its graphs in the background once this many vectors wait in its
exact-search tier (each query scans that tier: 5,000 x 768 floats per query slice is ~4 M MACs)."""
_ADD_BATCH = 65_536
MMAP_BYTES = 1 << 31
"""SQLite maps this much of the database into memory (its compile-time ceiling is 2 GiB)."""
_TABLES = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    series_uid TEXT, patient_id TEXT, patient_name TEXT, patient_sex TEXT, patient_birth_date TEXT,
    study_date TEXT, study_description TEXT, modalities TEXT, accession_number TEXT,
    orthanc_study_id TEXT, orthanc_series_id TEXT, content_fingerprint TEXT, extra TEXT,
    slice_count INTEGER NOT NULL, roi_count INTEGER NOT NULL, indexed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS slices (
    vector_id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_uid TEXT NOT NULL, slice_index INTEGER NOT NULL, sop_instance_uid TEXT,
    z_position_mm REAL, live INTEGER NOT NULL, embedding BLOB, retired INTEGER
);
CREATE INDEX IF NOT EXISTS slices_study ON slices (study_uid, live);
CREATE TABLE IF NOT EXISTS rois (
    vector_id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_uid TEXT NOT NULL, slice_index INTEGER NOT NULL, live INTEGER NOT NULL, embedding BLOB,
    retired INTEGER
);
CREATE INDEX IF NOT EXISTS rois_study ON rois (study_uid, live);
CREATE TABLE IF NOT EXISTS lesions (
    study_uid TEXT NOT NULL, label INTEGER NOT NULL,
    volume_ml REAL, longest_axial_diameter_mm REAL, core_mean_hu REAL, core_sd_hu REAL,
    loculi INTEGER, first_slice INTEGER, last_slice INTEGER, space TEXT, side TEXT,
    descriptors TEXT NOT NULL,
    PRIMARY KEY (study_uid, label)
);
"""
_RETIRED_INDEXES = """
CREATE INDEX IF NOT EXISTS slices_retired ON slices (retired) WHERE retired IS NOT NULL;
CREATE INDEX IF NOT EXISTS rois_retired ON rois (retired) WHERE retired IS NOT NULL;
"""
_LESION_COLUMNS = (
    "volume_ml",
    "longest_axial_diameter_mm",
    "core_mean_hu",
    "core_sd_hu",
    "loculi",
    "first_slice",
    "last_slice",
    "space",
    "side",
)
_STUDY_TEXT_FIELDS = tuple(name for name in StudyRecord.__dataclass_fields__ if name not in ("study_uid", "modalities", "extra"))


class CaseIndexError(Exception):
    """Base class of the errors callers of the case index handle."""


class StudyNotIndexed(CaseIndexError, KeyError):
    """The study (by StudyInstanceUID) is not in the index."""

    def __str__(self) -> str:
        return f"study {self.args[0]} is not in the case index; index it first (replace_study)"


class DimensionMismatch(CaseIndexError, ValueError):
    """Embeddings have a different dimension than the index holds."""


class ReadOnlyIndex(CaseIndexError, PermissionError):
    """A write was asked of an index opened with ``read_only=True``."""


class CaseIndex:
    """FAISS HNSW + SQLite case index of slice and ROI embeddings and lesion descriptors.

    Open with :meth:`open`; write with :meth:`replace_study` (many at once inside
    :meth:`batch`); query with :meth:`search_slices`, :meth:`search_studies` and
    :meth:`similar_studies`. Thread-safe within a process.
    """

    @classmethod
    def open(cls, directory: str | os.PathLike[str], **options: Any) -> CaseIndex:
        """Open (or create) the index in ``directory`` and check/repair it against SQLite.

        ``options`` are the constructor's keyword arguments (dim, hnsw_m, ef_construction,
        ef_search, compact_fraction, vector_encoding, read_only, refresh_vectors).
        """
        return cls(directory, **options)

    def __init__(
        self,
        directory: str | os.PathLike[str],
        dim: int | None = None,
        hnsw_m: int = 32,
        ef_construction: int = 200,
        ef_search: int = 32,
        compact_fraction: float = 0.25,
        vector_encoding: str | None = None,
        read_only: bool = False,
        refresh_vectors: int = REFRESH_VECTORS,
    ) -> None:
        """Open (or create) the index in ``directory`` and check/repair it against SQLite.

        Args:
            directory: Folder of the index files (created when missing).
            dim: Embedding dimension; None takes it from the index, or from the first study.
            hnsw_m: HNSW graph degree M for new builds.
            ef_construction: HNSW efConstruction for new builds.
            ef_search: HNSW efSearch at query time (raised to k when k is larger). 32: recall@10
                0.997 at 1M vectors (bench/index.py), top-5 study answers as at 512 (bench/query.py).
            compact_fraction: Compact an index when its tombstones exceed this fraction.
            vector_encoding: ``flat`` or ``sq8`` (see :data:`index.vectors.ENCODINGS`); None keeps
                the index's own (``flat`` for a new one). A writer given another encoding than
                the stored one converts the index.
            read_only: Never write (no rows, no FAISS files; a damaged file is repaired in
                memory only), never take a lock a writer holds, search outside the lock and keep
                up with writers incrementally (the query service's mode).
            refresh_vectors: Read-only: reload the graphs in the background once this many
                vectors wait in the exact-search tier.

        Raises:
            DimensionMismatch: If ``dim`` differs from the stored dimension.
            ValueError: If an option is out of range.
        """
        if not 0.0 < compact_fraction <= 1.0:
            raise ValueError(f"compact_fraction must be in (0, 1], got {compact_fraction}")
        if vector_encoding is not None and vector_encoding not in ENCODINGS:
            raise ValueError(f"vector_encoding must be one of {', '.join(ENCODINGS)}, not {vector_encoding!r}")
        if refresh_vectors < 1:
            raise ValueError(f"refresh_vectors must be >= 1, got {refresh_vectors}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.hnsw_m, self.ef_construction, self.ef_search = hnsw_m, ef_construction, ef_search
        self.compact_fraction = compact_fraction
        self.read_only = read_only
        self.refresh_vectors = refresh_vectors
        self._lock = threading.RLock()
        self._refresh_thread: threading.Thread | None = None
        self._batch_depth = 0
        self._db = self._connect()
        if not read_only:
            remove_orphaned_temporaries(self.directory)
        stored_dim, stored_encoding = self._meta("dim"), self._meta("vector_encoding")
        if stored_dim is not None and dim is not None and int(stored_dim) != dim:
            raise DimensionMismatch(f"index in {self.directory} holds {stored_dim}-d embeddings, not {dim}-d")
        self.dim = int(stored_dim) if stored_dim is not None else dim
        stored_encoding = stored_encoding or "flat"  # indexes written before encodings were recorded
        self.vector_encoding = stored_encoding if read_only or vector_encoding is None else vector_encoding
        converting = self.vector_encoding != stored_encoding and stored_dim is not None
        self._spaces = {name: VectorSpace(self.directory, name, self, self.vector_encoding) for name in SPACES}
        self.last_check: list[ConsistencyReport] = []
        with self._lock:
            if not read_only:
                with self._transaction():
                    self._set_meta("vector_encoding", self.vector_encoding)
                    if self.dim is not None:
                        self._set_meta("dim", str(self.dim))
            with self._read_snapshot():  # the check sees one consistent state of the rows
                self._generation = self._meta("generation")
                if self.dim is not None:
                    for space in self._spaces.values():
                        space.load(self.dim)
                    self.last_check = [space.sync(self.dim, save=not read_only) for space in self._spaces.values()]
            if converting:
                log.info("case index %s converted to %s vectors", self.directory, self.vector_encoding)
                with self._transaction():
                    self._generation = self._next_generation()
                    self._set_meta("compacted", self._generation)  # readers reload the new graphs

    def _connect(self) -> sqlite3.Connection:
        """The connection, with the schema created or migrated when needed (a reader writes nothing otherwise)."""
        db = sqlite3.connect(self.directory / DB_FILE, check_same_thread=False, timeout=60, isolation_level=None)
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        columns = {row[1] for row in db.execute("PRAGMA table_info(slices)")}
        lesion_columns = {row[1] for row in db.execute("PRAGMA table_info(lesions)")}
        current = ({"meta", "studies", "slices", "rois", "lesions"} <= tables and "retired" in columns
                   and "side" in lesion_columns)
        if not current or db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            db.execute("PRAGMA journal_mode = WAL")
            db.executescript(_TABLES)
            for table in ("slices", "rois"):  # indexes written before tombstones carried their generation
                if "retired" not in {row[1] for row in db.execute(f"PRAGMA table_info({table})")}:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN retired INTEGER")
            if "side" not in {row[1] for row in db.execute("PRAGMA table_info(lesions)")}:
                db.execute("ALTER TABLE lesions ADD COLUMN side TEXT")  # indexes written before lesions had a side
            db.executescript(_RETIRED_INDEXES)
        if not self.read_only:
            db.execute("PRAGMA synchronous = FULL")
        db.execute(f"PRAGMA mmap_size = {MMAP_BYTES}")  # re-rank reads of embeddings without a read() per page
        return db

    def close(self) -> None:
        """Close the SQLite connection (the FAISS files are already on disk)."""
        refresh = self._refresh_thread
        if refresh is not None:
            refresh.join()
        self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- writing ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def batch(self) -> Iterator[Self]:
        """Write many studies at once: each is committed to SQLite as usual, the FAISS files
        are written (and tombstones compacted) once, when the block ends.

        A crash inside the block loses nothing: the check at the next open adds the committed
        vectors that the files lack.
        """
        with self._lock:
            self._batch_depth += 1
            try:
                yield self
            finally:
                self._batch_depth -= 1
                if self._batch_depth == 0 and self.dim is not None:
                    self._save_indexes()
                    self._compact_if_needed()

    def replace_study(
        self,
        study: StudyRecord,
        slices: Sequence[SliceRecord],
        slice_embeddings: np.ndarray,
        roi_embeddings: np.ndarray | None = None,
        lesions: Iterable[Lesion] = (),
    ) -> None:
        """Index a study, replacing whatever was indexed for its StudyInstanceUID before.

        Old vectors become tombstones, the new ones are added; the study never appears twice.

        Args:
            study: Study metadata.
            slices: One record per embedding row.
            slice_embeddings: float [n, D] slice embeddings (normalised here; no zero rows).
            roi_embeddings: float [n, D] ROI embeddings; all-zero rows mean "no ROI on that
                slice" and are not indexed. None: no ROI vectors.
            lesions: The study's lesions.

        Raises:
            ValueError: If the shapes disagree or embeddings are not finite / are zero.
            DimensionMismatch: If D differs from the index's dimension.
            ReadOnlyIndex: If the index was opened read-only.
        """
        self._check_writable()
        slice_vectors, roi_vectors, roi_rows = self._validate(study, slices, slice_embeddings, roi_embeddings)
        lesions = list(lesions)
        if not all(isinstance(lesion, Lesion) for lesion in lesions):
            raise TypeError("lesions must be index.lesions.Lesion objects")
        with self._lock:
            with self._transaction():  # writers are serialised from here: catching up inside sees every commit
                self._sync_if_stale()
                if self.dim is None:
                    self.dim = slice_vectors.shape[1]
                    self._set_meta("dim", str(self.dim))
                    for space in self._spaces.values():
                        space.sync(self.dim, save=False)
                generation = self._next_generation()
                old_ids = self._retire(study.study_uid, generation)
                self._db.execute("DELETE FROM lesions WHERE study_uid = ?", [study.study_uid])
                row = self._study_row(study, len(slices), len(roi_rows))
                self._db.execute(
                    f"INSERT OR REPLACE INTO studies ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                    list(row.values()),
                )
                self._db.executemany(
                    "INSERT INTO slices (study_uid, slice_index, sop_instance_uid, z_position_mm, live, embedding) "
                    "VALUES (?, ?, ?, ?, 1, ?)",
                    [
                        (study.study_uid, int(record.slice_index), record.sop_instance_uid, record.z_position_mm,
                         vector.tobytes())
                        for record, vector in zip(slices, slice_vectors)
                    ],
                )
                self._db.executemany(
                    "INSERT INTO rois (study_uid, slice_index, live, embedding) VALUES (?, ?, 1, ?)",
                    [
                        (study.study_uid, int(slices[row].slice_index), vector.tobytes())
                        for row, vector in zip(roi_rows, roi_vectors)
                    ],
                )
                self._db.executemany(
                    f"INSERT INTO lesions (study_uid, label, {', '.join(_LESION_COLUMNS)}, descriptors) "
                    f"VALUES (?, ?, {', '.join('?' * len(_LESION_COLUMNS))}, ?)",
                    [
                        (study.study_uid, lesion.label, *(getattr(lesion, column) for column in _LESION_COLUMNS),
                         json.dumps(lesion.as_dict()))
                        for lesion in lesions
                    ],
                )
                new_ids = {name: self._live_ids(space.table, study.study_uid) for name, space in self._spaces.items()}
            self._generation = generation
            # Committed: SQLite is now the truth. Mirror it into FAISS and persist.
            for name, vectors in (("slice", slice_vectors), ("roi", roi_vectors)):
                space = self._spaces[name]
                if new_ids[name].size:
                    space.add(new_ids[name], vectors)
                space.retire(old_ids[name])
            if not self._batch_depth:
                self._save_indexes()
                self._compact_if_needed()

    def delete_study(self, study_uid: str) -> None:
        """Remove a study from the index (its vectors become tombstones).

        Raises:
            StudyNotIndexed: If the study is not indexed.
            ReadOnlyIndex: If the index was opened read-only.
        """
        self._check_writable()
        with self._lock:
            with self._transaction():
                self._sync_if_stale()
                if self._db.execute("DELETE FROM studies WHERE study_uid = ?", [study_uid]).rowcount == 0:
                    raise StudyNotIndexed(study_uid)
                generation = self._next_generation()
                old_ids = self._retire(study_uid, generation)
                self._db.execute("DELETE FROM lesions WHERE study_uid = ?", [study_uid])
            self._generation = generation
            for name, space in self._spaces.items():
                space.retire(old_ids[name])
            if not self._batch_depth:
                self._compact_if_needed()

    def compact(self) -> None:
        """Rebuild both FAISS indexes from the live embeddings and delete the dead rows.

        Raises:
            ReadOnlyIndex: If the index was opened read-only.
        """
        self._check_writable()
        with self._lock:
            if self.dim is None:
                return
            for space in self._spaces.values():
                space.rebuild(self.dim)
            self._save_indexes()
            with self._transaction():
                for space in self._spaces.values():
                    self._db.execute(f"DELETE FROM {space.table} WHERE live = 0")
                self._generation = self._next_generation()
                self._set_meta("compacted", self._generation)  # readers reload the compacted files

    def check_consistency(self) -> list[ConsistencyReport]:
        """Compare each FAISS index with its SQLite rows (no repair).

        Returns:
            One report per vector space ("slice", "roi").
        """
        with self._lock:
            self._sync_if_stale()
            with self._read_snapshot():
                return [space.check() for space in self._spaces.values()]

    # -- reading ----------------------------------------------------------------------------
    def get_study(self, study_uid: str) -> StudyRecord:
        """Metadata of an indexed study.

        Raises:
            StudyNotIndexed: If the study is not indexed.
        """
        with self._lock:
            rows = self._studies([study_uid])
        if study_uid not in rows:
            raise StudyNotIndexed(study_uid)
        return rows[study_uid]

    def study_uids_with(self, orthanc_study_id: str) -> list[str]:
        """StudyInstanceUIDs indexed under an Orthanc study id (what to erase when Orthanc deletes it)."""
        with self._lock:
            rows = self._db.execute("SELECT study_uid FROM studies WHERE orthanc_study_id = ?", [orthanc_study_id])
            return [row[0] for row in rows]

    def orthanc_study_ids(self) -> dict[str, str]:
        """StudyInstanceUID -> Orthanc study id of every indexed study that has one."""
        with self._lock:
            rows = self._db.execute("SELECT study_uid, orthanc_study_id FROM studies WHERE orthanc_study_id != ''")
            return {row[0]: row[1] for row in rows}

    def study_uids(self) -> list[str]:
        """StudyInstanceUIDs of all indexed studies, sorted."""
        with self._lock:
            return [row[0] for row in self._db.execute("SELECT study_uid FROM studies ORDER BY study_uid")]

    def lesions(self, study_uid: str) -> list[Lesion]:
        """Lesions of a study, by label (empty when it has none)."""
        with self._lock:
            return self._lesions([study_uid]).get(study_uid, [])

    def slice_instance_uids(self, study_uid: str) -> dict[int, str]:
        """slice index -> SOPInstanceUID of the live slices of a study (for localised results)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT slice_index, sop_instance_uid FROM slices WHERE study_uid = ? AND live = 1", [study_uid]
            ).fetchall()
        return {int(index): uid for index, uid in rows if uid}

    def study_embeddings(self, study_uid: str, space: str = "slice") -> tuple[np.ndarray, np.ndarray]:
        """The stored embeddings of an indexed study.

        Args:
            study_uid: StudyInstanceUID.
            space: "slice" or "roi".

        Returns:
            (slice_indices int [m], embeddings float32 [m, D]) ordered by slice index.

        Raises:
            StudyNotIndexed: If the study is not indexed.
        """
        table = self._space(space).table
        with self._lock:
            rows = self._db.execute(
                f"SELECT slice_index, embedding FROM {table} WHERE study_uid = ? AND live = 1 ORDER BY slice_index",
                [study_uid],
            ).fetchall()
            if not rows and study_uid not in self._studies([study_uid]):
                raise StudyNotIndexed(study_uid)
        return self._unpack(rows)

    def embeddings_of_studies(self, study_uids: Sequence[str], space: str = "slice") -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The embeddings of several studies in one go (studies without rows are left out).

        The vectors come from memory where the index holds them exactly (its recent tier, a flat
        graph) and from the database otherwise.

        Returns:
            study_uid -> (slice_indices int [m], embeddings float32 [m, D]) ordered by slice index.
        """
        vector_space = self._space(space)
        with self._lock:
            rows = self._db.execute(
                f"SELECT study_uid, slice_index, vector_id FROM {vector_space.table} "
                "WHERE study_uid IN (SELECT value FROM json_each(?)) AND live = 1 ORDER BY study_uid, slice_index",
                [json.dumps(list(study_uids))],
            ).fetchall()
            snapshot = vector_space.snapshot()
        if not rows:
            return {}
        ids = np.fromiter((row[2] for row in rows), dtype=np.int64, count=len(rows))
        with self._search_guard():
            found, vectors = snapshot.stored_vectors(ids, self.dim)
        if not found.all():
            with self._lock:
                for stored_ids, stored in self.embeddings_by_id(vector_space.table, ids[~found]):
                    vectors[np.searchsorted(ids, stored_ids, sorter=np.argsort(ids))] = stored
        studies = np.asarray([row[0] for row in rows])
        slice_indices = np.fromiter((row[1] for row in rows), dtype=np.int64, count=len(rows))
        starts = np.flatnonzero(np.r_[True, studies[1:] != studies[:-1]])
        ends = np.r_[starts[1:], len(rows)]
        return {str(studies[start]): (slice_indices[start:end], vectors[start:end]) for start, end in zip(starts, ends)}

    def vector_count(self, space: str = "slice", *, live_only: bool = True) -> int:
        """Number of vectors in a space: live rows, or everything searchable (graph, tombstones, recent tier)."""
        with self._lock:
            vector_space = self._space(space)
            if live_only:
                return int(self._db.execute(f"SELECT count(*) FROM {vector_space.table} WHERE live = 1").fetchone()[0])
            in_graph = 0 if vector_space.index is None else int(vector_space.index.ntotal)
            return in_graph + int(vector_space.recent_ids.size)

    def tombstone_count(self, space: str = "slice") -> int:
        """Number of dead vectors still in a FAISS index (until compaction)."""
        return int(self._space(space).dead_ids.size)

    def pending_vectors(self, space: str = "slice") -> int:
        """Vectors a read-only index holds in its exact-search tier (not yet in its graph)."""
        return int(self._space(space).recent_ids.size)

    def wait_for_refresh(self) -> None:
        """Block until a running background graph reload (read-only index) has finished."""
        refresh = self._refresh_thread
        if refresh is not None:
            refresh.join()

    # -- queries ----------------------------------------------------------------------------
    def search_slices(
        self,
        query_embeddings: np.ndarray,
        k: int = 10,
        *,
        space: str = "slice",
        query_slice_indices: Sequence[int] | None = None,
        exclude_study_uid: str | None = None,
    ) -> list[list[SliceHit]]:
        """Slice-wise kNN (Khun Jush et al., eq. 1): the ``k`` most similar database slices.

        Args:
            query_embeddings: [n, D] (or [D]) query slice embeddings (normalised here).
            k: Neighbours per query slice.
            space: "slice" (whole-slice embeddings) or "roi" (ROI embeddings).
            query_slice_indices: Slice index of each query row (default 0..n-1).
            exclude_study_uid: A study whose slices are never returned (the query's own).

        Returns:
            Per query row, its hits best first (fewer than k when the index is small).
        """
        queries = np.atleast_2d(np.asarray(query_embeddings, dtype=np.float32))
        positions = list(range(len(queries))) if query_slice_indices is None else list(query_slice_indices)
        if len(positions) != len(queries):
            raise ValueError(f"{len(positions)} query_slice_indices for {len(queries)} query embeddings")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        with self._lock:
            self._sync_if_stale()
            if self.dim is None:
                return [[] for _ in positions]
            if queries.shape[1] != self.dim:
                raise DimensionMismatch(f"query embeddings are {queries.shape[1]}-d, the index holds {self.dim}-d")
            vector_space = self._space(space)
            excluded = (
                self._live_ids(vector_space.table, exclude_study_uid) if exclude_study_uid else np.empty(0, np.int64)
            )
            snapshot = vector_space.snapshot()
        with self._search_guard():
            similarities, ids = snapshot.search(normalize_rows(queries), k, excluded, self.ef_search)
        with self._lock:
            slice_rows = self._slice_rows(vector_space.table, ids[ids >= 0])
        hits = []
        for position, row_similarities, row_ids in zip(positions, similarities, ids):
            hits.append(
                [
                    SliceHit(int(position), *slice_rows[int(vector_id)], float(similarity))
                    for similarity, vector_id in zip(row_similarities, row_ids)
                    if vector_id >= 0 and int(vector_id) in slice_rows
                ]
            )
        return hits

    def search_studies(
        self,
        query_embeddings: np.ndarray,
        *,
        space: str = "slice",
        query_slice_indices: Sequence[int] | None = None,
        slice_range: tuple[int, int] | None = None,
        exclude_study_uid: str | None = None,
        k: int = HIT_TABLE_K,
        top: int = 10,
        rerank: bool = True,
        filters: Iterable[str | LesionFilter] = (),
        query_descriptors: Mapping[str, Any] | None = None,
        image_weight: float = DEFAULT_IMAGE_WEIGHT,
        localization_l: int = LOCALIZATION_L,
        max_candidates: int | None = None,
    ) -> list[StudyHit]:
        """Rank studies for a query volume, sub-volume (region) or ROI set.

        Steps (Khun Jush et al.): slice-wise kNN (eq. 1) for every query slice; the hit table
        and count-based ranking (sec. 2.4.1); then, with ``rerank``, the late-interaction score
        RS (eq. 5) of every candidate study with at least one hit and its L best-matching slices
        (eq. 6). Region-based / localized retrieval (sec. 2.4.2-2.4.3): pass ``slice_range`` (or
        only the region's rows). ROI queries: ``space="roi"`` searches the ROI index (all-zero
        query rows, i.e. slices without ROI, are dropped) and re-ranks against the candidates'
        ROI embeddings. Filters are post-filters on the lesion descriptors; with
        ``query_descriptors`` the ranking uses the mixed score
        ``w * image_score + (1 - w) * descriptor_similarity``.

        Args:
            query_embeddings: [n, D] query embeddings (slice or ROI), one row per query slice.
            space: "slice" or "roi".
            query_slice_indices: Slice index of each row (default 0..n-1).
            slice_range: (first, last) slice indices, inclusive: keep only those query rows.
            exclude_study_uid: The query's own study, never returned.
            k: Neighbours retrieved per query slice for the hit table (default 1, the paper's
                setting: only the most similar slice of each query slice counts).
            top: Number of studies returned.
            rerank: Re-rank by late interaction (True) or keep the count-based order (False).
            filters: Lesion-descriptor filters, e.g. ``["loculi>=2", "space=parapharyngeal"]``.
            query_descriptors: Descriptors of the query lesion for the mixed score.
            image_weight: w of the mixed score.
            localization_l: L best-matching slices per result (eq. 6).
            max_candidates: Re-rank at most this many candidates (the ones with most hits), an
                option to bound the cost; default None re-ranks every study with a hit (the paper).

        Returns:
            Up to ``top`` hits, rank 1 first.

        Raises:
            ValueError: On a bad filter, weight, range or shape.
        """
        parsed_filters = parse_filters(filters)
        if query_descriptors is not None:
            mixed_score(0.0, 0.0, image_weight)  # validates the weight up front
        queries = np.atleast_2d(np.asarray(query_embeddings, dtype=np.float32))
        positions = np.arange(len(queries)) if query_slice_indices is None else np.asarray(query_slice_indices)
        if positions.shape != (len(queries),):
            raise ValueError(f"{positions.size} query_slice_indices for {len(queries)} query embeddings")
        keep = np.linalg.norm(queries, axis=1) > 0
        if slice_range is not None:
            first, last = slice_range
            if first > last:
                raise ValueError(f"slice_range {slice_range} is empty: first > last")
            keep &= (positions >= first) & (positions <= last)
        queries, positions = queries[keep], positions[keep]
        if len(queries) == 0:
            return []
        slice_hits = self.search_slices(
            queries, k, space=space, query_slice_indices=positions.tolist(), exclude_study_uid=exclude_study_uid
        )
        candidates = sorted({hit.study_uid for row in slice_hits for hit in row})
        with self._lock:
            lesions = self._lesions(candidates)
        results = rank_studies(
            normalize_rows(queries), positions, slice_hits, lesions,
            lambda study_uids: self.embeddings_of_studies(study_uids, space),
            space=space, k=k, top=top, rerank=rerank, filters=parsed_filters,
            query_descriptors=query_descriptors, image_weight=image_weight,
            localization_l=localization_l, max_candidates=max_candidates,
        )
        with self._lock:
            studies = self._studies([hit.study_uid for hit in results])
        for hit in results:
            hit.study = studies.get(hit.study_uid)
        return results

    def similar_studies(
        self,
        study_uid: str,
        *,
        space: str = "slice",
        slice_range: tuple[int, int] | None = None,
        use_descriptors: bool = False,
        **options: Any,
    ) -> list[StudyHit]:
        """Studies similar to an indexed study, queried with its stored embeddings.

        The study itself is never returned. With ``use_descriptors`` the mixed score uses the
        descriptors of the study's largest lesion (label 1).

        Args:
            study_uid: The query study (must be indexed).
            space: "slice" or "roi".
            slice_range: Region query: (first, last) slice indices of the query study.
            use_descriptors: Blend in the descriptor similarity of its largest lesion.
            **options: Further keyword arguments of :meth:`search_studies` (k, top, rerank, ...).

        Raises:
            StudyNotIndexed: If the study is not indexed.
        """
        positions, matrix = self.study_embeddings(study_uid, space)
        if use_descriptors:
            own_lesions = self.lesions(study_uid)
            options["query_descriptors"] = own_lesions[0].as_dict() if own_lesions else {}
        return self.search_studies(
            matrix,
            space=space,
            query_slice_indices=positions,
            slice_range=slice_range,
            exclude_study_uid=study_uid,
            **options,
        )

    # -- internals ---------------------------------------------------------------------------
    def _validate(
        self,
        study: StudyRecord,
        slices: Sequence[SliceRecord],
        slice_embeddings: np.ndarray,
        roi_embeddings: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not isinstance(study, StudyRecord):
            raise TypeError(f"study must be a StudyRecord, got {type(study).__name__}")
        slice_embeddings = np.asarray(slice_embeddings, dtype=np.float32)
        where = f"study {study.study_uid}"
        if slice_embeddings.ndim != 2 or slice_embeddings.shape[0] != len(slices) or slice_embeddings.shape[0] == 0:
            raise ValueError(
                f"{where}: slice_embeddings must be [n, D] with one row per slice record "
                f"({len(slices)} records), got shape {slice_embeddings.shape}"
            )
        dim = slice_embeddings.shape[1]
        if self.dim is not None and dim != self.dim:
            raise DimensionMismatch(f"{where}: embeddings are {dim}-d, the index holds {self.dim}-d")
        if not np.isfinite(slice_embeddings).all():
            raise ValueError(f"{where}: slice_embeddings contain NaN or infinite values")
        if (np.linalg.norm(slice_embeddings, axis=1) == 0).any():
            raise ValueError(f"{where}: slice_embeddings contain all-zero rows")
        indices = [int(record.slice_index) for record in slices]
        if len(set(indices)) != len(indices):
            raise ValueError(f"{where}: slice records repeat a slice_index")
        if roi_embeddings is None:
            roi_embeddings = np.zeros_like(slice_embeddings)
        roi_embeddings = np.asarray(roi_embeddings, dtype=np.float32)
        if roi_embeddings.shape != slice_embeddings.shape:
            raise ValueError(
                f"{where}: roi_embeddings shape {roi_embeddings.shape} differs from slice_embeddings "
                f"{slice_embeddings.shape}"
            )
        if not np.isfinite(roi_embeddings).all():
            raise ValueError(f"{where}: roi_embeddings contain NaN or infinite values")
        roi_rows = np.flatnonzero(np.linalg.norm(roi_embeddings, axis=1) > 0)
        return normalize_rows(slice_embeddings), normalize_rows(roi_embeddings[roi_rows]), roi_rows

    def _space(self, name: str) -> VectorSpace:
        if name not in self._spaces:
            raise ValueError(f"unknown vector space {name!r}; use one of {', '.join(SPACES)}")
        return self._spaces[name]

    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyIndex(f"the case index in {self.directory} was opened read-only; open it to write")

    def _search_guard(self) -> contextlib.AbstractContextManager[Any]:
        """What a FAISS search holds: nothing for a read-only index (it never changes a published
        graph), the lock for a writer (its graph grows in place)."""
        return contextlib.nullcontext() if self.read_only else self._lock

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT, rolled back on error)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    @contextlib.contextmanager
    def _read_snapshot(self) -> Iterator[None]:
        """One read transaction (all reads see the same commit), or the enclosing transaction."""
        if self._db.in_transaction:
            yield
            return
        self._db.execute("BEGIN")
        try:
            yield
        finally:
            self._db.execute("COMMIT")

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchone()
        return None if row is None else row[0]

    def _set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", [key, value])

    def _next_generation(self) -> str:
        """Bump the generation counter (inside a write transaction) and return the new value."""
        generation = str(int(self._meta("generation") or 0) + 1)
        self._set_meta("generation", generation)
        return generation

    def _retire(self, study_uid: str, generation: str) -> dict[str, np.ndarray]:
        """Mark a study's live vectors dead at ``generation``; their ids per space."""
        old_ids = {name: self._live_ids(space.table, study_uid) for name, space in self._spaces.items()}
        for space in self._spaces.values():
            self._db.execute(
                f"UPDATE {space.table} SET live = 0, embedding = NULL, retired = ? WHERE study_uid = ? AND live = 1",
                [int(generation), study_uid],
            )
        return old_ids

    def _sync_if_stale(self) -> None:
        """Catch up with commits made through another connection (another process, a reopened
        database): new live rows above each space's high-water id, tombstones retired after the
        generation seen last. A writer adds the new vectors to its graphs; a read-only index puts
        them in its exact-search tier and reloads in the background when needed."""
        with self._read_snapshot():
            generation = self._meta("generation")
            if generation == self._generation:
                return
            seen = int(self._generation or 0)
            compacted = int(self._meta("compacted") or 0)
            first_look = self.dim is None
            if first_look:
                stored_dim = self._meta("dim")
                if stored_dim is None:
                    self._generation = generation
                    return
                self.dim = int(stored_dim)
            if first_look or (compacted > seen and not self.read_only):
                for space in self._spaces.values():  # the files changed wholesale: load and check them
                    space.load(self.dim)
                    space.sync(self.dim, save=False)
            else:
                for space in self._spaces.values():
                    new_ids, new_vectors = self._unpack(self._db.execute(
                        f"SELECT vector_id, embedding FROM {space.table} WHERE vector_id > ? AND live = 1 "
                        "ORDER BY vector_id", [space.high_water]).fetchall())
                    retired = self._db.execute(f"SELECT vector_id FROM {space.table} WHERE retired > ?", [seen])
                    retired_ids = np.fromiter((row[0] for row in retired), dtype=np.int64)
                    space.absorb(new_ids, new_vectors, retired_ids, in_place=not self.read_only)
            self._generation = generation
        if self.read_only and (compacted > seen or any(
                space.recent_ids.size >= self.refresh_vectors for space in self._spaces.values())):
            self._start_refresh()

    def _start_refresh(self) -> None:
        """Read-only: load fresh graphs in a background thread, then swap them in."""
        if self._refresh_thread is not None and self._refresh_thread.is_alive():
            return
        self._refresh_thread = threading.Thread(target=self._refresh, name="case-index-refresh", daemon=True)
        self._refresh_thread.start()

    def _refresh(self) -> None:
        started = time.perf_counter()
        try:
            fresh = CaseIndex(self.directory, hnsw_m=self.hnsw_m, ef_construction=self.ef_construction,
                              ef_search=self.ef_search, read_only=True)
        except Exception:  # the current graphs and tier keep answering correctly
            log.exception("case index %s: background reload failed", self.directory)
            return
        with self._lock:
            for space in fresh._spaces.values():
                space.rows = self
            self._spaces, self._generation, self.dim = fresh._spaces, fresh._generation, fresh.dim
            self.vector_encoding = fresh.vector_encoding
        fresh._db.close()
        log.info("case index %s: graphs reloaded in the background in %.2f s", self.directory,
                 time.perf_counter() - started)

    def _save_indexes(self) -> None:
        for space in self._spaces.values():
            space.save()

    def _compact_if_needed(self) -> None:
        for space in self._spaces.values():
            total = 0 if space.index is None else space.index.ntotal
            if total and space.dead_ids.size / total > self.compact_fraction:
                log.info(
                    "%s index: %d of %d vectors are tombstones: compacting", space.name, space.dead_ids.size, total
                )
                self.compact()
                return

    def _live_ids(self, table: str, study_uid: str) -> np.ndarray:
        rows = self._db.execute(
            f"SELECT vector_id FROM {table} WHERE study_uid = ? AND live = 1 ORDER BY vector_id", [study_uid]
        ).fetchall()
        return np.asarray([row[0] for row in rows], dtype=np.int64)

    def row_ids(self, table: str) -> tuple[np.ndarray, np.ndarray]:
        """(all row ids, live row ids) of a vector table (the :class:`~index.vectors.EmbeddingRows` side)."""
        rows = self._db.execute(f"SELECT vector_id, live FROM {table}").fetchall()
        if not rows:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
        matrix = np.asarray(rows, dtype=np.int64)
        return matrix[:, 0], matrix[matrix[:, 1] == 1, 0]

    def embeddings_by_id(self, table: str, ids: np.ndarray) -> Iterable[tuple[np.ndarray, np.ndarray]]:
        """Stored embeddings for ``ids``, in batches of (ids, float32 [b, D])."""
        ids = np.sort(np.asarray(ids, dtype=np.int64))
        for start in range(0, ids.size, _ADD_BATCH):
            chunk = ids[start : start + _ADD_BATCH]
            rows = self._db.execute(
                f"SELECT vector_id, embedding FROM {table} WHERE vector_id IN (SELECT value FROM json_each(?)) "
                "ORDER BY vector_id",
                [json.dumps(chunk.tolist())],
            ).fetchall()
            found, vectors = self._unpack(rows)
            if found.size:
                yield found.astype(np.int64), vectors

    def _unpack(self, rows: Sequence[tuple[int, bytes]]) -> tuple[np.ndarray, np.ndarray]:
        if not rows:
            return np.empty(0, dtype=np.int64), np.empty((0, self.dim or 0), dtype=np.float32)
        keys = np.asarray([row[0] for row in rows], dtype=np.int64)
        vectors = np.frombuffer(b"".join(row[1] for row in rows), dtype=np.float32).reshape(len(rows), -1)
        return keys, vectors

    def _slice_rows(self, table: str, ids: np.ndarray) -> dict[int, tuple[str, int, str]]:
        """vector id -> (study_uid, slice_index, sop_instance_uid) of *live* slice or ROI vectors
        (a tombstone a reader has not heard of yet is dropped here, by the source of truth)."""
        if table == "slices":
            query = ("SELECT vector_id, study_uid, slice_index, sop_instance_uid FROM slices "
                     "WHERE vector_id IN (SELECT value FROM json_each(?)) AND live = 1")
        else:
            query = (f"SELECT v.vector_id, v.study_uid, v.slice_index, s.sop_instance_uid FROM {table} AS v "
                     "LEFT JOIN slices AS s ON s.study_uid = v.study_uid AND s.slice_index = v.slice_index "
                     "AND s.live = 1 WHERE v.vector_id IN (SELECT value FROM json_each(?)) AND v.live = 1")
        rows = self._db.execute(query, [json.dumps(np.unique(ids).tolist())]).fetchall()
        return {row[0]: (row[1], row[2], row[3] or "") for row in rows}

    def _lesions(self, study_uids: Sequence[str]) -> dict[str, list[Lesion]]:
        rows = self._db.execute(
            "SELECT study_uid, descriptors FROM lesions WHERE study_uid IN (SELECT value FROM json_each(?)) "
            "ORDER BY study_uid, label",
            [json.dumps(list(study_uids))],
        ).fetchall()
        lesions: dict[str, list[Lesion]] = {}
        for study_uid, descriptors in rows:
            lesions.setdefault(study_uid, []).append(Lesion.from_dict(json.loads(descriptors)))
        return lesions

    def _studies(self, study_uids: Sequence[str]) -> dict[str, StudyRecord]:
        cursor = self._db.execute(
            "SELECT * FROM studies WHERE study_uid IN (SELECT value FROM json_each(?))",
            [json.dumps(list(study_uids))],
        )
        columns = [description[0] for description in cursor.description]
        rows = [dict(zip(columns, values)) for values in cursor.fetchall()]
        records = {}
        for row in rows:
            records[row["study_uid"]] = StudyRecord(
                study_uid=row["study_uid"],
                modalities=tuple(json.loads(row["modalities"] or "[]")),
                extra=json.loads(row["extra"] or "{}"),
                **{name: row[name] or "" for name in _STUDY_TEXT_FIELDS},
            )
        return records

    @staticmethod
    def _study_row(study: StudyRecord, slice_count: int, roi_count: int) -> dict[str, Any]:
        row = {name: getattr(study, name) for name in _STUDY_TEXT_FIELDS}
        row.update(
            study_uid=study.study_uid,
            modalities=json.dumps(list(study.modalities)),
            extra=json.dumps(study.extra),
            slice_count=slice_count,
            roi_count=roi_count,
            indexed_at=time.time(),
        )
        return row

"""Similar-case retrieval as the node offers it: the query, its typed answers, the index lock.

Wraps :class:`index.store.CaseIndex`: one writer at a time per index directory (a file lock,
since several worker processes may finish studies together); queries read one long-lived
read-only index per process that never takes that lock; and results turned into
:class:`SimilarCase` objects that the similar-cases SR, the REST answer and the C-FIND
identifiers all read (as indexed: :mod:`dicom_node.pseudonyms` replaces other patients'
identities where the policy asks for it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydicom.uid import CTImageStorage

from dicom_node.identity import is_uid
from index.lesions import Lesion
from index.records import StudyRecord
from index.store import CaseIndex

log = logging.getLogger("abscess_node.index")

MODES = {
    "study": {"space": "slice", "rerank": True},
    "study-count": {"space": "slice", "rerank": False},
    "roi": {"space": "roi", "rerank": True},
}
MAX_K = 100


@dataclasses.dataclass(frozen=True)
class SimilarQuery:
    """One similar-case request.

    Attributes:
        study_uid: the query study (must be indexed).
        k: number of studies to return.
        mode: ``study`` (count-based hits re-ranked by late interaction), ``study-count``
            (count-based only) or ``roi`` (ROI embeddings of the predicted abscess).
        filters: lesion descriptor filters such as ``loculi>=2``, ``volume_ml>5``,
            ``space=parapharyngeal``.
        slice_range: region query: first and last slice index of the query series.
        use_descriptors: mix descriptor similarity into the score (mixed query).
    """

    study_uid: str
    k: int = 5
    mode: str = "study"
    filters: tuple[str, ...] = ()
    slice_range: tuple[int, int] | None = None
    use_descriptors: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if not 1 <= self.k <= MAX_K:
            raise ValueError(f"k must be between 1 and {MAX_K}, not {self.k}")


@dataclasses.dataclass(frozen=True)
class SlicePair:
    """A query slice and the slice of a similar study that matches it best.

    Attributes:
        query_slice: index of the query slice in the query series (0-based, index order).
        matched_slice: index of the matched slice in its series.
        matched_sop_instance_uid: SOPInstanceUID of the matched slice ("" when not known).
        similarity: cosine similarity of the two slices.
    """

    query_slice: int
    matched_slice: int
    matched_sop_instance_uid: str
    similarity: float

    def __post_init__(self) -> None:
        for name in ("query_slice", "matched_slice"):
            value = getattr(self, name)
            if isinstance(value, bool) or not hasattr(value, "__index__") or int(value) < 0:
                raise ValueError(f"SlicePair.{name} must be a non-negative integer, got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.matched_sop_instance_uid and not is_uid(self.matched_sop_instance_uid):
            raise ValueError(f"SlicePair.matched_sop_instance_uid is not a UID: {self.matched_sop_instance_uid!r}")
        if not math.isfinite(float(self.similarity)):
            raise ValueError(f"SlicePair.similarity must be finite, got {self.similarity!r}")
        object.__setattr__(self, "similarity", float(self.similarity))


@dataclasses.dataclass(frozen=True)
class SimilarCase:
    """One ranked answer to a similar-case query.

    Attributes:
        rank: 1-based rank.
        score: similarity score of the ranking (higher is more similar).
        mode: retrieval mode that produced it (``study``, ``study-count``, ``roi``).
        study: the similar study (as indexed, or pseudonymised by :mod:`dicom_node.pseudonyms`).
        best_slices: best-matching slice pairs, best first.
        lesions: the similar study's lesions.
        sop_class_uid: SOP Class of the matched slices (CT Image Storage).

    Raises:
        ValueError: a value is impossible (the message names it).
    """

    rank: int
    score: float
    mode: str
    study: StudyRecord
    best_slices: tuple[SlicePair, ...] = ()
    lesions: tuple[Lesion, ...] = ()
    sop_class_uid: str = CTImageStorage

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not hasattr(self.rank, "__index__") or int(self.rank) < 1:
            raise ValueError(f"SimilarCase.rank must be a positive integer, got {self.rank!r}")
        object.__setattr__(self, "rank", int(self.rank))
        if isinstance(self.score, bool) or not math.isfinite(float(self.score)):
            raise ValueError(f"SimilarCase.score must be a finite number, got {self.score!r}")
        object.__setattr__(self, "score", float(self.score))
        if not isinstance(self.mode, str) or not self.mode.strip():
            raise ValueError(f"SimilarCase.mode must be a non-empty string, got {self.mode!r}")
        if not isinstance(self.study, StudyRecord) or not is_uid(self.study.study_uid):
            raise ValueError("SimilarCase.study must be a StudyRecord with a valid StudyInstanceUID")
        if self.study.series_uid and not is_uid(self.study.series_uid):
            raise ValueError(f"SimilarCase.study.series_uid is not a UID: {self.study.series_uid!r}")
        object.__setattr__(self, "best_slices", tuple(self.best_slices))
        object.__setattr__(self, "lesions", tuple(self.lesions))

    @property
    def study_uid(self) -> str:
        """StudyInstanceUID of the similar study."""
        return self.study.study_uid

    def as_dict(self) -> dict[str, Any]:
        """The JSON form of the REST answer and of the job record."""
        study = self.study
        return {
            "rank": self.rank, "score": round(self.score, 6), "mode": self.mode,
            "study_uid": study.study_uid, "series_uid": study.series_uid, "sop_class_uid": self.sop_class_uid,
            "study_date": study.study_date, "study_description": study.study_description,
            "accession_number": study.accession_number, "patient_id": study.patient_id,
            "patient_name": study.patient_name, "orthanc_study_id": study.orthanc_study_id,
            "best_slices": [[pair.query_slice, pair.matched_sop_instance_uid or pair.matched_slice,
                             round(pair.similarity, 6)] for pair in self.best_slices],
            "lesions": [lesion.as_dict() for lesion in self.lesions],
        }


class IndexBusy(RuntimeError):
    """The case index stayed locked by another process longer than the allowed wait."""


@contextlib.contextmanager
def open_index(directory: Path, lock_timeout_seconds: float = 120.0, on_rebuild: Callable[[], None] | None = None,
               vector_encoding: str | None = None, database_url: str = "",
               ef_search: int | None = None) -> Iterator[CaseIndex]:
    """Open the case index to write, under an exclusive lock (one writer across worker processes).

    ``vector_encoding`` (``IndexVectorEncoding``: flat or sq8) converts the index when it differs
    from the stored one; None keeps the index's own. With ``database_url`` (``IndexDatabase``)
    the rows live in PostgreSQL and ``directory`` is this machine's cache of them
    (:class:`index.shared.SharedCaseIndex`, synced from the change log at open and before every
    query); the lock then only guards the local cache, writers on all machines are serialised
    in PostgreSQL. A database that SQLite cannot read (corrupt, or not a database at all) is
    moved aside to ``<directory>.corrupt-<time>`` with a loud error, a fresh index is opened, and
    ``on_rebuild`` is called (the worker queues every processed study again so that it is
    re-indexed; not for a shared index, which is whole in PostgreSQL). ``ef_search``
    (``IndexEfSearch``) sets the HNSW efSearch of its searches (None: the index's default).

    Raises:
        IndexBusy: the lock was not free within ``lock_timeout_seconds``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        deadline = time.monotonic() + lock_timeout_seconds
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise IndexBusy(f"the case index {directory} stayed locked for more than {lock_timeout_seconds:.0f} s "
                                    "(IndexLockTimeoutSeconds); another process holds it") from None
                time.sleep(0.05)
        try:
            try:
                index = _open(directory, database_url, vector_encoding=vector_encoding)
            except sqlite3.DatabaseError as error:
                quarantine = directory.with_name(f"{directory.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
                log.error("case index %s is unreadable (%s): moved to %s, starting an empty index", directory, error,
                          quarantine)
                quarantine.mkdir(parents=True, exist_ok=True)
                for path in directory.iterdir():
                    if path.name != ".lock":
                        path.rename(quarantine / path.name)
                index = _open(directory, database_url, vector_encoding=vector_encoding)
                if on_rebuild is not None and not database_url:  # a shared index is whole in PostgreSQL
                    on_rebuild()
            if ef_search is not None:
                index.ef_search = ef_search
            try:
                yield index
            finally:
                index.close()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _open(directory: Path, database_url: str, **options: Any) -> CaseIndex:
    if not database_url:
        return CaseIndex.open(directory, **options)
    from index.shared import SharedCaseIndex  # psycopg only where the index is shared

    return SharedCaseIndex.open(directory, database_url, **options)


_query_indexes: dict[Path, tuple[CaseIndex, tuple[int, int] | None]] = {}
_query_indexes_lock = threading.Lock()


@contextlib.contextmanager
def query_index(directory: Path, database_url: str = "", ef_search: int | None = None) -> Iterator[CaseIndex]:
    """The process's read-only case index for similar-case queries, kept open between queries.

    The first call opens it (loads the graphs and checks them); later calls hand out the same
    object, which catches up with the workers' commits incrementally before each search. It
    takes no lock a writer holds, so a query never waits for a study being indexed.

    With ``database_url`` (a shared index) it is this process's own cache of PostgreSQL's rows,
    in ``<directory>-query`` (the workers of this machine keep theirs in ``directory``): it
    applies the change log before each search. ``ef_search`` (``IndexEfSearch``) sets the HNSW
    efSearch of its searches (None: the index's default).
    """
    directory = Path(directory)
    if database_url:
        with _query_indexes_lock:
            index, _ = _query_indexes.get(directory, (None, None))
            if index is None:
                index = _open(directory.with_name(f"{directory.name}-query"), database_url)
                _query_indexes[directory] = (index, None)
    else:
        with _query_indexes_lock:
            index, identity = _query_indexes.get(directory, (None, None))
            current = _file_identity(directory / "index.sqlite")
            if index is not None and identity != current:  # the index was moved aside and rebuilt: reopen
                index.close()
                index = None
            if index is None:
                directory.mkdir(parents=True, exist_ok=True)
                index = CaseIndex.open(directory, read_only=True)
                _query_indexes[directory] = (index, _file_identity(directory / "index.sqlite"))
    if ef_search is not None:
        index.ef_search = ef_search
    yield index


def _file_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of a file, None when it does not exist."""
    try:
        status = path.stat()
    except FileNotFoundError:
        return None
    return status.st_dev, status.st_ino


def study_record(study: dict[str, Any], series_uid: str, orthanc_series_id: str, fingerprint: str) -> StudyRecord:
    """Index metadata from Orthanc's ``/studies/{id}`` resource."""
    tags, patient = study.get("MainDicomTags", {}), study.get("PatientMainDicomTags", {})
    return StudyRecord(
        study_uid=tags.get("StudyInstanceUID", ""), series_uid=series_uid,
        patient_id=patient.get("PatientID", ""), patient_name=patient.get("PatientName", ""),
        patient_sex=patient.get("PatientSex", ""), patient_birth_date=patient.get("PatientBirthDate", ""),
        study_date=tags.get("StudyDate", ""), study_description=tags.get("StudyDescription", ""),
        modalities=("CT",), accession_number=tags.get("AccessionNumber", ""),
        orthanc_study_id=study.get("ID", ""), orthanc_series_id=orthanc_series_id,
        content_fingerprint=fingerprint)


def find_similar(index: CaseIndex, query: SimilarQuery) -> list[SimilarCase]:
    """Ranked similar studies, best first, as indexed (pseudonymise before showing them to a caller
    the policy says so for: :class:`dicom_node.pseudonyms.Pseudonymizer`).

    Raises:
        index.store.StudyNotIndexed: the query study has not been processed yet.
        ValueError: a bad filter or slice range.
    """
    mode = MODES[query.mode]
    hits = index.similar_studies(
        query.study_uid, space=mode["space"], slice_range=query.slice_range,
        use_descriptors=query.use_descriptors, top=query.k, rerank=mode["rerank"],
        filters=list(query.filters))
    cases = []
    for hit in hits:
        study = hit.study or StudyRecord(hit.study_uid)
        slice_uids = index.slice_instance_uids(hit.study_uid)
        cases.append(SimilarCase(
            rank=hit.rank, score=hit.score, mode=query.mode,
            study=study,
            best_slices=tuple(SlicePair(q, s, slice_uids.get(int(s), ""), similarity)
                              for q, s, similarity in hit.best_slices),
            lesions=tuple(hit.lesions)))
    return cases

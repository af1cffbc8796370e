"""Similar-case retrieval as the node offers it (after each study, over REST and C-FIND).

Wraps :class:`index.store.CaseIndex`: one writer at a time per index directory (a file lock,
since several worker processes may finish studies together), the study record taken from
Orthanc's study resource, and results turned into plain mappings that the similar-cases SR,
the REST answer and the C-FIND identifiers share. Other patients' identities are replaced by
stable pseudonyms when ``PseudonymizeSimilarCases`` is set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from index.retrieval import StudyHit
from index.store import CaseIndex, StudyRecord

MODES = {
    "study": {"space": "slice", "rerank": True},
    "study-count": {"space": "slice", "rerank": False},
    "roi": {"space": "roi", "rerank": True},
}


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
        if not 1 <= self.k <= 100:
            raise ValueError(f"k must be between 1 and 100, not {self.k}")


@contextlib.contextmanager
def open_index(directory: Path) -> Iterator[CaseIndex]:
    """Open the case index under an exclusive lock (one writer across worker processes)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        index = CaseIndex.open(directory)
        try:
            yield index
        finally:
            index.close()
            fcntl.flock(lock, fcntl.LOCK_UN)


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


def pseudonym(value: str, kind: str) -> str:
    """A stable pseudonym (same input, same output) that reveals nothing of ``value``."""
    if not value:
        return ""
    return f"{kind}-{hashlib.sha256(f'{kind}:{value}'.encode()).hexdigest()[:12].upper()}"


def find_similar(index: CaseIndex, query: SimilarQuery, pseudonymize: bool) -> list[dict[str, Any]]:
    """Ranked similar studies as plain mappings (best first).

    Raises:
        index.store.StudyNotIndexed: the query study has not been processed yet.
    """
    mode = MODES[query.mode]
    hits: Sequence[StudyHit] = index.similar_studies(
        query.study_uid, space=mode["space"], slice_range=query.slice_range,
        use_descriptors=query.use_descriptors, top=query.k, rerank=mode["rerank"],
        filters=list(query.filters))
    results = []
    for hit in hits:
        study = hit.study if isinstance(hit.study, dict) else hit.study.as_dict()
        slice_uids = index.slice_instance_uids(hit.study_uid)
        patient_id, patient_name = study.get("patient_id", ""), study.get("patient_name", "")
        if pseudonymize:
            patient_id, patient_name = pseudonym(patient_id, "PID"), pseudonym(patient_name, "NAME")
        results.append({
            "rank": hit.rank, "score": round(float(hit.score), 6), "mode": query.mode,
            "study_uid": hit.study_uid, "series_uid": study.get("series_uid", ""),
            "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
            "study_date": study.get("study_date", ""), "study_description": study.get("study_description", ""),
            "accession_number": pseudonym(study.get("accession_number", ""), "ACC") if pseudonymize
            else study.get("accession_number", ""),
            "patient_id": patient_id, "patient_name": patient_name,
            "orthanc_study_id": study.get("orthanc_study_id", ""),
            "best_slices": [(int(q), slice_uids.get(int(s), int(s)), round(float(sim), 6))
                            for q, s, sim in hit.best_slices],
            "lesions": [dict(lesion) for lesion in hit.lesions],
        })
    return results


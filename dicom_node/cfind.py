"""The similar-case query service: one handler behind C-FIND (Orthanc and pynetdicom) and REST.

A C-FIND whose called AE title is ``SimilarCasesAet`` is a similar-case query. The identifier
names the query object at its Query/Retrieve level:

* ``STUDY`` + StudyInstanceUID of an indexed study: study-level retrieval (count-based slice
  hits re-ranked by late interaction; mode ``study``).
* ``IMAGE`` + SOPInstanceUID of an indexed slice: slice query (that one slice as the query,
  answers localised to the best-matching slice of each similar study).
* ``SERIES`` + SeriesInstanceUID of one of our SEG series: mask/region query (ROI embeddings of
  the predicted abscess; mode ``roi``). The indexed CT series itself is also accepted (mode
  ``study`` over that series).

Parameters a client may set (see ``docs/conformance.md``): in the private block
:data:`PRIVATE_CREATOR` of group 0041 -- K, retrieval mode, lesion-descriptor filters, query
slice range, descriptor mixing; standard keys with a value act as filters on the answers
(StudyDate single date or range, StudyDescription with ``*``/``?`` wildcards, PatientSex).

:func:`handle_similar_find` yields ``(status, identifier)`` pairs like a pynetdicom C-FIND
handler: ``status`` is a Dataset with Status (and ErrorComment / OffendingElement on failure);
pending answers come best first. It never raises: every error becomes a failure status and a
log line. Audit lines carry UIDs and AE titles only.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import re
import sqlite3
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pydicom
from pydicom.datadict import add_private_dict_entries
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import generate_uid

from dicom_node.config import NodeConfig
from dicom_node.jobs import JobStore
from dicom_node.orthanc_client import OrthancError
from dicom_node.similar import MODES, SimilarQuery, find_similar, open_index

log = logging.getLogger("abscess_node.similar_find")
audit = logging.getLogger("abscess_node.audit")

# --- Statuses (PS3.4 C.4.1.1.4 for C-FIND, PS3.7 C.5 for the general ones) ----------------------
SUCCESS = 0x0000
PENDING = 0xFF00
REFUSED_NOT_AUTHORISED = 0x0124
"""Calling AE title not in ``AllowedSimilarCasesAets`` (PS3.7 general status "Refused: Not Authorized")."""
OUT_OF_RESOURCES = 0xA700
"""The case index cannot be opened or searched right now (PS3.4 "Refused: Out of Resources")."""
IDENTIFIER_DOES_NOT_MATCH = 0xA900
"""Malformed query: level, unique key, or a parameter is missing or invalid."""
UNABLE_TO_PROCESS = 0xC000
"""Unexpected internal error (details in the service log)."""
QUERY_OBJECT_NOT_INDEXED = 0xC001
"""The query study/slice/series is unknown to the case index (not processed yet, or no SEG of ours)."""

STATUS_MEANINGS: Mapping[int, str] = {
    SUCCESS: "Success", PENDING: "Pending: a similar case", REFUSED_NOT_AUTHORISED: "Refused: Not Authorized",
    OUT_OF_RESOURCES: "Refused: Out of Resources", IDENTIFIER_DOES_NOT_MATCH: "Error: Identifier does not match SOP Class",
    UNABLE_TO_PROCESS: "Failed: Unable to process", QUERY_OBJECT_NOT_INDEXED: "Failed: Unable to process (query object not indexed)",
}

# --- Private block --------------------------------------------------------------------------
PRIVATE_GROUP = 0x0041
PRIVATE_CREATOR = "ABSCESS_NODE 1.0"


@dataclasses.dataclass(frozen=True)
class PrivateElement:
    """One element of our private block: ``(0041,xxEE)`` where xx is the reserved block."""

    offset: int
    vr: str
    vm: str
    name: str


RANK = PrivateElement(0x10, "IS", "1", "Similarity Rank")
SCORE = PrivateElement(0x11, "DS", "1", "Similarity Score")
MODE = PrivateElement(0x12, "LO", "1", "Retrieval Mode")
SR_SOP_INSTANCE_UID = PrivateElement(0x13, "UI", "1", "Similar Cases SR SOP Instance UID")
SR_SERIES_INSTANCE_UID = PrivateElement(0x14, "UI", "1", "Similar Cases SR Series Instance UID")
QUERY_STUDY_UID = PrivateElement(0x15, "UI", "1", "Query Study Instance UID")
REQUESTED_K = PrivateElement(0x20, "IS", "1", "Requested Number of Similar Cases")
FILTERS = PrivateElement(0x21, "LO", "1-n", "Lesion Descriptor Filters")
SLICE_RANGE = PrivateElement(0x22, "IS", "2", "Query Slice Range")
USE_DESCRIPTORS = PrivateElement(0x23, "CS", "1", "Mix Lesion Descriptors")
PRIVATE_ELEMENTS = (RANK, SCORE, MODE, SR_SOP_INSTANCE_UID, SR_SERIES_INSTANCE_UID, QUERY_STUDY_UID,
                    REQUESTED_K, FILTERS, SLICE_RANGE, USE_DESCRIPTORS)

add_private_dict_entries(PRIVATE_CREATOR, {
    (PRIVATE_GROUP << 16) | 0x1000 | e.offset: (e.vr, e.vm, e.name, "") for e in PRIVATE_ELEMENTS})
"""pydicom decodes our block with the right VRs, even from implicit VR transfers."""

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SIMILAR_SERIES_NUMBER = 9903
STANDARD_FILTER_KEYWORDS = ("StudyDate", "StudyDescription", "PatientSex")
LEVEL_UNIQUE_KEY = {"STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_DATE = re.compile(r"^\d{8}$")


class QueryError(Exception):
    """A query that cannot be answered: carries the DIMSE status and its ErrorComment."""

    def __init__(self, status: int, comment: str, offending: Sequence[int] = ()) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment[:64]  # ErrorComment is LO
        self.offending = tuple(offending)


@dataclasses.dataclass(frozen=True)
class ParsedRequest:
    """A similar-case C-FIND identifier, validated.

    Attributes:
        level: STUDY, SERIES or IMAGE.
        unique_uid: the UID named at that level.
        k: number of answers asked for (private K, else ``SimilarCasesTopK``).
        mode: retrieval mode asked for, or None for the level's default.
        filters: lesion-descriptor filters (private element).
        slice_range: region of the query series (private element), or None.
        use_descriptors: mix descriptor similarity into the score.
        date_range: (first, last) StudyDate filter, YYYYMMDD strings ("" = open end), or None.
        description_pattern: StudyDescription filter with DICOM wildcards, or None.
        patient_sex: PatientSex filter, or None.
        study_uid_hint: StudyInstanceUID given with a SERIES/IMAGE query (speeds up the look-up).
        return_keywords: every keyword of the identifier (the answer carries each of them).
    """

    level: str
    unique_uid: str
    k: int
    mode: str | None
    filters: tuple[str, ...]
    slice_range: tuple[int, int] | None
    use_descriptors: bool
    date_range: tuple[str, str] | None
    description_pattern: str | None
    patient_sex: str | None
    study_uid_hint: str | None
    return_keywords: tuple[str, ...]

    @property
    def has_result_filters(self) -> bool:
        """Whether standard keys restrict the answers (then more candidates are searched)."""
        return bool(self.date_range or self.description_pattern or self.patient_sex)

    def parameters(self) -> dict[str, Any]:
        """The parameters that decide the answers (for the SR and its deterministic UID)."""
        return {"level": self.level, "uid": self.unique_uid, "k": self.k, "mode": self.mode,
                "filters": list(self.filters), "slice_range": list(self.slice_range or ()),
                "use_descriptors": self.use_descriptors, "date_range": list(self.date_range or ()),
                "description": self.description_pattern or "", "sex": self.patient_sex or ""}


def private_tag(element: PrivateElement, block: int = 0x10) -> int:
    """The full tag of a private element in the block reserved as ``(0041,00bb)``."""
    return Tag(PRIVATE_GROUP, (block << 8) | element.offset)


def status_dataset(status: int, comment: str | None = None, offending: Sequence[int] = ()) -> Dataset:
    """A pynetdicom-style status Dataset (Status, optional ErrorComment and OffendingElement)."""
    dataset = Dataset()
    dataset.Status = status
    if comment:
        dataset.ErrorComment = comment[:64]
    if offending:
        dataset.OffendingElement = list(offending)
    return dataset


def _text(identifier: Dataset, keyword: str) -> str:
    value = identifier.get(keyword)
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _private_values(identifier: Dataset) -> dict[int, Any]:
    """Values of our private elements, by offset, wherever the client reserved the block."""
    values: dict[int, Any] = {}
    for element in identifier.group_dataset(PRIVATE_GROUP):
        tag = element.tag
        if tag.element < 0x10 or tag.element > 0xFF:
            continue
        if str(element.value).strip() != PRIVATE_CREATOR:
            continue
        block = tag.element
        for offset in (e.offset for e in PRIVATE_ELEMENTS):
            data = identifier.get((PRIVATE_GROUP, (block << 8) | offset))
            if data is not None and data.value not in (None, "", b""):
                values[offset] = data.value
    return values


def _as_strings(value: Any) -> list[str]:
    if isinstance(value, bytes):  # implicit VR without a dictionary entry: raw bytes
        value = value.decode("ascii", "replace").strip("\x00 ").split("\\")
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [s.strip() for s in str(value).split("\\") if s.strip()]


def parse_request(identifier: Dataset, default_k: int) -> ParsedRequest:
    """Validate a similar-case identifier.

    Raises:
        QueryError: status 0xA900 naming the missing or invalid attribute.
    """
    level = _text(identifier, "QueryRetrieveLevel").upper()
    if level not in LEVEL_UNIQUE_KEY:
        raise QueryError(IDENTIFIER_DOES_NOT_MATCH, f"QueryRetrieveLevel {level or '(empty)'} not STUDY/SERIES/IMAGE",
                         [0x00080052])
    key = LEVEL_UNIQUE_KEY[level]
    uid = _text(identifier, key)
    if not uid or not _UID.match(uid) or len(uid) > 64:
        tag = Tag(pydicom.datadict.tag_for_keyword(key))
        raise QueryError(IDENTIFIER_DOES_NOT_MATCH, f"{key} must hold one UID for a {level} query", [tag])
    private = _private_values(identifier)
    k = default_k
    offending = [private_tag(REQUESTED_K)]
    if REQUESTED_K.offset in private:
        try:
            k = int(_as_strings(private[REQUESTED_K.offset])[0])
        except (ValueError, IndexError):
            raise QueryError(IDENTIFIER_DOES_NOT_MATCH, "private K (0041,xx20) is not an integer", offending) from None
        if not 1 <= k <= 100:
            raise QueryError(IDENTIFIER_DOES_NOT_MATCH, f"private K (0041,xx20) {k} outside 1..100", offending)
    mode = None
    if MODE.offset in private:
        mode = _as_strings(private[MODE.offset])[0].lower() if _as_strings(private[MODE.offset]) else None
        if mode is not None and mode not in MODES:
            raise QueryError(IDENTIFIER_DOES_NOT_MATCH, f"mode {mode[:20]} not one of {','.join(MODES)}",
                             [private_tag(MODE)])
    filters = tuple(_as_strings(private.get(FILTERS.offset, "")))
    slice_range = None
    if SLICE_RANGE.offset in private:
        try:
            first, last = (int(v) for v in _as_strings(private[SLICE_RANGE.offset]))
        except ValueError:
            raise QueryError(IDENTIFIER_DOES_NOT_MATCH, "slice range (0041,xx22) must be 2 integers",
                             [private_tag(SLICE_RANGE)]) from None
        if first < 0 or last < first:
            raise QueryError(IDENTIFIER_DOES_NOT_MATCH, "slice range (0041,xx22) must be 0<=first<=last",
                             [private_tag(SLICE_RANGE)])
        slice_range = (first, last)
    use_descriptors = False
    if USE_DESCRIPTORS.offset in private:
        flag = (_as_strings(private[USE_DESCRIPTORS.offset]) or [""])[0].upper()
        if flag not in ("YES", "NO"):
            raise QueryError(IDENTIFIER_DOES_NOT_MATCH, "(0041,xx23) must be YES or NO", [private_tag(USE_DESCRIPTORS)])
        use_descriptors = flag == "YES"
    date_range = None
    date = _text(identifier, "StudyDate")
    if date:
        first, _, last = date.partition("-") if "-" in date else (date, "", date)
        if not all(not part or _DATE.match(part) for part in (first, last)) or not (first or last):
            raise QueryError(IDENTIFIER_DOES_NOT_MATCH, "StudyDate must be YYYYMMDD or a range", [0x00080020])
        date_range = (first, last)
    study_hint = _text(identifier, "StudyInstanceUID") if level != "STUDY" else None
    if study_hint and not _UID.match(study_hint):
        study_hint = None  # a list or wildcard: not a hint
    keywords = tuple(element.keyword for element in identifier if element.keyword and element.tag.group != PRIVATE_GROUP)
    return ParsedRequest(
        level=level, unique_uid=uid, k=k, mode=mode, filters=filters, slice_range=slice_range,
        use_descriptors=use_descriptors, date_range=date_range,
        description_pattern=_text(identifier, "StudyDescription") or None,
        patient_sex=_text(identifier, "PatientSex").upper() or None, study_uid_hint=study_hint,
        return_keywords=keywords)


def _wildcard_match(pattern: str, value: str) -> bool:
    """DICOM single-value matching with ``*`` and ``?`` (no character classes)."""
    translated = "".join({"*": ".*", "?": "."}.get(c, re.escape(c)) for c in pattern)
    return re.fullmatch(translated, value, flags=re.DOTALL) is not None


def _passes(result: Mapping[str, Any], request: ParsedRequest, patient_sex: str) -> bool:
    if request.date_range:
        first, last = request.date_range
        date = result.get("study_date") or ""
        if not date or (first and date < first) or (last and date > last):
            return False
    if request.description_pattern and not _wildcard_match(request.description_pattern, result.get("study_description") or ""):
        return False
    return not (request.patient_sex and not _wildcard_match(request.patient_sex, patient_sex))


class SimilarCaseService:
    """Answers similar-case queries from the case index (shared by every front end).

    Args:
        config: the node configuration (index, job store, K, allow-list, pseudonymisation).
        client: Orthanc REST client (series/instance look-ups, ModalitiesInStudy, storing the
            on-demand SR); without it SERIES/IMAGE look-ups use the index only and no SR is written.
        retrieve_aet: the AE title answers give as RetrieveAETitle (Orthanc's ``DicomAet``).
    """

    def __init__(self, config: NodeConfig, client: Any | None = None, retrieve_aet: str = "ORTHANC") -> None:
        self.config = config
        self.client = client
        self.retrieve_aet = retrieve_aet

    # -- the C-FIND handler ---------------------------------------------------------------------
    def find(self, identifier: Dataset, calling_aet: str) -> Iterator[tuple[Dataset, Dataset | None]]:
        """Answer one C-FIND: pending identifiers best first, then success; or one failure.

        Never raises; every failure is a status Dataset with an ErrorComment.
        """
        calling_aet = (calling_aet or "").strip()
        try:
            answers = self._answers(identifier, calling_aet)
        except QueryError as error:
            audit.warning("similar-cases C-FIND from %s: status 0x%04X (%s)", calling_aet, error.status, error.comment)
            yield status_dataset(error.status, error.comment, error.offending), None
            return
        except Exception:  # the network layer must never see an exception
            log.exception("similar-cases C-FIND from %s failed", calling_aet)
            yield status_dataset(UNABLE_TO_PROCESS, "internal error; see the similar-cases service log"), None
            return
        for answer in answers:
            yield status_dataset(PENDING), answer
        yield status_dataset(SUCCESS), None

    def check_access(self, calling_aet: str) -> None:
        """Raise a refusal (0x0124) unless the calling AE title is allowed."""
        if calling_aet not in self.config.allowed_similar_cases_aets:
            raise QueryError(REFUSED_NOT_AUTHORISED, f"calling AE {calling_aet[:16]} is not allowed similar cases")

    def _answers(self, identifier: Dataset, calling_aet: str) -> list[Dataset]:
        self.check_access(calling_aet)
        if not isinstance(identifier, Dataset):
            raise QueryError(IDENTIFIER_DOES_NOT_MATCH, "no identifier")
        request = parse_request(identifier, self.config.similar_cases_top_k)
        query, results = self.search(request)
        report = self.report_for(request, query, results, calling_aet)
        audit.info("similar-cases C-FIND from %s: %s %s -> %d answer(s)%s", calling_aet, request.level,
                   request.unique_uid, len(results), f", SR {report[1]}" if report else "")
        return [self.identifier_for(result, request, report) for result in results]

    # -- resolution and search ----------------------------------------------------------------------
    def resolve(self, request: ParsedRequest, index: Any) -> SimilarQuery:
        """Turn the identifier's query object into an index query.

        Raises:
            QueryError: 0xC001 when the study/slice/series is not in the index.
        """
        indexed = set(index.study_uids())
        mode, slice_range = request.mode, request.slice_range
        if request.level == "STUDY":
            study_uid = request.unique_uid
            if study_uid not in indexed:
                raise QueryError(QUERY_OBJECT_NOT_INDEXED, self._not_indexed_comment(study_uid))
        elif request.level == "IMAGE":
            study_uid, slice_index = self._find_slice(request, index, indexed)
            slice_range = (slice_index, slice_index)
        else:
            study_uid, default_mode = self._find_series(request, index, indexed)
            mode = mode or default_mode
        try:
            return SimilarQuery(study_uid, k=100 if request.has_result_filters else request.k, mode=mode or "study",
                                filters=request.filters, slice_range=slice_range, use_descriptors=request.use_descriptors)
        except ValueError as error:
            raise QueryError(IDENTIFIER_DOES_NOT_MATCH, str(error)) from None

    def _not_indexed_comment(self, study_uid: str) -> str:
        try:
            jobs = JobStore(self.config.jobs_database).list(study_uid=study_uid, limit=1)
        except Exception:  # noqa: BLE001 - the job store only words the message
            jobs = []
        if jobs and jobs[0]["state"] in ("queued", "running"):
            return f"study not indexed yet: job {jobs[0]['id']} {jobs[0]['state']}; retry later"
        if jobs:
            return f"study not indexed: last job {jobs[0]['id']} {jobs[0]['state']}"
        return "study not indexed: not processed by this node"

    def _find_slice(self, request: ParsedRequest, index: Any, indexed: set[str]) -> tuple[str, int]:
        candidates = [request.study_uid_hint] if request.study_uid_hint in indexed else []
        if not candidates and self.client is not None:
            candidates = [uid for uid in [self._parent_study_uid(request.unique_uid, "Instance")] if uid in indexed]
        if not candidates:
            candidates = sorted(indexed)  # no hint: scan the index
        for study_uid in candidates:
            for slice_index, sop_uid in index.slice_instance_uids(study_uid).items():
                if sop_uid == request.unique_uid:
                    return study_uid, slice_index
        raise QueryError(QUERY_OBJECT_NOT_INDEXED, "SOPInstanceUID is not a slice of an indexed series")

    def _find_series(self, request: ParsedRequest, index: Any, indexed: set[str]) -> tuple[str, str]:
        for study_uid in ([request.study_uid_hint] if request.study_uid_hint in indexed else []):
            if index.get_study(study_uid).series_uid == request.unique_uid:
                return study_uid, "study"
        if self.client is not None:
            series = self._lookup(request.unique_uid, "Series")
            if series is not None:
                tags = series.get("MainDicomTags", {})
                study_uid = self._parent_study_uid(request.unique_uid, "Series")
                if study_uid in indexed:
                    if tags.get("Modality") == "SEG":
                        return study_uid, "roi"
                    if index.get_study(study_uid).series_uid == request.unique_uid:
                        return study_uid, "study"
                raise QueryError(QUERY_OBJECT_NOT_INDEXED, "series is neither our SEG nor an indexed CT series")
        for study_uid in sorted(indexed):
            if index.get_study(study_uid).series_uid == request.unique_uid:
                return study_uid, "study"
        raise QueryError(QUERY_OBJECT_NOT_INDEXED, "SeriesInstanceUID unknown to this node")

    def _lookup(self, uid: str, level: str) -> dict[str, Any] | None:
        """Orthanc's expanded resource (``Series`` or ``Instance``) holding this UID, if any."""
        key = "SeriesInstanceUID" if level == "Series" else "SOPInstanceUID"
        found = self.client.post_json("/tools/find", {"Level": level, "Query": {key: uid}, "Expand": True})
        return found[0] if found else None

    def _parent_study_uid(self, uid: str, level: str) -> str | None:
        resource = self._lookup(uid, level)
        if resource is None:
            return None
        study = self.client.get_json(f"/{'series' if level == 'Series' else 'instances'}/{resource['ID']}/study")
        return study.get("MainDicomTags", {}).get("StudyInstanceUID")

    def search(self, request: ParsedRequest) -> tuple[SimilarQuery, list[dict[str, Any]]]:
        """Resolve the query object, run the index search, apply the standard-key filters.

        Raises:
            QueryError: 0xC001 (not indexed), 0xA900 (bad filter), 0xA700 (index unusable).
        """
        try:
            with open_index(self.config.index_directory) as index:
                query = self.resolve(request, index)
                try:
                    results = find_similar(index, query, self.config.pseudonymize_similar_cases)
                except ValueError as error:  # bad filter / range
                    raise QueryError(IDENTIFIER_DOES_NOT_MATCH, str(error)) from None
                sexes = {r["study_uid"]: index.get_study(r["study_uid"]).patient_sex for r in results}
        except QueryError:
            raise
        except OrthancError as error:
            log.warning("Orthanc look-up failed: %s", error)
            raise QueryError(UNABLE_TO_PROCESS, "Orthanc look-up failed; see the similar-cases service log") from None
        except (OSError, RuntimeError, sqlite3.Error) as error:
            log.exception("case index %s unusable", self.config.index_directory)
            raise QueryError(OUT_OF_RESOURCES, f"case index unavailable: {type(error).__name__}") from None
        if request.has_result_filters:
            results = [r for r in results if _passes(r, request, sexes.get(r["study_uid"], ""))][:request.k]
            for rank, result in enumerate(results, start=1):
                result["rank"] = rank
        return query, results

    # -- answers ---------------------------------------------------------------------------------
    def identifier_for(self, result: Mapping[str, Any], request: ParsedRequest,
                       report: tuple[str, str] | None) -> Dataset:
        """One pending identifier: the requested keys, the fixed study keys, rank/score/mode/SR UID."""
        answer = Dataset()
        answer.SpecificCharacterSet = "ISO_IR 192"
        answer.QueryRetrieveLevel = request.level
        values: dict[str, Any] = {
            "StudyInstanceUID": result["study_uid"], "PatientID": result.get("patient_id", ""),
            "PatientName": result.get("patient_name", ""), "StudyDate": result.get("study_date", ""),
            "StudyDescription": result.get("study_description", ""),
            "AccessionNumber": result.get("accession_number", ""),
            "ModalitiesInStudy": self._modalities(result), "RetrieveAETitle": self.retrieve_aet,
        }
        if request.level in ("SERIES", "IMAGE"):
            values.update(SeriesInstanceUID=result.get("series_uid", ""), Modality="CT")
        if request.level == "IMAGE":
            best = result.get("best_slices") or []
            matched = best[0][1] if best and isinstance(best[0][1], str) else ""
            values.update(SOPInstanceUID=matched, SOPClassUID=CT_IMAGE_STORAGE if matched else "")
        for keyword in request.return_keywords:
            if keyword not in values and keyword not in ("QueryRetrieveLevel", "SpecificCharacterSet"):
                values[keyword] = ""
        for keyword, value in values.items():
            setattr(answer, keyword, value)
        block = answer.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
        block.add_new(RANK.offset, RANK.vr, str(result["rank"]))
        block.add_new(SCORE.offset, SCORE.vr, f"{float(result['score']):.6f}"[:16])
        block.add_new(MODE.offset, MODE.vr, result["mode"])
        if report:
            block.add_new(SR_SERIES_INSTANCE_UID.offset, SR_SERIES_INSTANCE_UID.vr, report[0])
            block.add_new(SR_SOP_INSTANCE_UID.offset, SR_SOP_INSTANCE_UID.vr, report[1])
            block.add_new(QUERY_STUDY_UID.offset, QUERY_STUDY_UID.vr, report[2])
        return answer

    def _modalities(self, result: Mapping[str, Any]) -> list[str] | str:
        if self.client is not None and result.get("orthanc_study_id"):
            try:
                series = self.client.get_json(f"/studies/{result['orthanc_study_id']}/series")
                return sorted({s.get("MainDicomTags", {}).get("Modality", "") for s in series} - {""}) or "CT"
            except Exception:  # noqa: BLE001 - the index record still knows CT
                log.warning("ModalitiesInStudy of %s: Orthanc look-up failed", result["study_uid"])
        return "CT"

    # -- the similar-cases SR ------------------------------------------------------------------------
    def report_for(self, request: ParsedRequest, query: SimilarQuery, results: list[dict[str, Any]],
                   calling_aet: str) -> tuple[str, str, str] | None:
        """(SR series UID, SR SOP Instance UID, query study UID) of the SR holding these answers.

        The SR the pipeline wrote after processing is reused when it lists the same ranked
        studies; otherwise an on-demand SR is written into the query study. Its UIDs are derived
        from the query parameters and the answers, so repeating a query stores nothing new.
        Returns None when no Orthanc is reachable or the SR cannot be written (logged).
        """
        if self.client is None:
            return None
        try:
            store = JobStore(self.config.jobs_database)
            jobs = store.list(study_uid=query.study_uid, state="done", limit=1)
            job_result = (jobs[0].get("result") or {}) if jobs else {}
            if self._default_request(request):
                reused = self._pipeline_report(store, query.study_uid, job_result, results)
                if reused:
                    return (*reused, query.study_uid)
            return (*self._write_report(request, query, results, calling_aet, job_result), query.study_uid)
        except Exception:  # the answers are still useful without the SR
            log.exception("similar-cases SR for study %s could not be written", query.study_uid)
            return None

    def _default_request(self, request: ParsedRequest) -> bool:
        """Whether the query asks exactly what the pipeline's report answered."""
        return (request.level == "STUDY" and request.k == self.config.similar_cases_top_k
                and request.mode in (None, "study") and not request.filters and request.slice_range is None
                and not request.use_descriptors and not request.has_result_filters)

    def _pipeline_report(self, store: JobStore, study_uid: str, job_result: Mapping[str, Any],
                         results: Sequence[Mapping[str, Any]]) -> tuple[str, str] | None:
        """The SR written after processing, when it still lists the same ranked studies."""
        listed = job_result.get("similar_cases")
        if not isinstance(listed, list) or [r.get("study_uid") for r in listed] != [r["study_uid"] for r in results]:
            return None
        for output in store.outputs_of_study(study_uid):
            report = (output.get("objects") or {}).get("similar_cases")
            if isinstance(report, dict) and self.client.instance_exists(report["orthanc_id"]):
                return report["series_uid"], report["sop_instance_uid"]
        return None

    def _write_report(self, request: ParsedRequest, query: SimilarQuery, results: list[dict[str, Any]],
                      calling_aet: str, job_result: Mapping[str, Any]) -> tuple[str, str]:
        from dicom_node.sr import build_similar_cases_report

        signature = json.dumps([request.parameters(), query.study_uid, self.config.pseudonymize_similar_cases,
                                [(r["study_uid"], r["score"]) for r in results]], sort_keys=True)
        series_uid = generate_uid(entropy_srcs=["abscess-node on-demand similar cases", query.study_uid])
        sop_uid = generate_uid(entropy_srcs=["abscess-node on-demand similar cases SR", signature])
        if self._lookup(sop_uid, "Instance") is not None:
            return series_uid, sop_uid
        images = self._query_images(query.study_uid)
        algorithm = job_result.get("algorithm") or {"name": "abscess-node", "version": "unknown", "demo": True,
                                                      "description": "algorithm of the indexing run unknown"}
        parameters = {"mode": query.mode, "k": request.k, "requested_by": calling_aet[:16] or None}
        described = "; ".join([*request.filters, *(f"{k}={v}" for k, v in (
            ("slice_range", "-".join(map(str, query.slice_range or ()))), ("StudyDate", "-".join(request.date_range or ())),
            ("StudyDescription", request.description_pattern or ""), ("PatientSex", request.patient_sex or "")) if v)])
        if described:
            parameters["filters"] = described[:1024]
        report = build_similar_cases_report(
            images, results, parameters, algorithm, series_number=SIMILAR_SERIES_NUMBER, instance_number=1,
            manufacturer="abscess-node", device_name="ABSCESS_NODE", series_instance_uid=series_uid,
            sop_instance_uid=sop_uid, series_description="Similar cases on demand (abscess-node)")
        buffer = io.BytesIO()
        report.save_as(buffer, enforce_file_format=True)
        self.client.store(buffer.getvalue())
        audit.info("on-demand similar-cases SR %s stored in study %s", sop_uid, query.study_uid)
        return series_uid, sop_uid

    def _query_images(self, study_uid: str) -> list[Dataset]:
        """Headers of the indexed query series, in index slice order (the SR's query images)."""
        with open_index(self.config.index_directory) as index:
            record = index.get_study(study_uid)
            by_index = index.slice_instance_uids(study_uid)
        instances = self.client.get_json(f"/series/{record.orthanc_series_id}/instances")
        wanted = {uid: position for position, uid in by_index.items()}
        ids = [i["ID"] for i in instances if i.get("MainDicomTags", {}).get("SOPInstanceUID") in wanted]
        with tempfile.TemporaryDirectory(prefix="similar-sr-") as directory:
            headers = [pydicom.dcmread(path, stop_before_pixels=True)
                       for path in self.client.download_instances(ids, Path(directory))]
        return sorted(headers, key=lambda ds: wanted[ds.SOPInstanceUID])

    # -- REST twin -----------------------------------------------------------------------------
    def rest_query(self, study_uid: str, params: Mapping[str, str], calling: str = "REST") -> tuple[int, Any]:
        """JSON answer of ``GET /abscess-node/studies/{id}/similar`` (the REST twin of the C-FIND).

        Args:
            study_uid: StudyInstanceUID of the query study.
            params: ``k``, ``mode``, ``filters`` (comma-separated), ``slices`` (``first-last``),
                ``descriptors`` (``yes``/``no``), ``StudyDate``, ``StudyDescription``, ``PatientSex``.

        Returns:
            (HTTP status, JSON-ready body): 200 with the ranked results, 400 for a bad parameter,
            404 for a study that is not indexed, 503 when the index is unusable.
        """
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = study_uid
        block = identifier.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
        for name, element in (("k", REQUESTED_K), ("mode", MODE), ("descriptors", USE_DESCRIPTORS)):
            if params.get(name):
                block.add_new(element.offset, element.vr, params[name].upper() if name == "descriptors" else params[name])
        if params.get("filters"):
            block.add_new(FILTERS.offset, FILTERS.vr, [f.strip() for f in params["filters"].split(",") if f.strip()])
        if params.get("slices"):
            block.add_new(SLICE_RANGE.offset, SLICE_RANGE.vr, params["slices"].replace("-", "\\", 1).split("\\"))
        for keyword in STANDARD_FILTER_KEYWORDS:
            if params.get(keyword):
                setattr(identifier, keyword, params[keyword])
        try:
            request = parse_request(identifier, self.config.similar_cases_top_k)
            query, results = self.search(request)
            report = self.report_for(request, query, results, calling)
        except QueryError as error:
            http = {QUERY_OBJECT_NOT_INDEXED: 404, IDENTIFIER_DOES_NOT_MATCH: 400, OUT_OF_RESOURCES: 503}.get(error.status, 500)
            return http, {"error": error.comment, "dicom_status": f"0x{error.status:04X}"}
        except Exception:
            log.exception("REST similar-cases query for %s failed", study_uid)
            return 500, {"error": "internal error; see the similar-cases service log"}
        audit.info("similar-cases REST query: study %s -> %d result(s)", study_uid, len(results))
        return 200, {"query": {"study_uid": study_uid, "k": request.k, "mode": query.mode, "filters": list(query.filters),
                               "slice_range": list(query.slice_range) if query.slice_range else None},
                     "similar_cases_sr": ({"series_uid": report[0], "sop_instance_uid": report[1]} if report else None),
                     "results": results}


def handle_similar_find(identifier: Dataset, calling_aet: str, config: NodeConfig, client: Any | None = None,
                        retrieve_aet: str = "ORTHANC") -> Iterator[tuple[Dataset, Dataset | None]]:
    """Answer one similar-case C-FIND (see :meth:`SimilarCaseService.find`). Never raises."""
    return SimilarCaseService(config, client, retrieve_aet).find(identifier, calling_aet)


__all__ = [
    "PRIVATE_CREATOR",
    "PRIVATE_ELEMENTS",
    "PRIVATE_GROUP",
    "STATUS_MEANINGS",
    "SimilarCaseService",
    "handle_similar_find",
    "parse_request",
]

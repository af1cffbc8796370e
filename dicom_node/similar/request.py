"""The similar-case C-FIND request: DIMSE statuses, our private block, and identifier parsing.

A C-FIND whose called AE title is ``SimilarCasesAet`` is a similar-case query. The identifier
names the query object at its Query/Retrieve level (``STUDY`` + StudyInstanceUID, ``IMAGE`` +
SOPInstanceUID, ``SERIES`` + SeriesInstanceUID of our SEG or of the indexed CT series).
Parameters a client may set (see ``docs/conformance.md``) go in the private block
:data:`PRIVATE_CREATOR` of group 0041 (K, retrieval mode, lesion-descriptor filters, query slice
range, descriptor mixing); standard keys with a value act as filters on the answers (StudyDate
single date or range, StudyDescription with ``*``/``?`` wildcards, PatientSex).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import pydicom
from pydicom.datadict import add_private_dict_entries
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from dicom_node.identity import is_uid
from dicom_node.similar.query import MODES
from index.records import StudyRecord

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
STORE_REPORT = PrivateElement(0x24, "CS", "1", "Store Similar Cases Report")
PRIVATE_ELEMENTS = (RANK, SCORE, MODE, SR_SOP_INSTANCE_UID, SR_SERIES_INSTANCE_UID, QUERY_STUDY_UID,
                    REQUESTED_K, FILTERS, SLICE_RANGE, USE_DESCRIPTORS, STORE_REPORT)

add_private_dict_entries(PRIVATE_CREATOR, {
    (PRIVATE_GROUP << 16) | 0x1000 | e.offset: (e.vr, e.vm, e.name, "") for e in PRIVATE_ELEMENTS})
"""pydicom decodes our block with the right VRs, even from implicit VR transfers."""

STANDARD_FILTER_KEYWORDS = ("StudyDate", "StudyDescription", "PatientSex")
MAX_IDENTIFIER_ELEMENTS = 64
"""An identifier with more elements is refused (a C-FIND names a few dozen keys at most)."""
MAX_FILTERS = 8
"""At most this many lesion-descriptor filters, each at most :data:`MAX_TEXT_LENGTH` characters."""
MAX_TEXT_LENGTH = 64
"""Longest filter, StudyDescription pattern or other text value accepted (the LO limit)."""
MAX_SLICE_INDEX = 100_000
LEVEL_UNIQUE_KEY = {"STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}
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
        store_report: the caller asked for a similar-cases SR of these answers to be stored.
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
    store_report: bool = False

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
    if len(identifier) > MAX_IDENTIFIER_ELEMENTS:
        raise QueryError(IDENTIFIER_DOES_NOT_MATCH, f"identifier has more than {MAX_IDENTIFIER_ELEMENTS} elements")
    level = _text(identifier, "QueryRetrieveLevel").upper()
    if level not in LEVEL_UNIQUE_KEY:
        raise QueryError(IDENTIFIER_DOES_NOT_MATCH, f"QueryRetrieveLevel {level or '(empty)'} not STUDY/SERIES/IMAGE",
                         [0x00080052])
    key = LEVEL_UNIQUE_KEY[level]
    uid = _text(identifier, key)
    if not is_uid(uid):
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
    if len(filters) > MAX_FILTERS or any(len(f) > MAX_TEXT_LENGTH for f in filters):
        raise QueryError(IDENTIFIER_DOES_NOT_MATCH, f"at most {MAX_FILTERS} filters of {MAX_TEXT_LENGTH} characters",
                         [private_tag(FILTERS)])
    slice_range = None
    if SLICE_RANGE.offset in private:
        try:
            first, last = (int(v) for v in _as_strings(private[SLICE_RANGE.offset]))
        except ValueError:
            raise QueryError(IDENTIFIER_DOES_NOT_MATCH, "slice range (0041,xx22) must be 2 integers",
                             [private_tag(SLICE_RANGE)]) from None
        if first < 0 or last < first or last > MAX_SLICE_INDEX:
            raise QueryError(IDENTIFIER_DOES_NOT_MATCH, "slice range (0041,xx22) must be 0<=first<=last",
                             [private_tag(SLICE_RANGE)])
        slice_range = (first, last)
    use_descriptors = _yes_no(private, USE_DESCRIPTORS)
    store_report = _yes_no(private, STORE_REPORT)
    description = _text(identifier, "StudyDescription")
    sex = _text(identifier, "PatientSex")
    if len(description) > MAX_TEXT_LENGTH or len(sex) > 16:
        raise QueryError(IDENTIFIER_DOES_NOT_MATCH, "StudyDescription or PatientSex is longer than its VR allows")
    date_range = None
    date = _text(identifier, "StudyDate")
    if date:
        first, _, last = date.partition("-") if "-" in date else (date, "", date)
        if not all(not part or _DATE.match(part) for part in (first, last)) or not (first or last):
            raise QueryError(IDENTIFIER_DOES_NOT_MATCH, "StudyDate must be YYYYMMDD or a range", [0x00080020])
        date_range = (first, last)
    study_hint = _text(identifier, "StudyInstanceUID") if level != "STUDY" else None
    if study_hint and not is_uid(study_hint):
        study_hint = None  # a list or wildcard: not a hint
    keywords = tuple(element.keyword for element in identifier if element.keyword and element.tag.group != PRIVATE_GROUP)
    return ParsedRequest(
        level=level, unique_uid=uid, k=k, mode=mode, filters=filters, slice_range=slice_range,
        use_descriptors=use_descriptors, date_range=date_range,
        description_pattern=description or None, patient_sex=sex.upper() or None, study_uid_hint=study_hint,
        return_keywords=keywords, store_report=store_report)


def _yes_no(private: dict[int, Any], element: PrivateElement) -> bool:
    """A YES/NO flag of our private block (absent: NO)."""
    if element.offset not in private:
        return False
    flag = (_as_strings(private[element.offset]) or [""])[0].upper()
    if flag not in ("YES", "NO"):
        raise QueryError(IDENTIFIER_DOES_NOT_MATCH, f"(0041,xx{element.offset:02X}) must be YES or NO",
                         [private_tag(element)])
    return flag == "YES"


def wildcard_match(pattern: str, value: str) -> bool:
    """DICOM single-value matching with ``*`` (any run) and ``?`` (one character), no regex.

    The pattern is split at its ``*``: the first piece must match the start of the value, the
    last piece its end, and the pieces between are found left to right at their earliest
    place. Greedy earliest placement is optimal for such patterns, so there is no backtracking:
    the cost is at most len(value) x len(pattern) character comparisons (both are bounded by
    the identifier limits), never exponential.
    """
    pieces = pattern.split("*")
    if len(pieces) == 1:
        return len(value) == len(pattern) and _piece_at(pattern, value, 0)
    first, *middle, last = pieces
    if len(first) + len(last) > len(value) or not _piece_at(first, value, 0):
        return False
    if not _piece_at(last, value, len(value) - len(last)):
        return False
    position, end = len(first), len(value) - len(last)
    for piece in middle:
        found = _find_piece(piece, value, position, end)
        if found < 0:
            return False
        position = found + len(piece)
    return True


def _piece_at(piece: str, value: str, start: int) -> bool:
    """Whether ``piece`` (with ``?``) matches ``value`` at ``start``."""
    return all(p == "?" or p == value[start + i] for i, p in enumerate(piece))


def _find_piece(piece: str, value: str, start: int, end: int) -> int:
    """Earliest position >= start where ``piece`` matches inside ``value[:end]``, or -1."""
    for position in range(start, end - len(piece) + 1):
        if _piece_at(piece, value, position):
            return position
    return -1


def passes_standard_keys(study: StudyRecord, request: ParsedRequest) -> bool:
    """Whether a similar study matches the standard keys of the identifier (date, description, sex)."""
    if request.date_range:
        first, last = request.date_range
        date = study.study_date
        if not date or (first and date < first) or (last and date > last):
            return False
    if request.description_pattern and not wildcard_match(request.description_pattern, study.study_description):
        return False
    return not (request.patient_sex and not wildcard_match(request.patient_sex, study.patient_sex))

"""DICOM Structured Reports written by the node.

Two documents, both Comprehensive SR (SOP Class 1.2.840.10008.5.1.4.1.1.88.33) stored in the
study they describe (same Patient and Study modules, same StudyInstanceUID, a new series):

* :func:`build_measurement_report` -- TID 1500 "Imaging Measurement Report" with one TID 1411
  volumetric measurement group per abscess, each referencing segment 1 of the node's DICOM SEG
  and the CT slices it lies on. A study without lesion still gets a report, with one TID 1501
  group saying "Abscess: Absent", so the radiologist sees that the node ran.
* :func:`build_similar_cases_report` -- a "Similar cases" report listing, for each retrieved
  prior study, its rank, similarity score, retrieval mode, the referenced study, the
  best-matching slice pairs and the matched lesions' descriptors.

Comprehensive SR rather than Comprehensive 3D SR: neither report uses SCOORD3D, and 88.33 is
the SR class the widest range of PACS, viewers and dcmtk tools display.

Codes
-----
Standard codes are taken from DICOM PS3.16 context groups (checked against the concept
dictionaries pydicom generates from PS3.16): SNOMED CT (``SCT``), DICOM (``DCM``), LOINC
(``LN``) and UCUM units. Concepts DICOM has no code for (number of loculi, slice indices, deep
neck space as free text, and the similar-case retrieval concepts) use the private coding scheme
``99ABSCESS``, declared in every document's Coding Scheme Identification Sequence. See
:data:`PRIVATE_CODES` for the full list.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import highdicom as hd
import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import SegmentationStorage, generate_uid

__all__ = [
    "ABSCESS",
    "DEMO_NOTICE",
    "PRIVATE_CODES",
    "PRIVATE_CODING_SCHEME",
    "SrInputError",
    "build_measurement_report",
    "build_similar_cases_report",
]

# --- Standard codes (PS3.16) ---------------------------------------------------------------

ABSCESS = Code("44132006", "SCT", "Abscess")
"""Abscess, morphologically abnormal structure (CID 7151/7159/7194; SNOMED 128477000 is the
disorder concept, which DICOM does not list for findings or segmented property types)."""
MORPHOLOGICALLY_ABNORMAL_STRUCTURE = codes.SCT.MorphologicallyAbnormalStructure  # 49755003
NECK = Code("45048000", "SCT", "Neck")  # CID 4 / 7151
DEEP_NECK_SPACE_SITES: Mapping[str, Code] = {
    "submandibular": Code("5713008", "SCT", "Submandibular area"),  # CID 4 / 7151
}
"""Deep neck spaces with a SNOMED code listed in PS3.16 (keys: lower-case space names).

Other spaces are recorded as text only (and the finding site as :data:`NECK`): their SNOMED
body-structure concepts are not listed by DICOM and are not invented here.
"""
VOLUME = codes.SCT.Volume  # 118565006, CID 7469
LONG_AXIS = Code("103339001", "SCT", "Long Axis")  # CID 7469/7470: longest in-plane diameter
MAXIMUM = codes.SCT.Maximum  # 56851009, CID 7464
ATTENUATION_COEFFICIENT = Code("112031", "DCM", "Attenuation Coefficient")  # CID 7469 (HU)
MEAN = codes.SCT.Mean  # 373098007, CID 7464
STANDARD_DEVIATION = codes.SCT.StandardDeviation  # 386136009, CID 7464
ABSENT = Code("272519000", "SCT", "Absent")  # CID 240 Present-Absent
COMMENT = Code("121106", "DCM", "Comment")
CT_UNSPECIFIED_BODY_REGION = Code("25045-6", "LN", "CT unspecified body region")  # CID 100
STUDY_INSTANCE_UID = Code("110180", "DCM", "Study Instance UID")
SERIES_INSTANCE_UID = Code("112002", "DCM", "Series Instance UID")
STUDY_DATE = Code("111060", "DCM", "Study Date")
PROCEDURE_DESCRIPTION = Code("121065", "DCM", "Procedure Description")
ACCESSION_NUMBER = Code("121022", "DCM", "Accession Number")
SUBJECT_ID = Code("121030", "DCM", "Subject ID")
TRACKING_IDENTIFIER = Code("112039", "DCM", "Tracking Identifier")

UNIT_ML = Code("ml", "UCUM", "milliliter")
UNIT_MM = Code("mm", "UCUM", "millimeter")
UNIT_HU = Code("[hnsf'U]", "UCUM", "Hounsfield unit")
UNIT_LOCULI = Code("{loculi}", "UCUM", "loculi")  # UCUM annotation: a dimensionless count
UNIT_NONE = Code("1", "UCUM", "no units")  # CID 7181

# --- Private codes (99ABSCESS) --------------------------------------------------------------

PRIVATE_CODING_SCHEME = "99ABSCESS"


def _private(value: str, meaning: str) -> Code:
    return Code(value, PRIVATE_CODING_SCHEME, meaning)


NUMBER_OF_LOCULI = _private("LOCULI", "Number of loculi")
FIRST_SLICE_INDEX = _private("FIRSTSLICE", "First slice index (0-based, series order)")
LAST_SLICE_INDEX = _private("LASTSLICE", "Last slice index (0-based, series order)")
LESION_CORE = _private("CORE", "Lesion core (boundary shell excluded)")
DEEP_NECK_SPACE = _private("NECKSPACE", "Deep neck space")
SIMILAR_CASES = _private("SIMCASES", "Similar cases")
SIMILAR_CASE = _private("SIMCASE", "Similar case")
QUERY_PARAMETERS = _private("QUERY", "Similar-case query")
RETRIEVAL_MODE = _private("MODE", "Retrieval mode")
RESULTS_REQUESTED = _private("K", "Number of results requested")
QUERY_FILTERS = _private("FILTERS", "Query filters")
REQUESTED_BY = _private("REQAET", "Requesting AE title")
CASES_FOUND = _private("NFOUND", "Number of similar cases found")
RANK = _private("RANK", "Rank")
SIMILARITY_SCORE = _private("SCORE", "Similarity score")
SLICE_PAIR = _private("SLICEPAIR", "Best-matching slice pair")
QUERY_IMAGE = _private("QIMAGE", "Query image")
QUERY_SLICE_INDEX = _private("QSLICE", "Query slice index (0-based)")
MATCHED_IMAGE = _private("MIMAGE", "Matched image")
MATCHED_SOP_INSTANCE_UID = _private("MSOPUID", "Matched SOP Instance UID")
MATCHED_SLICE_INDEX = _private("MSLICE", "Matched slice index (0-based)")
SLICE_SIMILARITY = _private("SLICESIM", "Slice similarity")
MATCHED_LESION = _private("MLESION", "Matched lesion")

PRIVATE_CODES: tuple[Code, ...] = (
    NUMBER_OF_LOCULI,
    FIRST_SLICE_INDEX,
    LAST_SLICE_INDEX,
    LESION_CORE,
    DEEP_NECK_SPACE,
    SIMILAR_CASES,
    SIMILAR_CASE,
    QUERY_PARAMETERS,
    RETRIEVAL_MODE,
    RESULTS_REQUESTED,
    QUERY_FILTERS,
    REQUESTED_BY,
    CASES_FOUND,
    RANK,
    SIMILARITY_SCORE,
    SLICE_PAIR,
    QUERY_IMAGE,
    QUERY_SLICE_INDEX,
    MATCHED_IMAGE,
    MATCHED_SOP_INSTANCE_UID,
    MATCHED_SLICE_INDEX,
    SLICE_SIMILARITY,
    MATCHED_LESION,
)
"""Every concept of the ``99ABSCESS`` scheme (DICOM has no code for these)."""

_CODING_SCHEME = CodingSchemeIdentificationItem(
    designator=PRIVATE_CODING_SCHEME,
    name="abscess-node local concepts",
    version="1",
    responsible_organization="abscess-node project",
)

DEMO_NOTICE = "DEMO MODEL WEIGHTS - NOT FOR CLINICAL USE"
"""Prefix of the comment every report carries when the model runs on demo weights."""

NO_LESION_TEXT = "No abscess detected by the algorithm."
NO_SIMILAR_CASE_TEXT = "No similar case found."

CONTAINS = hd.sr.RelationshipTypeValues.CONTAINS
HAS_OBS_CONTEXT = hd.sr.RelationshipTypeValues.HAS_OBS_CONTEXT


class SrInputError(ValueError):
    """An argument of an SR builder is missing something or holds an impossible value."""


# --- Argument parsing -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Algorithm:
    name: str
    version: str
    description: str
    demo: bool
    parameters: tuple[str, ...]

    @classmethod
    def from_mapping(cls, algorithm: Mapping[str, Any]) -> _Algorithm:
        if not isinstance(algorithm, Mapping):
            raise SrInputError(
                f"algorithm must be a mapping with name, version, description and demo, not {type(algorithm).__name__}"
            )
        missing = [key for key in ("name", "version", "demo") if key not in algorithm]
        if missing:
            raise SrInputError(f"algorithm mapping lacks key(s) {missing}; got {sorted(algorithm)}")
        for key in ("name", "version"):
            if not isinstance(algorithm[key], str) or not algorithm[key].strip():
                raise SrInputError(f"algorithm[{key!r}] must be a non-empty string, got {algorithm[key]!r}")
        if not isinstance(algorithm["demo"], bool):
            raise SrInputError(f"algorithm['demo'] must be a bool, got {algorithm['demo']!r}")
        description = algorithm.get("description") or ""
        if not isinstance(description, str):
            raise SrInputError(f"algorithm['description'] must be a string, got {description!r}")
        parameters = algorithm.get("parameters") or ()
        if isinstance(parameters, str) or not all(isinstance(p, str) for p in parameters):
            raise SrInputError(f"algorithm['parameters'] must be a sequence of strings, got {parameters!r}")
        return cls(algorithm["name"], algorithm["version"], description, algorithm["demo"], tuple(parameters))

    def identification(self) -> hd.sr.AlgorithmIdentification:
        return hd.sr.AlgorithmIdentification(
            name=self.name, version=self.version, parameters=list(self.parameters) or None
        )

    def comment(self) -> str | None:
        """Text of the algorithm comment item: the description, prefixed when demo weights."""
        if self.demo:
            return f"{DEMO_NOTICE}: {self.description}" if self.description else DEMO_NOTICE
        return self.description or None


@dataclasses.dataclass(frozen=True)
class _Quantity:
    """One numeric lesion descriptor: its key in a lesion mapping and how it is coded."""

    key: str
    name: Code
    unit: Code
    derivation: Code | None = None
    method: Code | None = None
    integer: bool = False
    minimum: float | None = None


LESION_QUANTITIES: tuple[_Quantity, ...] = (
    _Quantity("volume_ml", VOLUME, UNIT_ML, minimum=0.0),
    _Quantity("longest_axial_diameter_mm", LONG_AXIS, UNIT_MM, derivation=MAXIMUM, minimum=0.0),
    _Quantity("core_mean_hu", ATTENUATION_COEFFICIENT, UNIT_HU, derivation=MEAN, method=LESION_CORE),
    _Quantity(
        "core_sd_hu",
        ATTENUATION_COEFFICIENT,
        UNIT_HU,
        derivation=STANDARD_DEVIATION,
        method=LESION_CORE,
        minimum=0.0,
    ),
    _Quantity("loculi", NUMBER_OF_LOCULI, UNIT_LOCULI, integer=True, minimum=0),
    _Quantity("first_slice", FIRST_SLICE_INDEX, UNIT_NONE, integer=True, minimum=0),
    _Quantity("last_slice", LAST_SLICE_INDEX, UNIT_NONE, integer=True, minimum=0),
)
"""How each lesion descriptor is written (same codes in both reports).

``core_mean_hu`` and ``core_sd_hu`` may be None (core too small to measure): the measurement is
then left out. Every other descriptor is required.
"""

_OPTIONAL_QUANTITIES = frozenset({"core_mean_hu", "core_sd_hu"})


@dataclasses.dataclass(frozen=True)
class _Lesion:
    label: str
    values: Mapping[str, int | float | None]
    space: str | None

    @property
    def first_slice(self) -> int:
        return int(self.values["first_slice"])  # type: ignore[arg-type]

    @property
    def last_slice(self) -> int:
        return int(self.values["last_slice"])  # type: ignore[arg-type]

    @classmethod
    def from_mapping(cls, lesion: Mapping[str, Any], where: str, n_slices: int | None) -> _Lesion:
        if not isinstance(lesion, Mapping):
            raise SrInputError(f"{where} must be a mapping, not {type(lesion).__name__}")
        required = ["label", *(q.key for q in LESION_QUANTITIES)]
        missing = [key for key in required if key not in lesion]
        if missing:
            raise SrInputError(f"{where} lacks key(s) {missing}; got {sorted(lesion)}")
        label = lesion["label"]
        if isinstance(label, int) and not isinstance(label, bool) and label >= 1:
            label = f"Abscess {label}"  # index.lesions numbers lesions 1..n
        elif not isinstance(label, str) or not label.strip():
            raise SrInputError(f"{where}['label'] must be a positive integer or a non-empty string, got {label!r}")
        space = lesion.get("space")
        if space is not None and (not isinstance(space, str) or not space.strip()):
            raise SrInputError(f"{where}['space'] must be a non-empty string or None, got {space!r}")
        values: dict[str, int | float | None] = {}
        for quantity in LESION_QUANTITIES:
            values[quantity.key] = _number(lesion[quantity.key], quantity, f"{where}[{quantity.key!r}]")
        first, last = values["first_slice"], values["last_slice"]
        assert isinstance(first, int) and isinstance(last, int)
        if first > last:
            raise SrInputError(f"{where}: first_slice {first} is after last_slice {last}")
        if n_slices is not None and last >= n_slices:
            raise SrInputError(
                f"{where}: last_slice {last} is outside the {n_slices} source images "
                f"(indices are 0-based into source_images as given)"
            )
        return cls(label.strip(), values, space.strip() if space else None)


def _number(value: Any, quantity: _Quantity, where: str) -> int | float | None:
    if value is None and quantity.key in _OPTIONAL_QUANTITIES:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise SrInputError(f"{where} must be a number, got {value!r}")
    if quantity.integer:
        if float(value) != int(value):
            raise SrInputError(f"{where} must be a whole number, got {value!r}")
        number: int | float = int(value)
    else:
        number = float(value)
        if not math.isfinite(number):
            optional = " (pass None when it cannot be measured)" if quantity.key in _OPTIONAL_QUANTITIES else ""
            raise SrInputError(f"{where} must be finite, got {value!r}{optional}")
    if quantity.minimum is not None and number < quantity.minimum:
        raise SrInputError(f"{where} must be >= {quantity.minimum}, got {value!r}")
    return number


def _check_series(images: Sequence[pydicom.Dataset], argument: str) -> None:
    if isinstance(images, pydicom.Dataset) or not isinstance(images, Sequence) or not images:
        raise SrInputError(f"{argument} must be a non-empty sequence of pydicom Datasets")
    seen: set[str] = set()
    for position, image in enumerate(images):
        if not isinstance(image, pydicom.Dataset):
            raise SrInputError(f"{argument}[{position}] is a {type(image).__name__}, not a pydicom Dataset")
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
            if not image.get(keyword):
                raise SrInputError(f"{argument}[{position}] has no {keyword}")
        if image.StudyInstanceUID != images[0].StudyInstanceUID:
            raise SrInputError(
                f"{argument}[{position}] belongs to study {image.StudyInstanceUID}, "
                f"not {images[0].StudyInstanceUID} like {argument}[0]"
            )
        if image.SeriesInstanceUID != images[0].SeriesInstanceUID:
            raise SrInputError(
                f"{argument}[{position}] belongs to series {image.SeriesInstanceUID}, "
                f"not {images[0].SeriesInstanceUID} like {argument}[0]; pass one series"
            )
        if image.SOPInstanceUID in seen:
            raise SrInputError(f"{argument}[{position}] repeats SOPInstanceUID {image.SOPInstanceUID}")
        seen.add(image.SOPInstanceUID)


_UID_PATTERN = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def _check_uid(value: Any, where: str) -> str:
    if not isinstance(value, str) or len(value) > 64 or not _UID_PATTERN.fullmatch(value):
        raise SrInputError(f"{where} must be a valid DICOM UID, got {value!r}")
    return value


def _check_positive_int(value: Any, argument: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SrInputError(f"{argument} must be a positive integer, got {value!r}")
    return value


def _check_text(value: Any, argument: str, max_length: int = 64) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SrInputError(f"{argument} must be a non-empty string, got {value!r}")
    if len(value) > max_length:
        raise SrInputError(f"{argument} must be at most {max_length} characters, got {len(value)}")
    return value


# Patient and study attributes of type 2 that highdicom copies from the first evidence item;
# a source that lacks one gets it empty (as the standard allows) instead of failing.
_TYPE2_HEADER = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
)


def _header_source(image: pydicom.Dataset) -> pydicom.Dataset:
    """A new dataset with the elements of ``image`` and every type 2 patient/study attribute.

    (``pydicom.Dataset(image)`` and ``copy.copy(image)`` share the element dict with ``image``;
    adding to them would change the caller's dataset.)
    """
    header = pydicom.Dataset()
    for element in image:
        header.add(element)
    for keyword in _TYPE2_HEADER:
        if keyword not in header:
            setattr(header, keyword, "")
    return header


# --- Shared content -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Document:
    """The SR-level arguments both builders share, validated once."""

    source_images: Sequence[pydicom.Dataset]
    series_number: int
    instance_number: int
    manufacturer: str
    device_name: str
    device_uid: str | None
    series_instance_uid: str | None
    sop_instance_uid: str
    institution_name: str | None
    content_datetime: datetime.datetime | None

    @classmethod
    def validated(cls, source_images: Sequence[pydicom.Dataset], images_argument: str, **arguments: Any) -> _Document:
        _check_series(source_images, images_argument)
        _check_positive_int(arguments["series_number"], "series_number")
        _check_positive_int(arguments["instance_number"], "instance_number")
        _check_text(arguments["manufacturer"], "manufacturer")
        _check_text(arguments["device_name"], "device_name")
        for keyword in ("device_uid", "series_instance_uid", "sop_instance_uid"):
            if arguments[keyword] is not None:
                _check_uid(arguments[keyword], keyword)
        arguments["sop_instance_uid"] = arguments["sop_instance_uid"] or generate_uid()
        return cls(source_images=source_images, **arguments)

    def device_observer(self) -> hd.sr.ObserverContext:
        """TID 1002 observer context of the node, a device with a UID stable per node name."""
        uid = self.device_uid or generate_uid(entropy_srcs=["abscess-node device", self.device_name])
        return hd.sr.ObserverContext(
            observer_type=codes.cid270.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=uid, name=self.device_name, manufacturer_name=self.manufacturer, model_name="abscess-node"
            ),
        )

    def build(
        self, content: pydicom.Dataset, extra_evidence: Sequence[pydicom.Dataset], series_description: str
    ) -> hd.sr.ComprehensiveSR:
        """The Comprehensive SR around ``content``: patient/study of the source, evidence, flags."""
        # highdicom copies the patient/study header from the first evidence item.
        evidence = [_header_source(self.source_images[0]), *self.source_images[1:], *extra_evidence]
        now = self.content_datetime or datetime.datetime.now().replace(microsecond=0)
        return hd.sr.ComprehensiveSR(
            evidence=evidence,
            content=content,
            series_instance_uid=self.series_instance_uid or generate_uid(),
            series_number=self.series_number,
            sop_instance_uid=self.sop_instance_uid,
            instance_number=self.instance_number,
            manufacturer=self.manufacturer,
            is_complete=True,
            is_final=False,
            is_verified=False,
            institution_name=self.institution_name,
            series_description=_check_text(series_description, "series_description"),
            coding_schemes=[_CODING_SCHEME],
            content_date=now.date(),
            content_time=now.time(),
        )


def _text(name: Code, value: str, relationship: hd.sr.RelationshipTypeValues = CONTAINS) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=name, value=value, relationship_type=relationship)


def _write_integer(item: hd.sr.NumContentItem, value: float) -> None:
    """Write whole numbers as "2" instead of highdicom's DS "2.0" (counts, ranks, indices)."""
    if isinstance(value, int):
        item.MeasuredValueSequence[0].NumericValue = str(value)


def _num(name: Code, value: float, unit: Code) -> hd.sr.NumContentItem:
    item = hd.sr.NumContentItem(name=name, value=value, unit=unit, relationship_type=CONTAINS)
    _write_integer(item, value)
    return item


def _measurements(
    lesion: _Lesion,
    algorithm_id: hd.sr.AlgorithmIdentification | None,
    source_images: Sequence[pydicom.Dataset] | None,
) -> list[hd.sr.Measurement]:
    """TID 300 measurements of one lesion; slice indices reference their image when known."""
    measurements = []
    for quantity in LESION_QUANTITIES:
        value = lesion.values[quantity.key]
        if value is None:
            continue
        referenced_images = None
        if source_images is not None and quantity.key in ("first_slice", "last_slice"):
            image = source_images[int(value)]
            referenced_images = [hd.sr.SourceImageForMeasurement(image.SOPClassUID, image.SOPInstanceUID)]
        measurement = hd.sr.Measurement(
            name=quantity.name,
            value=value,
            unit=quantity.unit,
            derivation=quantity.derivation,
            method=quantity.method,
            algorithm_id=algorithm_id,
            referenced_images=referenced_images,
        )
        _write_integer(measurement[0], value)
        measurements.append(measurement)
    return measurements


def _finding_site(space: str | None) -> hd.sr.FindingSite:
    code = DEEP_NECK_SPACE_SITES.get(space.lower()) if space else None
    return hd.sr.FindingSite(anatomic_location=code or NECK)


# --- Measurement report ---------------------------------------------------------------------


def _check_segmentation(
    segmentation: pydicom.Dataset, source_images: Sequence[pydicom.Dataset], segment_number: int
) -> None:
    if not isinstance(segmentation, pydicom.Dataset):
        raise SrInputError(f"segmentation must be a pydicom Dataset, not {type(segmentation).__name__}")
    if segmentation.get("SOPClassUID") != SegmentationStorage:
        raise SrInputError(
            f"segmentation has SOPClassUID {segmentation.get('SOPClassUID')!r}, "
            f"not Segmentation Storage {SegmentationStorage}"
        )
    for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
        if not segmentation.get(keyword):
            raise SrInputError(f"segmentation has no {keyword}")
    if segmentation.StudyInstanceUID != source_images[0].StudyInstanceUID:
        raise SrInputError(
            f"segmentation belongs to study {segmentation.StudyInstanceUID}, "
            f"the source images to {source_images[0].StudyInstanceUID}"
        )
    numbers = [item.SegmentNumber for item in segmentation.get("SegmentSequence", [])]
    if segment_number not in numbers:
        raise SrInputError(
            f"segmentation {segmentation.SOPInstanceUID} has no segment {segment_number} (its segments: {numbers})"
        )


def build_measurement_report(
    source_images: Sequence[pydicom.Dataset],
    segmentation: pydicom.Dataset | None,
    lesions: Sequence[Mapping[str, Any]],
    algorithm: Mapping[str, Any],
    series_number: int,
    instance_number: int,
    manufacturer: str,
    device_name: str,
    *,
    segment_number: int = 1,
    device_uid: str | None = None,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    series_description: str | None = None,
    institution_name: str | None = None,
    content_datetime: datetime.datetime | None = None,
) -> hd.sr.ComprehensiveSR:
    """Build the TID 1500 measurement report of the abscesses found in one CT series.

    One TID 1411 volumetric ROI group per lesion, tracking identifier = the lesion label,
    region = ``segment_number`` of ``segmentation`` with the source slices from the lesion's
    first to its last slice (no frame numbers: an IMAGE reference may carry a segment number or
    frame numbers, not both), finding Abscess, finding site Neck (or
    the coded deep neck space when DICOM lists one), and the measurements of
    :data:`LESION_QUANTITIES`, each carrying the algorithm identification (TID 4019). The
    first/last slice measurements reference their CT image. The deep neck space is also written
    as text, and the algorithm description as a comment prefixed with :data:`DEMO_NOTICE` when
    the weights are demo weights. With no lesion, one TID 1501 group says "Abscess: Absent".

    Args:
        source_images: The CT series the SEG was computed on, in the order lesion slice
            indices refer to.
        segmentation: The node's DICOM SEG of those images; may be None only without lesions.
        lesions: One mapping per lesion (e.g. ``index.lesions.Lesion.as_dict()``) with keys
            ``label`` (int n, written "Abscess n", or a string), ``volume_ml``,
            ``longest_axial_diameter_mm``, ``core_mean_hu``, ``core_sd_hu`` (both may be None),
            ``loculi``, ``first_slice``, ``last_slice`` (0-based indices into
            ``source_images``) and optionally ``space`` (deep neck space name or None).
        algorithm: ``name``, ``version``, ``description``, ``demo`` (bool) and optionally
            ``parameters`` (sequence of strings).
        series_number: Series Number of the new SR series.
        instance_number: Instance Number of the SR.
        manufacturer: Manufacturer written in the SR and in the device observer context.
        device_name: Name of the node, recorded as Device Observer Name.
        segment_number: The SEG segment holding the abscess mask.
        device_uid: Device Observer UID; by default derived from ``device_name`` (stable).
        series_instance_uid: Series Instance UID of the SR; new when None.
        sop_instance_uid: SOP Instance UID of the SR; new when None (pass a stable one to
            replace an earlier report of the same study).
        series_description: Defaults to "Abscess measurements (VM-UNet)", with ", DEMO" added
            for demo weights.
        institution_name: Optional Institution Name.
        content_datetime: Content Date/Time; now when None.

    Returns:
        The SR document (a pydicom Dataset), COMPLETE and UNVERIFIED, with the source images
        and the SEG in the Current Requested Procedure Evidence Sequence.

    Raises:
        SrInputError: An argument is missing something or holds an impossible value; the
            message names the argument, the key and the value.
    """
    document = _Document.validated(
        source_images,
        "source_images",
        series_number=series_number,
        instance_number=instance_number,
        manufacturer=manufacturer,
        device_name=device_name,
        device_uid=device_uid,
        series_instance_uid=series_instance_uid,
        sop_instance_uid=sop_instance_uid,
        institution_name=institution_name,
        content_datetime=content_datetime,
    )
    _check_positive_int(segment_number, "segment_number")
    parsed_algorithm = _Algorithm.from_mapping(algorithm)
    if isinstance(lesions, Mapping) or not isinstance(lesions, Sequence):
        raise SrInputError(f"lesions must be a sequence of mappings, not {type(lesions).__name__}")
    parsed_lesions = [
        _Lesion.from_mapping(lesion, f"lesions[{position}]", len(source_images))
        for position, lesion in enumerate(lesions)
    ]
    labels = [lesion.label for lesion in parsed_lesions]
    if len(set(labels)) != len(labels):
        raise SrInputError(f"lesion labels must be unique within a report, got {labels}")
    if segmentation is not None:
        _check_segmentation(segmentation, source_images, segment_number)
    elif parsed_lesions:
        raise SrInputError("segmentation is required when there are lesions (they reference its segment)")

    algorithm_id = parsed_algorithm.identification()
    comment = parsed_algorithm.comment()
    groups: list[
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations | hd.sr.MeasurementsAndQualitativeEvaluations
    ] = []
    if parsed_lesions:
        assert segmentation is not None
        for lesion in parsed_lesions:
            lesion_images = source_images[lesion.first_slice : lesion.last_slice + 1]
            group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=generate_uid(entropy_srcs=[document.sop_instance_uid, lesion.label]), identifier=lesion.label
                ),
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=segmentation.SOPClassUID,
                    sop_instance_uid=segmentation.SOPInstanceUID,
                    segment_number=segment_number,
                    source_images=[
                        hd.sr.SourceImageForSegmentation(image.SOPClassUID, image.SOPInstanceUID)
                        for image in lesion_images
                    ],
                ),
                finding_type=ABSCESS,
                finding_category=MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
                finding_sites=[_finding_site(lesion.space)],
                algorithm_id=algorithm_id,
                measurements=_measurements(lesion, algorithm_id, source_images),
            )
            if lesion.space:
                group[0].ContentSequence.append(_text(DEEP_NECK_SPACE, lesion.space))
            if comment:
                group[0].ContentSequence.append(_text(COMMENT, comment))
            groups.append(group)
    else:
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=generate_uid(entropy_srcs=[document.sop_instance_uid, "no lesion"]), identifier="No abscess"
            ),
            finding_type=ABSCESS,
            finding_category=MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
            algorithm_id=algorithm_id,
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=ABSCESS, value=ABSENT)],
        )
        group[0].ContentSequence.append(_text(COMMENT, NO_LESION_TEXT))
        if comment:
            group[0].ContentSequence.append(_text(COMMENT, comment))
        groups.append(group)

    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=document.device_observer()),
        procedure_reported=CT_UNSPECIFIED_BODY_REGION,
        imaging_measurements=groups,
    )
    if series_description is None:
        series_description = "Abscess measurements (VM-UNet" + (", DEMO)" if parsed_algorithm.demo else ")")
    return document.build(report, [segmentation] if segmentation is not None else [], series_description)


# --- Similar cases report -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _SlicePair:
    query_slice: int
    matched: str | int  # SOP Instance UID, or slice index when the instance is not known
    similarity: float


@dataclasses.dataclass(frozen=True)
class _SimilarCase:
    rank: int
    score: float
    mode: str
    study_uid: str
    study_date: datetime.date | None
    study_description: str | None
    accession_number: str | None
    patient_id: str | None
    series_uid: str | None
    sop_class_uid: str | None
    best_slices: tuple[_SlicePair, ...]
    lesions: tuple[_Lesion, ...]

    @property
    def images_known(self) -> bool:
        """Whether matched slices can be IMAGE references (series and SOP class are known)."""
        return bool(self.series_uid and self.sop_class_uid)


def _optional_text(value: Any, where: str, max_length: int = 64) -> str | None:
    if value is None or value == "":
        return None
    return _check_text(value, where, max_length)


def _parse_date(value: Any, where: str) -> datetime.date | None:
    if value is None or value == "":
        return None
    if isinstance(value, datetime.date):
        return value
    if isinstance(value, str):
        try:
            return datetime.datetime.strptime(value, "%Y%m%d").date()
        except ValueError:
            pass
    raise SrInputError(f"{where} must be a datetime.date or a DICOM DA string YYYYMMDD, got {value!r}")


def _finite(value: Any, where: str) -> float:
    if isinstance(value, bool) or not hasattr(value, "__float__") or not math.isfinite(float(value)):
        raise SrInputError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def _index(value: Any, where: str, n: int | None = None) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__") or int(value) < 0:
        raise SrInputError(f"{where} must be a non-negative integer, got {value!r}")
    if n is not None and int(value) >= n:
        raise SrInputError(f"{where} is {value}, outside the {n} query images (0-based)")
    return int(value)


def _parse_similar_case(result: Mapping[str, Any], where: str, n_query_slices: int) -> _SimilarCase:
    if not isinstance(result, Mapping):
        raise SrInputError(f"{where} must be a mapping, not {type(result).__name__}")
    required = ("rank", "score", "mode", "study_uid", "best_slices", "lesions")
    missing = [key for key in required if key not in result]
    if missing:
        raise SrInputError(f"{where} lacks key(s) {missing}; got {sorted(result)}")
    rank = result["rank"]
    if isinstance(rank, bool) or not hasattr(rank, "__index__") or int(rank) < 1:
        raise SrInputError(f"{where}['rank'] must be a positive integer, got {rank!r}")
    pairs = []
    best_slices = result["best_slices"]
    if isinstance(best_slices, (str, Mapping)) or not isinstance(best_slices, Sequence):
        raise SrInputError(f"{where}['best_slices'] must be a sequence of 3-tuples, got {best_slices!r}")
    for position, pair in enumerate(best_slices):
        pair_where = f"{where}['best_slices'][{position}]"
        if isinstance(pair, (str, Mapping)) or not isinstance(pair, Sequence) or len(pair) != 3:
            raise SrInputError(
                f"{pair_where} must be (query_slice_index, matched SOP Instance UID or slice index, "
                f"similarity), got {pair!r}"
            )
        query_slice, matched, similarity = pair
        if isinstance(matched, str):
            matched = _check_uid(matched, f"{pair_where}[1]")
        else:
            matched = _index(matched, f"{pair_where}[1]")
        pairs.append(
            _SlicePair(
                _index(query_slice, f"{pair_where}[0]", n_query_slices),
                matched,
                _finite(similarity, f"{pair_where}[2]"),
            )
        )
    lesions = result["lesions"]
    if isinstance(lesions, Mapping) or not isinstance(lesions, Sequence):
        raise SrInputError(f"{where}['lesions'] must be a sequence of lesion mappings, got {lesions!r}")
    series_uid = result.get("series_uid")
    sop_class_uid = result.get("sop_class_uid")
    return _SimilarCase(
        rank=int(rank),
        score=_finite(result["score"], f"{where}['score']"),
        mode=_check_text(result["mode"], f"{where}['mode']"),
        study_uid=_check_uid(result["study_uid"], f"{where}['study_uid']"),
        study_date=_parse_date(result.get("study_date"), f"{where}['study_date']"),
        study_description=_optional_text(result.get("study_description"), f"{where}['study_description']"),
        accession_number=_optional_text(result.get("accession_number"), f"{where}['accession_number']", 16),
        patient_id=_optional_text(result.get("patient_id"), f"{where}['patient_id']"),
        series_uid=_check_uid(series_uid, f"{where}['series_uid']") if series_uid else None,
        sop_class_uid=_check_uid(sop_class_uid, f"{where}['sop_class_uid']") if sop_class_uid else None,
        best_slices=tuple(pairs),
        lesions=tuple(
            _Lesion.from_mapping(lesion, f"{where}['lesions'][{position}]", None)
            for position, lesion in enumerate(lesions)
        ),
    )


def _container(name: Code, relationship: hd.sr.RelationshipTypeValues | None = CONTAINS) -> hd.sr.ContainerContentItem:
    item = hd.sr.ContainerContentItem(name=name, relationship_type=relationship)
    item.ContentSequence = hd.sr.ContentSequence()
    return item


def _slice_pair_item(
    pair: _SlicePair, case: _SimilarCase, query_images: Sequence[pydicom.Dataset]
) -> hd.sr.ContainerContentItem:
    query_image = query_images[pair.query_slice]
    item = _container(SLICE_PAIR)
    item.ContentSequence.extend(
        [
            hd.sr.ImageContentItem(
                name=QUERY_IMAGE,
                referenced_sop_class_uid=query_image.SOPClassUID,
                referenced_sop_instance_uid=query_image.SOPInstanceUID,
                relationship_type=CONTAINS,
            ),
            _num(QUERY_SLICE_INDEX, pair.query_slice, UNIT_NONE),
        ]
    )
    if isinstance(pair.matched, int):
        item.ContentSequence.append(_num(MATCHED_SLICE_INDEX, pair.matched, UNIT_NONE))
    elif case.images_known:
        item.ContentSequence.append(
            hd.sr.ImageContentItem(
                name=MATCHED_IMAGE,
                referenced_sop_class_uid=case.sop_class_uid,  # type: ignore[arg-type]
                referenced_sop_instance_uid=pair.matched,
                relationship_type=CONTAINS,
            )
        )
    else:
        item.ContentSequence.append(
            hd.sr.UIDRefContentItem(name=MATCHED_SOP_INSTANCE_UID, value=pair.matched, relationship_type=CONTAINS)
        )
    item.ContentSequence.append(_num(SLICE_SIMILARITY, pair.similarity, UNIT_NONE))
    return item


def _matched_lesion_item(lesion: _Lesion) -> hd.sr.ContainerContentItem:
    item = _container(MATCHED_LESION)
    item.ContentSequence.append(_text(TRACKING_IDENTIFIER, lesion.label, HAS_OBS_CONTEXT))
    for measurement in _measurements(lesion, algorithm_id=None, source_images=None):
        item.ContentSequence.extend(measurement)
    if lesion.space:
        item.ContentSequence.append(_text(DEEP_NECK_SPACE, lesion.space))
    return item


def _similar_case_item(case: _SimilarCase, query_images: Sequence[pydicom.Dataset]) -> hd.sr.ContainerContentItem:
    item = _container(SIMILAR_CASE)
    content = item.ContentSequence
    content.extend(
        [
            _num(RANK, case.rank, UNIT_NONE),
            _num(SIMILARITY_SCORE, case.score, UNIT_NONE),
            _text(RETRIEVAL_MODE, case.mode),
            hd.sr.UIDRefContentItem(name=STUDY_INSTANCE_UID, value=case.study_uid, relationship_type=CONTAINS),
        ]
    )
    if case.study_date is not None:
        content.append(hd.sr.DateContentItem(name=STUDY_DATE, value=case.study_date, relationship_type=CONTAINS))
    for name, value in (
        (PROCEDURE_DESCRIPTION, case.study_description),
        (ACCESSION_NUMBER, case.accession_number),
        (SUBJECT_ID, case.patient_id),
    ):
        if value is not None:
            content.append(_text(name, value))
    if case.series_uid is not None:
        content.append(
            hd.sr.UIDRefContentItem(name=SERIES_INSTANCE_UID, value=case.series_uid, relationship_type=CONTAINS)
        )
    content.extend(_slice_pair_item(pair, case, query_images) for pair in case.best_slices)
    content.extend(_matched_lesion_item(lesion) for lesion in case.lesions)
    return item


def _matched_image_evidence(case: _SimilarCase) -> list[pydicom.Dataset]:
    """Minimal evidence items (UIDs only) for the matched images an IMAGE item references."""
    if not case.images_known:
        return []
    evidence = []
    for pair in case.best_slices:
        if isinstance(pair.matched, str):
            reference = pydicom.Dataset()
            reference.StudyInstanceUID = case.study_uid
            reference.SeriesInstanceUID = case.series_uid
            reference.SOPInstanceUID = pair.matched
            reference.SOPClassUID = case.sop_class_uid
            evidence.append(reference)
    return evidence


def build_similar_cases_report(
    query_images: Sequence[pydicom.Dataset],
    results: Sequence[Mapping[str, Any]],
    query: Mapping[str, Any],
    algorithm: Mapping[str, Any],
    series_number: int,
    instance_number: int,
    manufacturer: str,
    device_name: str = "abscess-node",
    *,
    device_uid: str | None = None,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    series_description: str = "Similar cases (abscess-node)",
    institution_name: str | None = None,
    content_datetime: datetime.datetime | None = None,
) -> hd.sr.ComprehensiveSR:
    """Build the "Similar cases" Comprehensive SR answering one similar-case query.

    Content: the query parameters (mode, k, filters, requesting AE title, algorithm
    identification and, for demo weights, the demo comment), the number of cases found (with
    "No similar case found." when zero), then one "Similar case" container per result, in rank
    order, with rank, similarity score, retrieval mode, the matched study (Study Instance UID,
    Study Date, description, accession number, patient ID as indexed), one container per
    best-matching slice pair (the query IMAGE, its index, the matched image, the slice
    similarity) and one container per matched lesion with the descriptors of
    :data:`LESION_QUANTITIES`.

    A matched slice given as a SOP Instance UID becomes an IMAGE reference when the result also
    gives ``series_uid`` and ``sop_class_uid`` (it is then listed in the Pertinent Other Evidence
    Sequence); otherwise a UIDREF. A matched slice given as an index becomes a NUM.

    Patient IDs and accession numbers of other patients are written as given: pseudonymise them
    before calling when the report may reach users who must not see them.

    Args:
        query_images: The query series (patient, study and evidence come from it), in the
            order query slice indices refer to.
        results: Mappings with ``rank`` (int >= 1), ``score``, ``mode``, ``study_uid``,
            ``study_date`` (YYYYMMDD or date, optional), ``study_description``,
            ``accession_number``, ``patient_id`` (optional), ``best_slices`` (sequence of
            ``(query_slice_index, matched_sop_instance_uid or matched_slice_index, similarity)``),
            ``lesions`` (lesion mappings as for :func:`build_measurement_report`), and optionally
            ``series_uid`` and ``sop_class_uid`` of the matched series.
        query: ``mode``, ``k`` (int >= 1), optionally ``filters`` (str) and ``requested_by``
            (AE title).
        algorithm: ``name``, ``version``, ``description``, ``demo`` (bool).
        series_number: Series Number of the new SR series.
        instance_number: Instance Number of the SR.
        manufacturer: Manufacturer written in the SR and in the device observer context.
        device_name: Name of the node, recorded as Device Observer Name.
        device_uid: Device Observer UID; by default derived from ``device_name`` (stable).
        series_instance_uid: Series Instance UID of the SR; new when None.
        sop_instance_uid: SOP Instance UID of the SR; new when None.
        series_description: Series Description of the SR.
        institution_name: Optional Institution Name.
        content_datetime: Content Date/Time; now when None.

    Returns:
        The SR document (a pydicom Dataset), COMPLETE and UNVERIFIED.

    Raises:
        SrInputError: An argument is missing something or holds an impossible value; the
            message names the argument, the key and the value.
    """
    document = _Document.validated(
        query_images,
        "query_images",
        series_number=series_number,
        instance_number=instance_number,
        manufacturer=manufacturer,
        device_name=device_name,
        device_uid=device_uid,
        series_instance_uid=series_instance_uid,
        sop_instance_uid=sop_instance_uid,
        institution_name=institution_name,
        content_datetime=content_datetime,
    )
    parsed_algorithm = _Algorithm.from_mapping(algorithm)
    if not isinstance(query, Mapping):
        raise SrInputError(f"query must be a mapping with mode, k, filters, requested_by, not {type(query).__name__}")
    missing = [key for key in ("mode", "k") if key not in query]
    if missing:
        raise SrInputError(f"query lacks key(s) {missing}; got {sorted(query)}")
    query_mode = _check_text(query["mode"], "query['mode']")
    k = _check_positive_int(query["k"], "query['k']")
    filters = _optional_text(query.get("filters"), "query['filters']", 1024)
    requested_by = _optional_text(query.get("requested_by"), "query['requested_by']", 16)
    if isinstance(results, Mapping) or not isinstance(results, Sequence):
        raise SrInputError(f"results must be a sequence of mappings, not {type(results).__name__}")
    cases = sorted(
        (
            _parse_similar_case(result, f"results[{position}]", len(query_images))
            for position, result in enumerate(results)
        ),
        key=lambda case: case.rank,
    )
    ranks = [case.rank for case in cases]
    if len(set(ranks)) != len(ranks):
        raise SrInputError(f"result ranks must be unique, got {ranks}")

    root = _container(SIMILAR_CASES, relationship=None)
    root.ContentSequence.extend(hd.sr.LanguageOfContentItemAndDescendants(hd.sr.templates.DEFAULT_LANGUAGE))
    root.ContentSequence.extend(document.device_observer())
    query_item = _container(QUERY_PARAMETERS)
    query_item.ContentSequence.extend(
        [
            _text(RETRIEVAL_MODE, query_mode),
            _num(RESULTS_REQUESTED, k, UNIT_NONE),
            hd.sr.UIDRefContentItem(
                name=SERIES_INSTANCE_UID, value=query_images[0].SeriesInstanceUID, relationship_type=CONTAINS
            ),
        ]
    )
    if filters is not None:
        query_item.ContentSequence.append(_text(QUERY_FILTERS, filters))
    if requested_by is not None:
        query_item.ContentSequence.append(_text(REQUESTED_BY, requested_by))
    query_item.ContentSequence.extend(parsed_algorithm.identification())
    comment = parsed_algorithm.comment()
    if comment:
        query_item.ContentSequence.append(_text(COMMENT, comment))
    root.ContentSequence.append(query_item)
    root.ContentSequence.append(_num(CASES_FOUND, len(cases), UNIT_NONE))
    if not cases:
        root.ContentSequence.append(_text(COMMENT, NO_SIMILAR_CASE_TEXT))
    root.ContentSequence.extend(_similar_case_item(case, query_images) for case in cases)

    matched_images = [image for case in cases for image in _matched_image_evidence(case)]
    return document.build(root, matched_images, series_description)

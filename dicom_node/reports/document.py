"""What the node's two SRs share: the document around the content, and the content items.

Both reports are Comprehensive SR (SOP Class 1.2.840.10008.5.1.4.1.1.88.33) stored in the study
they describe (same Patient and Study modules, same StudyInstanceUID, a new series), with the
node as device observer (TID 1004) and the ``99ABSCESS`` coding scheme declared. Comprehensive
SR rather than Comprehensive 3D SR: neither report uses SCOORD3D, and 88.33 is the SR class the
widest range of PACS, viewers and dcmtk tools display.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Sequence
from typing import Any

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from dicom_node.identity import is_uid
from dicom_node.reports.codes import (
    ATTENUATION_COEFFICIENT,
    CODING_SCHEME,
    FIRST_SLICE_INDEX,
    LAST_SLICE_INDEX,
    LESION_CORE,
    LONG_AXIS,
    MAXIMUM,
    MEAN,
    NUMBER_OF_LOCULI,
    STANDARD_DEVIATION,
    UNIT_HU,
    UNIT_LOCULI,
    UNIT_ML,
    UNIT_MM,
    UNIT_NONE,
    VOLUME,
)
from index.lesions import Lesion
from models.weights import AlgorithmInfo

DEMO_NOTICE = "DEMO MODEL WEIGHTS - NOT FOR CLINICAL USE"
"""Prefix of the comment every report carries when the model runs on demo weights."""

CONTAINS = hd.sr.RelationshipTypeValues.CONTAINS
HAS_OBS_CONTEXT = hd.sr.RelationshipTypeValues.HAS_OBS_CONTEXT


class SrInputError(ValueError):
    """An argument of an SR builder is missing something or holds an impossible value."""


@dataclasses.dataclass(frozen=True)
class Quantity:
    """One numeric lesion descriptor: the :class:`~index.lesions.Lesion` field and how it is coded."""

    field: str
    name: Code
    unit: Code
    derivation: Code | None = None
    method: Code | None = None


LESION_QUANTITIES: tuple[Quantity, ...] = (
    Quantity("volume_ml", VOLUME, UNIT_ML),
    Quantity("longest_axial_diameter_mm", LONG_AXIS, UNIT_MM, derivation=MAXIMUM),
    Quantity("core_mean_hu", ATTENUATION_COEFFICIENT, UNIT_HU, derivation=MEAN, method=LESION_CORE),
    Quantity("core_sd_hu", ATTENUATION_COEFFICIENT, UNIT_HU, derivation=STANDARD_DEVIATION, method=LESION_CORE),
    Quantity("loculi", NUMBER_OF_LOCULI, UNIT_LOCULI),
    Quantity("first_slice", FIRST_SLICE_INDEX, UNIT_NONE),
    Quantity("last_slice", LAST_SLICE_INDEX, UNIT_NONE),
)
"""How each lesion descriptor is written (same codes in both reports). A core value of None
(core too small to measure) is left out."""


def lesion_label(lesion: Lesion) -> str:
    """The tracking identifier of a lesion: "Abscess <label>"."""
    return f"Abscess {lesion.label}"


def algorithm_identification(algorithm: AlgorithmInfo) -> hd.sr.AlgorithmIdentification:
    """TID 4019 algorithm identification: the weights' name and version."""
    return hd.sr.AlgorithmIdentification(name=algorithm.name, version=algorithm.version)


def algorithm_comment(algorithm: AlgorithmInfo) -> str | None:
    """Text of the algorithm comment item: the description, prefixed when demo weights."""
    if algorithm.demo:
        return f"{DEMO_NOTICE}: {algorithm.description}" if algorithm.description else DEMO_NOTICE
    return algorithm.description or None


def check_series(images: Sequence[pydicom.Dataset], argument: str) -> None:
    """The images are one series of one study with distinct SOP Instance UIDs."""
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


def check_uid(value: Any, where: str) -> str:
    """``value`` if it is a valid DICOM UID."""
    if not is_uid(value):
        raise SrInputError(f"{where} must be a valid DICOM UID, got {value!r}")
    return value


def check_positive_int(value: Any, argument: str) -> int:
    """``value`` if it is a whole number >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SrInputError(f"{argument} must be a positive integer, got {value!r}")
    return value


def check_count(value: Any, argument: str) -> int:
    """A whole number >= 0, or :class:`SrInputError` naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SrInputError(f"{argument} must be a whole number >= 0, got {value!r}")
    return int(value)


def check_text(value: Any, argument: str, max_length: int = 64) -> str:
    """``value`` if it is a non-empty string of at most ``max_length`` characters."""
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


@dataclasses.dataclass(frozen=True)
class Document:
    """The SR-level arguments both builders share, validated by :meth:`validated`."""

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
    def validated(cls, source_images: Sequence[pydicom.Dataset], images_argument: str, **arguments: Any) -> Document:
        """Check every argument; a new SOP Instance UID when none is given."""
        check_series(source_images, images_argument)
        check_positive_int(arguments["series_number"], "series_number")
        check_positive_int(arguments["instance_number"], "instance_number")
        check_text(arguments["manufacturer"], "manufacturer")
        check_text(arguments["device_name"], "device_name")
        for keyword in ("device_uid", "series_instance_uid", "sop_instance_uid"):
            if arguments[keyword] is not None:
                check_uid(arguments[keyword], keyword)
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
            series_description=check_text(series_description, "series_description"),
            coding_schemes=[CODING_SCHEME],
            content_date=now.date(),
            content_time=now.time(),
        )


def text_item(name: Code, value: str, relationship: hd.sr.RelationshipTypeValues = CONTAINS) -> hd.sr.TextContentItem:
    """A TEXT content item."""
    return hd.sr.TextContentItem(name=name, value=value, relationship_type=relationship)


def _write_integer(item: hd.sr.NumContentItem, value: float) -> None:
    """Write whole numbers as "2" instead of highdicom's DS "2.0" (counts, ranks, indices)."""
    if isinstance(value, int):
        item.MeasuredValueSequence[0].NumericValue = str(value)


def num_item(name: Code, value: float, unit: Code) -> hd.sr.NumContentItem:
    """A NUM content item (whole numbers written without a decimal point)."""
    item = hd.sr.NumContentItem(name=name, value=value, unit=unit, relationship_type=CONTAINS)
    _write_integer(item, value)
    return item


def container_item(name: Code, relationship: hd.sr.RelationshipTypeValues | None = CONTAINS) -> hd.sr.ContainerContentItem:
    """An empty CONTAINER content item."""
    item = hd.sr.ContainerContentItem(name=name, relationship_type=relationship)
    item.ContentSequence = hd.sr.ContentSequence()
    return item


def lesion_measurements(
    lesion: Lesion,
    algorithm_id: hd.sr.AlgorithmIdentification | None,
    source_images: Sequence[pydicom.Dataset] | None,
) -> list[hd.sr.Measurement]:
    """TID 300 measurements of one lesion; slice indices reference their image when known."""
    measurements = []
    for quantity in LESION_QUANTITIES:
        value = getattr(lesion, quantity.field)
        if value is None:
            continue
        referenced_images = None
        if source_images is not None and quantity.field in ("first_slice", "last_slice"):
            image = source_images[value]
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

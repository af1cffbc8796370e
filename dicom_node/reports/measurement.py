"""The measurement report: DICOM TID 1500 "Imaging Measurement Report" of the abscesses found.

One TID 1411 volumetric measurement group per abscess, each referencing segment 1 of the node's
DICOM SEG and the CT slices it lies on, its finding site the lesion's deep neck space (coded,
:data:`~dicom_node.reports.codes.DEEP_NECK_SPACE_SITES`) with the side as laterality. A study without
lesion still gets a report, with one TID 1501 group saying "Abscess: Absent", so the radiologist
sees that the node ran. When the plausibility rules ran, one more TID 1501 group counts the
candidates each rule removed.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence

import highdicom as hd
import pydicom
from pydicom.uid import SegmentationStorage, generate_uid

from dicom_node.reports.codes import (
    ABSCESS,
    ABSENT,
    CANDIDATES_REMOVED,
    COMMENT,
    CT_UNSPECIFIED_BODY_REGION,
    DEEP_NECK_SPACE,
    DEEP_NECK_SPACE_SITES,
    LATERALITY,
    MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
    NECK,
    RULE_CODES,
    UNIT_CANDIDATES,
)
from dicom_node.reports.document import (
    Document,
    SrInputError,
    algorithm_comment,
    algorithm_identification,
    check_count,
    check_positive_int,
    lesion_label,
    lesion_measurements,
    text_item,
)
from index.lesions import Lesion
from models.weights import AlgorithmInfo

NO_LESION_TEXT = "No abscess detected by the algorithm."


def _finding_site(space: str | None, side: str | None) -> hd.sr.FindingSite:
    code = DEEP_NECK_SPACE_SITES.get(space.lower()) if space else None
    return hd.sr.FindingSite(anatomic_location=code or NECK, laterality=LATERALITY.get(side) if side else None)


def _candidates_group(document_uid: str, removed: Mapping[str, int], algorithm_id: hd.sr.AlgorithmIdentification
                      ) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group: how many abscess candidates each plausibility rule removed."""
    unknown = sorted(set(removed) - set(RULE_CODES))
    if unknown:
        raise SrInputError(f"candidates_removed names unknown rules {unknown}; known: {sorted(RULE_CODES)}")
    measurements = []
    for rule, code in RULE_CODES.items():
        count = check_count(removed.get(rule, 0), f"candidates_removed[{rule!r}]")
        measurements.append(hd.sr.Measurement(name=code, value=count, unit=UNIT_CANDIDATES, algorithm_id=algorithm_id))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(entropy_srcs=[document_uid, "candidates removed"]), identifier="Candidates removed"),
        finding_type=CANDIDATES_REMOVED, algorithm_id=algorithm_id, measurements=measurements)


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
    lesions: Sequence[Lesion],
    algorithm: AlgorithmInfo,
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
    candidates_removed: Mapping[str, int] | None = None,
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
        lesions: The lesions (label n is written "Abscess n"); their slice indices are 0-based
            into ``source_images``.
        algorithm: The network that found them (``Segmenter.info``).
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
        candidates_removed: rule name (:data:`models.plausibility.RULES`) -> number of abscess
            candidates it removed; written as one more group when given.

    Returns:
        The SR document (a pydicom Dataset), COMPLETE and UNVERIFIED, with the source images
        and the SEG in the Current Requested Procedure Evidence Sequence.

    Raises:
        SrInputError: An argument is missing something or holds an impossible value; the
            message names the argument, the key and the value.
    """
    document = Document.validated(
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
    check_positive_int(segment_number, "segment_number")
    if isinstance(algorithm, Mapping) or not isinstance(algorithm, AlgorithmInfo):
        raise SrInputError(f"algorithm must be a models.weights.AlgorithmInfo, not {type(algorithm).__name__}")
    if not isinstance(lesions, Sequence) or not all(isinstance(lesion, Lesion) for lesion in lesions):
        raise SrInputError("lesions must be a sequence of index.lesions.Lesion")
    for position, lesion in enumerate(lesions):
        if lesion.last_slice >= len(source_images):
            raise SrInputError(
                f"lesions[{position}]: last_slice {lesion.last_slice} is outside the {len(source_images)} source "
                f"images (indices are 0-based into source_images as given)")
    labels = [lesion.label for lesion in lesions]
    if len(set(labels)) != len(labels):
        raise SrInputError(f"lesion labels must be unique within a report, got {labels}")
    if segmentation is not None:
        _check_segmentation(segmentation, source_images, segment_number)
    elif lesions:
        raise SrInputError("segmentation is required when there are lesions (they reference its segment)")

    algorithm_id = algorithm_identification(algorithm)
    comment = algorithm_comment(algorithm)
    groups: list[
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations | hd.sr.MeasurementsAndQualitativeEvaluations
    ] = []
    if lesions:
        assert segmentation is not None
        for lesion in lesions:
            lesion_images = source_images[lesion.first_slice : lesion.last_slice + 1]
            group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=generate_uid(entropy_srcs=[document.sop_instance_uid, lesion_label(lesion)]),
                    identifier=lesion_label(lesion),
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
                finding_sites=[_finding_site(lesion.space, lesion.side)],
                algorithm_id=algorithm_id,
                measurements=lesion_measurements(lesion, algorithm_id, source_images),
            )
            if lesion.space:
                where = lesion.space if not lesion.side else f"{lesion.side} {lesion.space}"
                group[0].ContentSequence.append(text_item(DEEP_NECK_SPACE, where))
            if comment:
                group[0].ContentSequence.append(text_item(COMMENT, comment))
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
        group[0].ContentSequence.append(text_item(COMMENT, NO_LESION_TEXT))
        if comment:
            group[0].ContentSequence.append(text_item(COMMENT, comment))
        groups.append(group)

    if candidates_removed is not None:
        groups.append(_candidates_group(document.sop_instance_uid, candidates_removed, algorithm_id))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=document.device_observer()),
        procedure_reported=CT_UNSPECIFIED_BODY_REGION,
        imaging_measurements=groups,
    )
    if series_description is None:
        series_description = "Abscess measurements (VM-UNet" + (", DEMO)" if algorithm.demo else ")")
    return document.build(report, [segmentation] if segmentation is not None else [], series_description)

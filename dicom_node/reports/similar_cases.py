"""The "Similar cases" report: one Comprehensive SR answering one similar-case query.

Content: the query parameters (mode, k, filters, requesting AE title, algorithm identification
and, for demo weights, the demo comment), the number of cases found (with "No similar case
found." when zero), then one "Similar case" container per result, in rank order, with rank,
similarity score, retrieval mode, the matched study (Study Instance UID, Study Date,
description, accession number, patient ID as indexed), one container per best-matching slice
pair (the query IMAGE, its index, the matched image, the slice similarity) and one container
per matched lesion with the descriptors of :data:`~dicom_node.reports.document.LESION_QUANTITIES`.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Sequence

import highdicom as hd
import pydicom

from dicom_node.reports.codes import (
    ACCESSION_NUMBER,
    CASES_FOUND,
    COMMENT,
    DEEP_NECK_SPACE,
    MATCHED_IMAGE,
    MATCHED_LESION,
    MATCHED_SLICE_INDEX,
    MATCHED_SOP_INSTANCE_UID,
    PROCEDURE_DESCRIPTION,
    QUERY_FILTERS,
    QUERY_IMAGE,
    QUERY_PARAMETERS,
    QUERY_SLICE_INDEX,
    RANK,
    REQUESTED_BY,
    RESULTS_REQUESTED,
    RETRIEVAL_MODE,
    SERIES_INSTANCE_UID,
    SIMILAR_CASE,
    SIMILAR_CASES,
    SIMILARITY_SCORE,
    SLICE_PAIR,
    SLICE_SIMILARITY,
    STUDY_DATE,
    STUDY_INSTANCE_UID,
    SUBJECT_ID,
    TRACKING_IDENTIFIER,
    UNIT_NONE,
)
from dicom_node.reports.document import (
    CONTAINS,
    HAS_OBS_CONTEXT,
    Document,
    SrInputError,
    algorithm_comment,
    algorithm_identification,
    check_positive_int,
    check_text,
    container_item,
    lesion_label,
    lesion_measurements,
    num_item,
    text_item,
)
from dicom_node.similar.query import SimilarCase, SlicePair
from index.lesions import Lesion
from models.weights import AlgorithmInfo

NO_SIMILAR_CASE_TEXT = "No similar case found."


@dataclasses.dataclass(frozen=True)
class ReportedQuery:
    """The query a similar-cases report answers, as written into it.

    Attributes:
        mode: retrieval mode.
        k: number of results asked for.
        filters: the filters as text (lesion filters, standard keys), or None.
        requested_by: calling AE title (or user), or None for the node's own report.

    Raises:
        SrInputError: a value is empty, too long or impossible.
    """

    mode: str
    k: int
    filters: str | None = None
    requested_by: str | None = None

    def __post_init__(self) -> None:
        check_text(self.mode, "query mode")
        check_positive_int(self.k, "query k")
        for name, limit in (("filters", 1024), ("requested_by", 16)):
            value = getattr(self, name)
            if value is not None:
                check_text(value, f"query {name}", limit)


def _parse_date(value: str) -> datetime.date | None:
    try:
        return datetime.datetime.strptime(value, "%Y%m%d").date() if value else None
    except ValueError:
        return None  # a malformed StudyDate in the source is left out, not written


def _slice_pair_item(pair: SlicePair, case: SimilarCase, query_images: Sequence[pydicom.Dataset]) -> hd.sr.ContainerContentItem:
    query_image = query_images[pair.query_slice]
    item = container_item(SLICE_PAIR)
    item.ContentSequence.extend(
        [
            hd.sr.ImageContentItem(
                name=QUERY_IMAGE,
                referenced_sop_class_uid=query_image.SOPClassUID,
                referenced_sop_instance_uid=query_image.SOPInstanceUID,
                relationship_type=CONTAINS,
            ),
            num_item(QUERY_SLICE_INDEX, pair.query_slice, UNIT_NONE),
        ]
    )
    if not pair.matched_sop_instance_uid:
        item.ContentSequence.append(num_item(MATCHED_SLICE_INDEX, pair.matched_slice, UNIT_NONE))
    elif case.study.series_uid:
        item.ContentSequence.append(
            hd.sr.ImageContentItem(
                name=MATCHED_IMAGE,
                referenced_sop_class_uid=case.sop_class_uid,
                referenced_sop_instance_uid=pair.matched_sop_instance_uid,
                relationship_type=CONTAINS,
            )
        )
    else:
        item.ContentSequence.append(
            hd.sr.UIDRefContentItem(
                name=MATCHED_SOP_INSTANCE_UID, value=pair.matched_sop_instance_uid, relationship_type=CONTAINS
            )
        )
    item.ContentSequence.append(num_item(SLICE_SIMILARITY, pair.similarity, UNIT_NONE))
    return item


def _matched_lesion_item(lesion: Lesion) -> hd.sr.ContainerContentItem:
    item = container_item(MATCHED_LESION)
    item.ContentSequence.append(text_item(TRACKING_IDENTIFIER, lesion_label(lesion), HAS_OBS_CONTEXT))
    for measurement in lesion_measurements(lesion, algorithm_id=None, source_images=None):
        item.ContentSequence.extend(measurement)
    if lesion.space:
        item.ContentSequence.append(text_item(DEEP_NECK_SPACE, lesion.space))
    return item


def _similar_case_item(case: SimilarCase, query_images: Sequence[pydicom.Dataset]) -> hd.sr.ContainerContentItem:
    item = container_item(SIMILAR_CASE)
    content = item.ContentSequence
    content.extend(
        [
            num_item(RANK, case.rank, UNIT_NONE),
            num_item(SIMILARITY_SCORE, case.score, UNIT_NONE),
            text_item(RETRIEVAL_MODE, case.mode),
            hd.sr.UIDRefContentItem(name=STUDY_INSTANCE_UID, value=case.study_uid, relationship_type=CONTAINS),
        ]
    )
    study_date = _parse_date(case.study.study_date)
    if study_date is not None:
        content.append(hd.sr.DateContentItem(name=STUDY_DATE, value=study_date, relationship_type=CONTAINS))
    for name, value, limit in (
        (PROCEDURE_DESCRIPTION, case.study.study_description, 64),
        (ACCESSION_NUMBER, case.study.accession_number, 16),
        (SUBJECT_ID, case.study.patient_id, 64),
    ):
        if value:
            content.append(text_item(name, value[:limit]))
    if case.study.series_uid:
        content.append(
            hd.sr.UIDRefContentItem(name=SERIES_INSTANCE_UID, value=case.study.series_uid, relationship_type=CONTAINS)
        )
    content.extend(_slice_pair_item(pair, case, query_images) for pair in case.best_slices)
    content.extend(_matched_lesion_item(lesion) for lesion in case.lesions)
    return item


def _matched_image_evidence(case: SimilarCase) -> list[pydicom.Dataset]:
    """Minimal evidence items (UIDs only) for the matched images an IMAGE item references."""
    if not case.study.series_uid:
        return []
    evidence = []
    for pair in case.best_slices:
        if pair.matched_sop_instance_uid:
            reference = pydicom.Dataset()
            reference.StudyInstanceUID = case.study_uid
            reference.SeriesInstanceUID = case.study.series_uid
            reference.SOPInstanceUID = pair.matched_sop_instance_uid
            reference.SOPClassUID = case.sop_class_uid
            evidence.append(reference)
    return evidence


def build_similar_cases_report(
    query_images: Sequence[pydicom.Dataset],
    cases: Sequence[SimilarCase],
    query: ReportedQuery,
    algorithm: AlgorithmInfo,
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

    A matched slice with a SOP Instance UID becomes an IMAGE reference when the case's study
    also gives its series (it is then listed in the Pertinent Other Evidence Sequence);
    otherwise a UIDREF. A matched slice without UID is written as its index (NUM).

    Patient IDs and accession numbers of other patients are written as the cases give them:
    pseudonymise the cases before calling when the report may reach users who must not see them.

    Args:
        query_images: The query series (patient, study and evidence come from it), in the
            order query slice indices refer to.
        cases: The ranked answers.
        query: The query as written into the report.
        algorithm: The network whose embeddings were searched.
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
            message names the argument and the value.
    """
    document = Document.validated(
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
    if not isinstance(algorithm, AlgorithmInfo):
        raise SrInputError(f"algorithm must be a models.weights.AlgorithmInfo, not {type(algorithm).__name__}")
    if not isinstance(query, ReportedQuery):
        raise SrInputError(f"query must be a ReportedQuery, not {type(query).__name__}")
    if not isinstance(cases, Sequence) or not all(isinstance(case, SimilarCase) for case in cases):
        raise SrInputError("cases must be a sequence of SimilarCase")
    cases = sorted(cases, key=lambda case: case.rank)
    ranks = [case.rank for case in cases]
    if len(set(ranks)) != len(ranks):
        raise SrInputError(f"result ranks must be unique, got {ranks}")
    for position, case in enumerate(cases):
        for pair in case.best_slices:
            if pair.query_slice >= len(query_images):
                raise SrInputError(
                    f"cases[{position}]: query slice {pair.query_slice} is outside the {len(query_images)} query images")

    root = container_item(SIMILAR_CASES, relationship=None)
    root.ContentSequence.extend(hd.sr.LanguageOfContentItemAndDescendants(hd.sr.templates.DEFAULT_LANGUAGE))
    root.ContentSequence.extend(document.device_observer())
    query_item = container_item(QUERY_PARAMETERS)
    query_item.ContentSequence.extend(
        [
            text_item(RETRIEVAL_MODE, query.mode),
            num_item(RESULTS_REQUESTED, query.k, UNIT_NONE),
            hd.sr.UIDRefContentItem(
                name=SERIES_INSTANCE_UID, value=query_images[0].SeriesInstanceUID, relationship_type=CONTAINS
            ),
        ]
    )
    if query.filters is not None:
        query_item.ContentSequence.append(text_item(QUERY_FILTERS, query.filters))
    if query.requested_by is not None:
        query_item.ContentSequence.append(text_item(REQUESTED_BY, query.requested_by))
    query_item.ContentSequence.extend(algorithm_identification(algorithm))
    comment = algorithm_comment(algorithm)
    if comment:
        query_item.ContentSequence.append(text_item(COMMENT, comment))
    root.ContentSequence.append(query_item)
    root.ContentSequence.append(num_item(CASES_FOUND, len(cases), UNIT_NONE))
    if not cases:
        root.ContentSequence.append(text_item(COMMENT, NO_SIMILAR_CASE_TEXT))
    root.ContentSequence.extend(_similar_case_item(case, query_images) for case in cases)

    matched_images = [image for case in cases for image in _matched_image_evidence(case)]
    return document.build(root, matched_images, series_description)

"""The measurement and similar-cases SRs: content read back with pydicom/highdicom, dciodvfy
clean, unchanged through a BytesIO round trip (dcmtk's dsrdump reads them in tests/e2e)."""

from __future__ import annotations

import copy
import io
import math
import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes as dicom_codes
from pydicom.uid import ComprehensiveSRStorage, CTImageStorage, generate_uid

from dicom_node.reports import codes
from dicom_node.reports.document import DEMO_NOTICE, SrInputError
from dicom_node.reports.measurement import NO_LESION_TEXT, build_measurement_report
from dicom_node.reports.similar_cases import NO_SIMILAR_CASE_TEXT, ReportedQuery, build_similar_cases_report
from dicom_node.similar.query import SimilarCase, SlicePair
from index.lesions import Lesion
from index.records import StudyRecord
from models.weights import AlgorithmInfo
from tooling import dciodvfy
from tooling.synthetic_ct import PIXEL_SPACING_MM, SLICE_SPACING_MM, make_abscess_mask, make_abscess_seg, make_ct_series

DEMO_ALGORITHM = AlgorithmInfo(
    name="VM-UNet", version="0.1.0", demo=True,
    description="demo weights, trained on synthetic lesions in real CT, not for clinical use")
CLINICAL_ALGORITHM = AlgorithmInfo(name="VM-UNet", version="0.1.0", demo=False,
                                   description="trained on 412 annotated neck CTs")

LESION_1 = Lesion(
    label=1,
    voxel_count=360,
    volume_ml=0.288,  # 3 slices x 10 x 12 px x 0.8 x 0.8 x 2.5 mm
    longest_axial_diameter_mm=12.5,
    core_mean_hu=18.5,
    core_sd_hu=9.25,
    loculi=2,
    first_slice=2,
    last_slice=4,
    space="parapharyngeal",
    side="right",
)
LESION_2 = Lesion(
    label=2,
    voxel_count=31,
    volume_ml=0.05,
    longest_axial_diameter_mm=4.0,
    core_mean_hu=None,  # core too small to measure
    core_sd_hu=None,
    loculi=1,
    first_slice=3,
    last_slice=3,
    space="submandibular",
)

pytestmark = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="needs dicom3tools (dciodvfy): make install")


@pytest.fixture(scope="module")
def ct_series() -> list[pydicom.Dataset]:
    return make_ct_series()


@pytest.fixture(scope="module")
def segmentation(ct_series: list[pydicom.Dataset]) -> hd.seg.Segmentation:
    return make_abscess_seg(ct_series, make_abscess_mask())


def build_measurements(ct_series, segmentation, lesions=(LESION_1, LESION_2), algorithm=DEMO_ALGORITHM, **kwargs):
    arguments = {
        "series_number": 91,
        "instance_number": 1,
        "manufacturer": "abscess-node",
        "device_name": "ABSCESS_NODE",
        **kwargs,
    }
    return build_measurement_report(
        source_images=ct_series, segmentation=segmentation, lesions=list(lesions), algorithm=algorithm, **arguments
    )


def similar_results(ct_series: list[pydicom.Dataset]) -> list[SimilarCase]:
    """Three results: matched instances fully known, known by UID only, known by index only."""
    return [
        SimilarCase(
            rank=2,  # given out of order on purpose: the report lists them by rank
            score=0.81,
            mode="study-rerank",
            study=StudyRecord(generate_uid(), study_date="20230105", study_description="CT NECK", patient_id="PSEUDO-2"),
            best_slices=(SlicePair(4, 17, generate_uid(), 0.88),),
        ),
        SimilarCase(
            rank=1,
            score=0.93,
            mode="study-rerank",
            study=StudyRecord(generate_uid(), series_uid=generate_uid(), study_date="20220811",
                              study_description="CT HALS MIT KM", accession_number="A1001", patient_id="PSEUDO-1"),
            best_slices=(SlicePair(2, 40, generate_uid(), 0.97), SlicePair(3, 41, generate_uid(), 0.95)),
            lesions=(Lesion(**{**LESION_1.as_dict(), "first_slice": 40, "last_slice": 47, "space": "retropharyngeal"}),),
        ),
        SimilarCase(
            rank=3,
            score=0.77,
            mode="slice",
            study=StudyRecord(generate_uid(), accession_number="A1003", patient_id="PSEUDO-3"),
            best_slices=(SlicePair(1, 42, "", 0.8),),
            lesions=(LESION_2,),
        ),
    ]


QUERY = ReportedQuery(mode="study-rerank", k=3, filters="modality=CT; age>=18", requested_by="VIEWER1")


def build_similar(ct_series, results, query=QUERY, **kwargs):
    return build_similar_cases_report(
        query_images=ct_series,
        cases=results,
        query=query,
        algorithm=DEMO_ALGORITHM,
        series_number=92,
        instance_number=1,
        manufacturer="abscess-node",
        device_name="ABSCESS_NODE",
        **kwargs,
    )


def write_checked(document: pydicom.Dataset, path: Path, expected_warnings: tuple[str, ...] = ()) -> None:
    """Write and require dciodvfy to be clean (but for the expected warnings)."""
    document.save_as(path, enforce_file_format=True)
    result = dciodvfy.assert_valid(path, allow_warnings=bool(expected_warnings))
    assert result.warnings == list(expected_warnings)
    assert result.iod == "ComprehensiveSR"


def content_tree(item: pydicom.Dataset) -> list[pydicom.Dataset]:
    """Every content item below ``item``, depth first."""
    found = []
    for child in item.get("ContentSequence", []):
        found.append(child)
        found.extend(content_tree(child))
    return found


def all_text(item: pydicom.Dataset) -> list[str]:
    """Every TextValue in the content tree below ``item``."""
    return [str(child.TextValue) for child in content_tree(item) if "TextValue" in child]


def content_items(item: pydicom.Dataset, meaning: str) -> list[pydicom.Dataset]:
    """Direct children of ``item`` whose concept name has this meaning."""
    return [
        child for child in item.get("ContentSequence", []) if child.ConceptNameCodeSequence[0].CodeMeaning == meaning
    ]


def only(item: pydicom.Dataset, meaning: str) -> pydicom.Dataset:
    matches = content_items(item, meaning)
    assert len(matches) == 1, f"{len(matches)} items named {meaning!r}"
    return matches[0]


def num(item: pydicom.Dataset, meaning: str) -> float:
    return float(only(item, meaning).MeasuredValueSequence[0].NumericValue)


def check_common_header(document: pydicom.Dataset, ct_series: list[pydicom.Dataset]) -> None:
    source = ct_series[0]
    assert document.SOPClassUID == ComprehensiveSRStorage
    assert document.Modality == "SR"
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "StudyID",
    ):
        assert document[keyword].value == source[keyword].value, keyword
    assert document.SeriesInstanceUID != source.SeriesInstanceUID
    assert document.CompletionFlag == "COMPLETE"
    assert document.VerificationFlag == "UNVERIFIED"
    assert document.Manufacturer == "abscess-node"
    assert document.ContentDate and document.ContentTime
    schemes = {item.CodingSchemeDesignator for item in document.CodingSchemeIdentificationSequence}
    assert codes.PRIVATE_CODING_SCHEME in schemes
    current = document.CurrentRequestedProcedureEvidenceSequence
    assert current[0].StudyInstanceUID == source.StudyInstanceUID
    referenced = {
        instance.ReferencedSOPInstanceUID
        for study in current
        for series in study.ReferencedSeriesSequence
        for instance in series.ReferencedSOPSequence
    }
    assert {image.SOPInstanceUID for image in ct_series} <= referenced


def test_fixture_series_and_seg_are_valid(ct_series, segmentation, tmp_path):
    ct_path = tmp_path / "ct.dcm"
    ct_series[0].save_as(ct_path, enforce_file_format=True)
    assert dciodvfy.assert_valid(ct_path).iod == "CTImage"
    assert dciodvfy.assert_valid(segmentation).iod == "Segmentation"


def test_measurement_report_content(ct_series, segmentation, tmp_path):
    removed = {"neck_soft_tissue": 4, "min_volume": 2, "core_attenuation": 5, "rim_enhancement": 0}
    document = build_measurements(ct_series, segmentation, candidates_removed=removed)
    write_checked(document, tmp_path / "measurements.dcm")
    assert document.ConceptNameCodeSequence[0].CodeMeaning == "Imaging Measurement Report"

    check_common_header(document, ct_series)
    assert document.SeriesDescription == "Abscess measurements (VM-UNet, DEMO)"
    assert segmentation.SOPInstanceUID in {
        instance.ReferencedSOPInstanceUID
        for study in document.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for instance in series.ReferencedSOPSequence
    }

    read_back = hd.sr.srread(tmp_path / "measurements.dcm")
    assert isinstance(read_back.content, hd.sr.MeasurementReport)
    observer = read_back.content.get_observer_contexts()[0]
    assert observer.observer_type == dicom_codes.DCM.Device
    groups = {group.tracking_identifier: group for group in read_back.content.get_volumetric_roi_measurement_groups()}
    assert set(groups) == {"Abscess 1", "Abscess 2"}

    first = groups["Abscess 1"]
    assert first.finding_type == codes.ABSCESS
    # parapharyngeal space has no DICOM-listed code: the declared private one, with the side as laterality
    assert first.finding_sites[0].value == codes.PARAPHARYNGEAL_SPACE
    assert first.finding_sites[0].laterality == codes.LATERALITY["right"]
    assert first.referenced_segment is not None
    segment_item = content_items(first[0], "Referenced Segment")[0].ReferencedSOPSequence[0]
    assert segment_item.ReferencedSOPInstanceUID == segmentation.SOPInstanceUID
    assert segment_item.ReferencedSegmentNumber == 1
    assert [
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for item in content_items(first[0], "Source Image for Segmentation")
    ] == [image.SOPInstanceUID for image in ct_series[2:5]]

    def value(group, name, derivation=None):
        matches = [m for m in group.get_measurements(name=name) if m.derivation == derivation]
        assert len(matches) == 1
        return matches[0]

    assert value(first, codes.VOLUME).value == pytest.approx(0.288)
    assert value(first, codes.VOLUME).unit == codes.UNIT_ML
    assert value(first, codes.LONG_AXIS, codes.MAXIMUM).value == pytest.approx(12.5)
    mean = value(first, codes.ATTENUATION_COEFFICIENT, codes.MEAN)
    assert mean.value == pytest.approx(18.5) and mean.unit == codes.UNIT_HU
    assert value(first, codes.ATTENUATION_COEFFICIENT, codes.STANDARD_DEVIATION).value == pytest.approx(9.25)
    assert value(first, codes.NUMBER_OF_LOCULI).value == 2
    written = pydicom.dcmread(tmp_path / "measurements.dcm")
    loculi = [item.MeasuredValueSequence[0].NumericValue for item in content_tree(written)
              if item.ConceptNameCodeSequence[0].CodeMeaning == "Number of loculi"]
    assert loculi == ["2", "1"]  # counts are written without ".0"
    first_slice = value(first, codes.FIRST_SLICE_INDEX)
    assert first_slice.value == 2
    assert first_slice.referenced_images[0].referenced_sop_instance_uid == ct_series[2].SOPInstanceUID
    assert value(first, codes.LAST_SLICE_INDEX).referenced_images[0].referenced_sop_instance_uid == (
        ct_series[4].SOPInstanceUID
    )
    for measurement in first.get_measurements():
        assert only(measurement[0], "Algorithm Name").TextValue == "VM-UNet"
        assert only(measurement[0], "Algorithm Version").TextValue == "0.1.0"
    assert only(first[0], "Deep neck space").TextValue == "right parapharyngeal"
    comment = only(first[0], "Comment").TextValue
    assert comment.startswith(DEMO_NOTICE) and DEMO_ALGORITHM.description in comment

    second = groups["Abscess 2"]
    assert second.finding_sites[0].value == codes.DEEP_NECK_SPACE_SITES["submandibular"]
    assert second.get_measurements(name=codes.ATTENUATION_COEFFICIENT) == []  # core not measurable
    assert value(second, codes.VOLUME).value == pytest.approx(0.05)

    rule_meanings = {code.meaning: rule for rule, code in codes.RULE_CODES.items()}
    counts = {rule_meanings[item.ConceptNameCodeSequence[0].CodeMeaning]: int(item.MeasuredValueSequence[0].NumericValue)
              for item in content_tree(written) if item.ConceptNameCodeSequence[0].CodeMeaning in rule_meanings}
    assert counts == removed


def test_measurement_report_from_index_lesions(ct_series, segmentation, tmp_path):
    """The descriptors index.lesions measures on the SEG's mask go into the SR as they are."""
    from index.lesions import measure_lesions

    volume_hu = np.stack([image.pixel_array * image.RescaleSlope + image.RescaleIntercept for image in ct_series])
    spacing = (SLICE_SPACING_MM, *PIXEL_SPACING_MM)
    lesions = measure_lesions(make_abscess_mask(), volume_hu, spacing, space="peritonsillar")
    assert len(lesions) == 1
    document = build_measurements(ct_series, segmentation, lesions=lesions)
    write_checked(document, tmp_path / "measured.dcm")
    (group,) = hd.sr.ComprehensiveSR.from_dataset(document).content.get_volumetric_roi_measurement_groups()
    assert group.tracking_identifier == "Abscess 1"
    (volume,) = group.get_measurements(name=codes.VOLUME)
    assert volume.value == pytest.approx(3 * 10 * 12 * 0.8 * 0.8 * 2.5 / 1000)
    assert [m.value for m in group.get_measurements(name=codes.FIRST_SLICE_INDEX)] == [2]
    assert [m.value for m in group.get_measurements(name=codes.LAST_SLICE_INDEX)] == [4]


def test_source_without_optional_type2_attributes(ct_series, segmentation, tmp_path):
    """A CT without AccessionNumber/StudyID/... still gets a valid SR, with them empty."""
    stripped = [copy.deepcopy(image) for image in ct_series]
    for keyword in ("AccessionNumber", "StudyID", "ReferringPhysicianName", "PatientBirthDate"):
        del stripped[0][keyword]
    document = build_measurements(stripped, segmentation)
    # Empty is what the source says and legal for these type 2 attributes; dciodvfy only notes
    # that a DICOMDIR could not be built without a Study ID.
    write_checked(
        document,
        tmp_path / "stripped.dcm",
        expected_warnings=("Warning - Missing attribute or value that would be needed to build DICOMDIR - Study ID",),
    )
    assert document.AccessionNumber == "" and document.StudyID == ""
    assert "AccessionNumber" not in stripped[0]  # the caller's datasets are left alone


def test_measurement_report_without_demo_weights_has_no_demo_wording(ct_series, segmentation, tmp_path):
    document = build_measurements(ct_series, segmentation, algorithm=CLINICAL_ALGORITHM)
    write_checked(document, tmp_path / "clinical.dcm")
    assert not any("DEMO" in text for text in all_text(document)) and "DEMO" not in document.SeriesDescription
    group = document.ContentSequence[-1].ContentSequence[0]
    assert only(group, "Comment").TextValue == CLINICAL_ALGORITHM.description


@pytest.mark.parametrize("with_seg", [True, False], ids=["with-seg", "without-seg"])
def test_zero_lesion_report_says_no_abscess(ct_series, segmentation, tmp_path, with_seg):
    document = build_measurements(ct_series, segmentation if with_seg else None, lesions=())
    write_checked(document, tmp_path / "none.dcm")
    check_common_header(document, ct_series)

    read_back = hd.sr.srread(tmp_path / "none.dcm")
    assert read_back.content.get_volumetric_roi_measurement_groups() == []
    (group,) = read_back.content.get_image_measurement_groups()
    evaluations = [e for e in group.get_qualitative_evaluations(name=codes.ABSCESS)]
    assert [e.value for e in evaluations] == [codes.ABSENT]
    comments = [item.TextValue for item in content_items(group[0], "Comment")]
    assert NO_LESION_TEXT in comments
    assert any(text.startswith(DEMO_NOTICE) for text in comments)


def test_similar_cases_report_with_three_results(ct_series, tmp_path):
    results = similar_results(ct_series)
    document = build_similar(ct_series, results)
    write_checked(document, tmp_path / "similar.dcm")

    check_common_header(document, ct_series)
    assert document.SeriesDescription == "Similar cases (abscess-node)"
    title = document.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator) == ("SIMCASES", "99ABSCESS")

    query = only(document, "Similar-case query")
    assert only(query, "Retrieval mode").TextValue == "study-rerank"
    assert num(query, "Number of results requested") == 3
    assert only(query, "Query filters").TextValue == QUERY.filters
    assert only(query, "Requesting AE title").TextValue == "VIEWER1"
    assert only(query, "Algorithm Name").TextValue == "VM-UNet"
    assert only(query, "Comment").TextValue.startswith(DEMO_NOTICE)
    assert num(document, "Number of similar cases found") == 3

    cases = content_items(document, "Similar case")
    assert [num(case, "Rank") for case in cases] == [1, 2, 3]
    by_rank = {result.rank: result for result in results}
    assert only(cases[0], "Similarity score").MeasuredValueSequence[0].NumericValue == "0.93"
    for case in cases:
        expected = by_rank[int(num(case, "Rank"))]
        assert num(case, "Similarity score") == pytest.approx(expected.score)
        assert only(case, "Retrieval mode").TextValue == expected.mode
        assert only(case, "Study Instance UID").UID == expected.study_uid
        pairs = content_items(case, "Best-matching slice pair")
        assert len(pairs) == len(expected.best_slices)
        for pair, expected_pair in zip(pairs, expected.best_slices):
            query_image = only(pair, "Query image").ReferencedSOPSequence[0]
            assert query_image.ReferencedSOPInstanceUID == ct_series[expected_pair.query_slice].SOPInstanceUID
            assert num(pair, "Query slice index (0-based)") == expected_pair.query_slice
            assert num(pair, "Slice similarity") == pytest.approx(expected_pair.similarity)
        assert len(content_items(case, "Matched lesion")) == len(expected.lesions)

    first, second, third = cases
    assert str(only(first, "Study Date").Date) == "20220811"
    assert only(first, "Procedure Description").TextValue == "CT HALS MIT KM"
    assert only(first, "Accession Number").TextValue == "A1001"
    assert only(first, "Subject ID").TextValue == "PSEUDO-1"
    matched = only(content_items(first, "Best-matching slice pair")[0], "Matched image").ReferencedSOPSequence[0]
    assert matched.ReferencedSOPClassUID == CTImageStorage
    assert matched.ReferencedSOPInstanceUID == by_rank[1].best_slices[0].matched_sop_instance_uid
    lesion = only(first, "Matched lesion")
    assert only(lesion, "Tracking Identifier").TextValue == "Abscess 1"
    assert num(lesion, "Volume") == pytest.approx(0.288)
    assert num(lesion, "Number of loculi") == 2
    assert num(lesion, "First slice index (0-based, series order)") == 40
    assert only(lesion, "Deep neck space").TextValue == "retropharyngeal"
    # The matched instances of rank 1 are evidence from another study.
    other = document.PertinentOtherEvidenceSequence
    assert [study.StudyInstanceUID for study in other] == [by_rank[1].study_uid]
    assert {i.ReferencedSOPInstanceUID for i in other[0].ReferencedSeriesSequence[0].ReferencedSOPSequence} == {
        pair.matched_sop_instance_uid for pair in by_rank[1].best_slices
    }

    assert content_items(second, "Accession Number") == []  # empty is left out, not written empty
    assert (
        only(content_items(second, "Best-matching slice pair")[0], "Matched SOP Instance UID").UID
        == by_rank[2].best_slices[0].matched_sop_instance_uid
    )
    assert content_items(third, "Study Date") == []
    assert num(content_items(third, "Best-matching slice pair")[0], "Matched slice index (0-based)") == 42


def test_similar_cases_report_with_no_result(ct_series, tmp_path):
    document = build_similar(ct_series, [])
    write_checked(document, tmp_path / "similar-none.dcm")
    assert document.ConceptNameCodeSequence[0].CodeMeaning == "Similar cases"
    assert num(document, "Number of similar cases found") == 0
    assert only(document, "Comment").TextValue == NO_SIMILAR_CASE_TEXT
    query = only(document, "Similar-case query")
    assert only(query, "Query filters").TextValue == QUERY.filters
    assert only(query, "Series Instance UID").UID == ct_series[0].SeriesInstanceUID
    assert content_items(document, "Similar case") == []
    assert "PertinentOtherEvidenceSequence" not in document


def encode(document: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    document.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_round_trip_through_bytesio(ct_series, segmentation):
    for document in (
        build_measurements(ct_series, segmentation),
        build_measurements(ct_series, None, lesions=()),
        build_similar(ct_series, similar_results(ct_series)),
        build_similar(ct_series, []),
    ):
        encoded = encode(document)
        read_back = hd.sr.srread(io.BytesIO(encoded))
        assert isinstance(read_back, hd.sr.ComprehensiveSR)
        assert read_back.SOPInstanceUID == document.SOPInstanceUID
        assert read_back.ConceptNameCodeSequence[0].CodeMeaning == document.ConceptNameCodeSequence[0].CodeMeaning
        assert encode(read_back) == encoded  # nothing lost or changed on the way


def test_stable_uids_for_a_reprocessed_study(ct_series, segmentation):
    """Same SOP Instance UID in -> same tracking UIDs and device UID out (reports replace, not add)."""
    sop_uid = generate_uid()
    first = build_measurements(ct_series, segmentation, sop_instance_uid=sop_uid)
    second = build_measurements(ct_series, segmentation, sop_instance_uid=sop_uid)
    first, second = (hd.sr.ComprehensiveSR.from_dataset(document) for document in (first, second))
    assert [group.tracking_uid for group in first.content.get_volumetric_roi_measurement_groups()] == [
        group.tracking_uid for group in second.content.get_volumetric_roi_measurement_groups()
    ]
    device_uid = only(first, "Device Observer UID").UID
    assert device_uid == only(second, "Device Observer UID").UID


def bad(**changes):
    return {**LESION_1.as_dict(), **changes}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"label": 0}, r"Lesion.label must be a whole number >= 1, got 0"),
        ({"first_slice": 4, "last_slice": 2}, "first_slice 4 is after last_slice 2"),
        ({"core_mean_hu": math.nan}, r"Lesion.core_mean_hu must be a finite number"),
        ({"volume_ml": -1.0}, r"Lesion.volume_ml must be >= 0"),
        ({"loculi": 1.5}, r"Lesion.loculi must be a whole number"),
        ({"space": ""}, r"Lesion.space must be a non-empty string or None"),
    ],
)
def test_lesion_rejects_impossible_values(changes, message):
    with pytest.raises(ValueError, match=message):
        Lesion(**bad(**changes))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lesions": [Lesion(**bad(last_slice=6))]}, r"last_slice 6 is outside the 6 source images"),
        ({"lesions": [LESION_1, LESION_1]}, "labels must be unique"),
        ({"lesions": [LESION_1.as_dict()]}, r"lesions must be a sequence of index.lesions.Lesion"),
        ({"segmentation": None}, "segmentation is required when there are lesions"),
        ({"algorithm": {"name": "VM-UNet", "version": "1"}}, r"algorithm must be a models.weights.AlgorithmInfo"),
        ({"segment_number": 2}, r"has no segment 2 \(its segments: \[1\]\)"),
        ({"series_number": 0}, "series_number must be a positive integer"),
    ],
)
def test_measurement_report_rejects_bad_input(ct_series, segmentation, kwargs, message):
    arguments = {"lesions": [LESION_1], "segmentation": segmentation, **kwargs}
    lesions = arguments.pop("lesions")
    seg = arguments.pop("segmentation")
    with pytest.raises(SrInputError, match=message):
        build_measurements(ct_series, seg, lesions=lesions, **arguments)


def test_algorithm_info_rejects_missing_values():
    with pytest.raises(ValueError, match="AlgorithmInfo.version must be a non-empty string"):
        AlgorithmInfo(name="VM-UNet", version="", demo=True)
    with pytest.raises(ValueError, match="AlgorithmInfo.demo must be true or false"):
        AlgorithmInfo(name="VM-UNet", version="1", demo="yes")


def test_measurement_report_rejects_images_of_two_series(ct_series, segmentation):
    other = make_ct_series(n_slices=1, study_uid=ct_series[0].StudyInstanceUID)
    with pytest.raises(SrInputError, match=r"source_images\[6\] belongs to series"):
        build_measurements([*ct_series, *other], segmentation)


def test_similar_cases_report_rejects_bad_results(ct_series):
    import dataclasses

    results = similar_results(ct_series)
    with pytest.raises(SrInputError, match=r"result ranks must be unique, got \[1, 1, 3\]"):
        build_similar(ct_series, [dataclasses.replace(results[0], rank=1), *results[1:]])
    out_of_range = dataclasses.replace(results[0], best_slices=(SlicePair(6, 0, generate_uid(), 0.5),))
    with pytest.raises(SrInputError, match=r"query slice 6 is outside the 6 query images"):
        build_similar(ct_series, [out_of_range])
    with pytest.raises(SrInputError, match=r"cases must be a sequence of SimilarCase"):
        build_similar(ct_series, [{"rank": 1}])


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: SlicePair(0, 1, "not-a-uid", 0.5), r"matched_sop_instance_uid is not a UID"),
        (lambda: SlicePair(-1, 1, "", 0.5), r"SlicePair.query_slice must be a non-negative integer"),
        (lambda: SimilarCase(1, float("inf"), "study", StudyRecord(generate_uid())), r"SimilarCase.score must be a finite"),
        (lambda: SimilarCase(0, 0.5, "study", StudyRecord(generate_uid())), r"SimilarCase.rank must be a positive integer"),
        (lambda: SimilarCase(1, 0.5, "study", StudyRecord("not a uid")), r"valid StudyInstanceUID"),
    ],
)
def test_similar_case_rejects_impossible_values(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_malformed_study_date_of_a_similar_case_is_left_out(ct_series):
    case = SimilarCase(1, 0.5, "study", StudyRecord(generate_uid(), study_date="2023-01-05"))
    document = build_similar(ct_series, [case])
    assert content_items(only(document, "Similar case"), "Study Date") == []


def test_similar_cases_report_rejects_bad_query(ct_series):
    with pytest.raises(SrInputError, match=r"query k must be a positive integer, got 0"):
        ReportedQuery(mode="study", k=0)
    with pytest.raises(SrInputError, match=r"query mode must be a non-empty string"):
        ReportedQuery(mode="", k=3)
    with pytest.raises(SrInputError, match=r"query must be a ReportedQuery"):
        build_similar(ct_series, [], query={"mode": "study", "k": 3})


def test_dciodvfy_reports_errors_and_undeclared_private_codes(ct_series, tmp_path):
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"not DICOM at all")
    result = dciodvfy.validate(garbage)
    assert result.errors and not result.ok

    document = build_similar(ct_series, [])
    tolerated = dciodvfy.assert_valid(document).tolerated_warnings
    assert tolerated and all("<99ABSCESS>" in line for line in tolerated)
    del document.CodingSchemeIdentificationSequence  # private codes now undeclared: warnings count
    with pytest.raises(dciodvfy.DicomValidationError, match="Unrecognized defined term <99ABSCESS>"):
        dciodvfy.assert_valid(document)
    assert dciodvfy.assert_valid(document, allow_warnings=True).warnings

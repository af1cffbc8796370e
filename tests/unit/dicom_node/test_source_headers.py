"""Malformed source headers: the SEG and both SRs we build from them still pass dciodvfy.

Every case is a real CT series written by the project's converter with one common defect of
real archives injected into its Patient/Study (or copied equipment) attributes, written to disk
with the defective bytes as they are and read back the way the pipeline reads a series. The
SEG, the measurement SR and the similar-cases SR are built from the repaired headers and checked
with dciodvfy; the findings must name what was repaired or dropped, never a patient value.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from dicom_node.reports.measurement import build_measurement_report
from dicom_node.reports.similar_cases import ReportedQuery, build_similar_cases_report
from dicom_node.seg import build_segmentation
from dicom_node.series import read_geometry
from dicom_node.source_headers import UTF8, repair_source_headers
from index.lesions import measure_lesions
from models.weights import AlgorithmInfo
from tooling.convert import StudyInfo, volume_to_ct_series, write_series
from tooling.dciodvfy import validate

pytestmark = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="needs dicom3tools (dciodvfy): make install")

ALGORITHM = AlgorithmInfo(name="vmunet-test", version="1", demo=True, description="test weights")
PATIENT = StudyInfo(patient_name="Lindqvist^Astrid", patient_id="PID-7741", accession_number="ACC-5521",
                    patient_birth_date="19610304", patient_sex="F")
PATIENT_VALUES = ("Lindqvist", "Astrid", "PID-7741", "ACC-5521", "19610304", "1961")
"""Identifying values of the test patient: none may appear in a finding."""
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
STUDY_ID_WARNING = "Warning - Missing attribute or value that would be needed to build DICOMDIR - Study ID"
ABSENT = object()


def raw(dataset: Dataset, keyword_or_tag: str | int, vr: str, value: bytes) -> None:
    """Put ``value`` into ``dataset`` byte for byte, as a source file would carry it (no validation)."""
    tag = Tag(keyword_or_tag)
    dataset[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)


def item(**attributes: Any) -> Dataset:
    """A sequence item with these attributes."""
    dataset = Dataset()
    for keyword, value in attributes.items():
        setattr(dataset, keyword, value)
    return dataset


def code(value: str = "T-D1600", scheme: str = "SRT", meaning: str = "Neck") -> Dataset:
    """A code sequence item."""
    return item(CodeValue=value, CodingSchemeDesignator=scheme, CodeMeaning=meaning)


def every(inject: Callable[[Dataset], None]) -> Callable[[list[Dataset]], None]:
    """Inject into every instance of the series (patient/study attributes repeat in each)."""
    def inject_all(datasets: list[Dataset]) -> None:
        for dataset in datasets:
            inject(dataset)

    return inject_all


@dataclasses.dataclass(frozen=True)
class Defect:
    """One defect of real archives, what the findings must say, and what the SEG/SRs must hold."""

    name: str
    inject: Callable[[list[Dataset]], None]
    findings: tuple[str, ...]
    expected: dict[str, Any] = dataclasses.field(default_factory=dict)  # keyword -> value, ABSENT or a predicate
    warnings: tuple[str, ...] = ()


def incomplete_references(ds: Dataset) -> None:
    ds.ReferencedStudySequence = [
        item(ReferencedSOPInstanceUID="1.2.826.0.1.3680043.10.1.7"),  # no ReferencedSOPClassUID
        item(ReferencedSOPClassUID="1.2.840.10008.3.1.2.3.1", ReferencedSOPInstanceUID="1.2.826.0.1.3680043.10.1.8")]
    ds.ReferencedPatientSequence = [item(ReferencedSOPClassUID="1.2.840.10008.3.1.2.1.1")]  # no instance UID


def empty_codes(ds: Dataset) -> None:
    ds.ProcedureCodeSequence = [code(value="", meaning=""), code(meaning=""), item(CodeValue="CTNECK", CodeMeaning="CT neck"),
                                code(value="10000000000000000042", scheme="SCT", meaning="CT of neck with contrast"),
                                code(value="CTNECK", scheme="SCT", meaning="CT neck")]
    ds.OtherPatientIDsSequence = [item(PatientID="", TypeOfPatientID="TEXT")]


def acr_nema_dates(ds: Dataset) -> None:
    raw(ds, "StudyDate", "DA", b"2020.01.15")
    raw(ds, "PatientBirthDate", "DA", b"1961-03-04")
    raw(ds, "StudyTime", "TM", b"12:30:45")
    raw(ds, "AcquisitionDateTime", "DT", b"2020-01-15T12:31:02.25")
    raw(ds, "PatientBirthTime", "TM", b"083000.1234567 ")


def invalid_vr_values(ds: Dataset) -> None:
    raw(ds, "PatientAge", "AS", b"45")
    raw(ds, "PatientSize", "DS", b"1,75")
    raw(ds, "PatientWeight", "DS", b"72.500000000000001 ")
    raw(ds, "PatientSex", "CS", b"f ")
    raw(ds, "StudyDescription", "LO", b"CT NECK WITH CONTRAST, SUSPECTED DEEP NECK ABSCESS, LEFT PARAPHARYNGEAL SPACE ")
    raw(ds, "AccessionNumber", "SH", b"ACC-5521-2020-0001-X")  # 20 characters: an identifier is never cut
    raw(ds, "PatientName", "PN", b"Lindqvist^Astrid^^^^^^\x00\x00")
    raw(ds, "ReferringPhysicianName", "PN", b"Berg^Nils^^^^^MD^extra")
    raw(ds, "AdditionalPatientHistory", "LT", b"swelling\x07 left neck")
    raw(ds, "Occupation", "SH", b"Teacher\r\n")
    photo_reference = item(ReferencedSOPClassUID="1.2.840.10008.5.1.4.1.1.7",
                           ReferencedSOPInstanceUID="1.2.826.0.1.3680043.10.1.9", HL7InstanceIdentifier="photo-1")
    raw(photo_reference, "ReferencedFrameNumber", "IS", b"1.0 ")
    ds.ReferencedPatientPhotoSequence = [item(
        ReferencedSOPSequence=[photo_reference], StudyInstanceUID="1.2.826.0.1.3680043.10.1.10",
        SeriesInstanceUID="1.2.826.0.1.3680043.10.1.11", TypeOfInstances="DICOM",
        DICOMRetrievalSequence=[item(RetrieveAETitle="PACS")])]


def retired_forms(ds: Dataset) -> None:
    ds.add_new(0x00101000, "LO", "OLD-ID-1")  # Other Patient IDs, retired
    ds.add_new(0x00324000, "LT", "read by night shift")  # Study Comments, retired
    ds.add_new(0x0032000A, "CS", "READ")  # Study Status ID, retired
    ds.add_new(0x00321030, "LO", "neck swelling")  # Reason for Study, retired
    reference = item(ReferencedSOPClassUID="1.2.840.10008.3.1.2.3.1", ReferencedSOPInstanceUID="1.2.826.0.1.3680043.10.1.12")
    reference.add_new(0x00324000, "LT", "copied along by an old PACS")
    ds.ReferencedStudySequence = [reference]
    raw(ds, "StudyDate", "DA", b"2020.01.15")  # the ACR-NEMA date form


def missing_type2(ds: Dataset) -> None:
    for keyword in ("PatientBirthDate", "StudyID", "ReferringPhysicianName"):
        del ds[keyword]


def unknown_character_set(ds: Dataset) -> None:
    raw(ds, "SpecificCharacterSet", "CS", b"ISO_IR 6")


def incomplete_clinical_trial(ds: Dataset) -> None:
    ds.ClinicalTrialSubjectID = "SUBJ-3"
    ds.ClinicalTrialSiteID = "SITE-1"


def enumerated_values(ds: Dataset) -> None:
    raw(ds, "PatientIdentityRemoved", "CS", b"Y ")
    raw(ds, "LossyImageCompression", "CS", b"1 ")
    raw(ds, "PatientSexNeutered", "CS", b"NEUTERED")


def mixed(datasets: list[Dataset]) -> None:
    """Several defects at once, some in only part of the instances (as after a PACS migration)."""
    for position, ds in enumerate(datasets):
        incomplete_references(ds)
        raw(ds, "StudyTime", "TM", b"12:30:45")
        if position % 2:
            raw(ds, "StudyDate", "DA", b"2020.01.15")
            raw(ds, "PatientAge", "AS", b"045 Y")
    datasets[0].ProcedureCodeSequence = [code(meaning="")]


DEFECTS = (
    Defect("incomplete reference sequences", every(incomplete_references), (
        "ReferencedStudySequence (0008,1110) item 1 dropped: lacks ReferencedSOPClassUID (0008,1150)",
        "ReferencedPatientSequence (0008,1120) item 1 dropped: lacks ReferencedSOPInstanceUID (0008,1155)",
        "ReferencedPatientSequence (0008,1120) has no valid item left: removed (Type 3)"),
        {"ReferencedStudySequence": lambda sequence: [i.ReferencedSOPInstanceUID for i in sequence]
         == ["1.2.826.0.1.3680043.10.1.8"], "ReferencedPatientSequence": ABSENT}),
    Defect("empty Type 1 values in code and identifier items", every(empty_codes), (
        "ProcedureCodeSequence (0008,1032) item 1 dropped: CodeMeaning (0008,0104) is empty",
        "ProcedureCodeSequence (0008,1032) item 2 dropped: CodeMeaning (0008,0104) is empty",
        "ProcedureCodeSequence (0008,1032) item 3 dropped: its code has no CodingSchemeDesignator",
        ("ProcedureCodeSequence (0008,1032) item 4 > CodeValue (0008,0100) is longer than 16 characters: "
         "moved to LongCodeValue (0008,0119)"),
        "OtherPatientIDsSequence (0010,1002) item 1 dropped: PatientID (0010,0020) is empty",
        "OtherPatientIDsSequence (0010,1002) has no valid item left: removed (Type 3)"),
        {"ProcedureCodeSequence": lambda sequence: [(i.get("CodeValue"), i.get("LongCodeValue")) for i in sequence]
         == [(None, "10000000000000000042"), ("CTNECK", None)], "OtherPatientIDsSequence": ABSENT}),
    Defect("ACR-NEMA and ISO date/time forms", every(acr_nema_dates), (
        "StudyDate (0008,0020) is not a valid DA value: separators removed (YYYY.MM.DD written as YYYYMMDD)",
        "PatientBirthDate (0010,0030) is not a valid DA value: separators removed (YYYY.MM.DD written as YYYYMMDD)",
        "StudyTime (0008,0030) is not a valid TM value: separators removed (HH:MM:SS written as HHMMSS)",
        "PatientBirthTime (0010,0032) is not a valid TM value: fraction truncated to 6 digits",
        "AcquisitionDateTime (0008,002A) is not a valid DT value: separators removed (ISO 8601 written as YYYYMMDDHHMMSS)"),
        {"StudyDate": "20200115", "PatientBirthDate": "19610304", "StudyTime": "123045", "PatientBirthTime": "083000.123456"}),
    Defect("invalid VR values", every(invalid_vr_values), (
        "PatientAge (0010,1010) is not a valid AS value: removed (Type 3)",
        "PatientSize (0010,1020) is not a valid DS value: removed (Type 3)",
        "PatientWeight (0010,1030) is not a valid DS value: rewritten in at most 16 characters",
        "PatientSex (0010,0040) is not a valid CS value: upper-cased",
        "StudyDescription (0008,1030) is longer than 64 characters (LO): truncated to 64 characters",
        "AccessionNumber (0008,0050) is longer than 16 characters (SH): emptied (Type 2)",
        "PatientName (0010,0010) has more than 5 name components: trailing empty name components removed",
        "Occupation (0010,2180) holds control characters: trailing padding removed",
        "ReferringPhysicianName (0008,0090) has more than 5 name components: emptied (Type 2)",
        "AdditionalPatientHistory (0010,21B0) holds control characters: removed (Type 3)",
        ("ReferencedPatientPhotoSequence (0010,1100) item 1 > ReferencedSOPSequence (0008,1199) item 1 > "
         "ReferencedFrameNumber (0008,1160) is not a valid IS value: written as an integer")),
        {"PatientAge": ABSENT, "PatientSize": ABSENT, "PatientWeight": lambda value: float(value) == 72.5,
         "PatientSex": "F", "StudyDescription": lambda value: len(value) <= 64 and value.startswith("CT NECK WITH"),
         "AccessionNumber": "", "PatientName": "Lindqvist^Astrid", "ReferringPhysicianName": "",
         "AdditionalPatientHistory": ABSENT, "Occupation": "Teacher",
         "ReferencedPatientPhotoSequence": lambda sequence: sequence[0].ReferencedSOPSequence[0].ReferencedFrameNumber == 1}),
    Defect("retired attributes and forms", every(retired_forms), (
        "ReferencedStudySequence (0008,1110) item 1 > StudyComments (0032,4000) is retired: removed",
        "StudyDate (0008,0020) is not a valid DA value: separators removed (YYYY.MM.DD written as YYYYMMDD)"),
        {"OtherPatientIDs": ABSENT, "StudyComments": ABSENT, "StudyStatusID": ABSENT, "ReasonForStudy": ABSENT,
         "ReferencedStudySequence": lambda sequence: "StudyComments" not in sequence[0], "StudyDate": "20200115"}),
    Defect("missing Type 2 attributes", every(missing_type2), (
        "PatientBirthDate (0010,0030) is missing (Type 2): added empty",
        "StudyID (0020,0010) is missing (Type 2): added empty",
        "ReferringPhysicianName (0008,0090) is missing (Type 2): added empty"),
        {"PatientBirthDate": "", "StudyID": ""}, warnings=(STUDY_ID_WARNING,)),
    Defect("character set highdicom refuses", every(unknown_character_set), (
        (f"SpecificCharacterSet (0008,0005) is not a character set highdicom accepts: replaced by {UTF8} "
         "(the copied text is written as UTF-8)"),),
        {"SpecificCharacterSet": UTF8, "PatientName": "Lindqvist^Astrid"}),
    Defect("incomplete optional module", every(incomplete_clinical_trial), (
        "Clinical Trial Subject module dropped: lacks ClinicalTrialSponsorName (0012,0010)",),
        {"ClinicalTrialSubjectID": ABSENT, "ClinicalTrialSiteID": ABSENT}),
    Defect("values outside their enumerations", every(enumerated_values), (
        "PatientIdentityRemoved (0012,0062) is not one of its enumerated values: removed (Type 3)",
        "LossyImageCompression (0028,2110) is not one of its enumerated values: zero-padded",
        "PatientSexNeutered (0010,2203) is not one of its enumerated values: emptied (Type 2C)"),
        {"PatientIdentityRemoved": ABSENT}),
    Defect("a mix, part of the instances", mixed, (
        "ReferencedStudySequence (0008,1110) item 1 dropped: lacks ReferencedSOPClassUID (0008,1150)",
        "ReferencedPatientSequence (0008,1120) has no valid item left: removed (Type 3)",
        "StudyTime (0008,0030) is not a valid TM value: separators removed (HH:MM:SS written as HHMMSS)",
        ("StudyDate (0008,0020) is not a valid DA value: separators removed (YYYY.MM.DD written as YYYYMMDD) "
         "(in 3 of 6 instances)"),
        "PatientAge (0010,1010) is not a valid AS value: written as nnnX (in 3 of 6 instances)",
        "ProcedureCodeSequence (0008,1032) item 1 dropped: CodeMeaning (0008,0104) is empty (in 1 of 6 instances)"),
        {"StudyTime": "123045", "ProcedureCodeSequence": ABSENT}),
)


@pytest.fixture(scope="module")
def volume_hu(ct_crop) -> np.ndarray:
    return ct_crop(6, size=32, z0=40)


def defective_series(volume_hu: np.ndarray, directory: Path, inject: Callable[[list[Dataset]], None]) -> list[Path]:
    """The converter's CT series with the defect injected, written to disk as the PACS would send it."""
    datasets = volume_to_ct_series(volume_hu, (2.5, 0.8, 0.8), info=PATIENT)
    inject(datasets)
    return write_series(datasets, directory)


def build_outputs(headers: list[Dataset], shape: tuple[int, int, int], spacing_mm) -> dict[str, Dataset]:
    """SEG, measurement SR and similar-cases SR, as the pipeline builds them."""
    mask = np.zeros(shape, bool)
    mask[2:4, 10:20, 12:22] = True
    lesions = measure_lesions(mask, np.full(shape, 25.0, np.float32), spacing_mm)
    seg = build_segmentation(headers, mask, ALGORITHM)
    measurements = build_measurement_report(headers, seg, lesions, ALGORITHM, series_number=91, instance_number=1,
                                            manufacturer="abscess-node", device_name="ABSCESS_NODE")
    similar = build_similar_cases_report(headers, [], ReportedQuery(mode="study", k=3, requested_by="ABSCESS_NODE"),
                                         ALGORITHM, series_number=92, instance_number=1, manufacturer="abscess-node",
                                         device_name="ABSCESS_NODE")
    return {"seg": seg, "measurements": measurements, "similar_cases": similar}


def dciodvfy_errors(headers: list[Dataset], shape, spacing_mm) -> list[str]:
    """What dciodvfy says about the objects built from ``headers``, or why they could not be built."""
    try:
        outputs = build_outputs(headers, shape, spacing_mm)
    except (ValueError, AttributeError, TypeError) as error:
        return [f"not built: {type(error).__name__}: {error}"]
    return [line for document in outputs.values() for line in validate(document).errors]


@pytest.mark.parametrize("defect", DEFECTS, ids=[defect.name for defect in DEFECTS])
def test_objects_from_a_defective_source_pass_dciodvfy(defect, volume_hu, tmp_path):
    geometry = read_geometry(defective_series(volume_hu, tmp_path / "ct", defect.inject))
    # the defect is real: without the repair the objects cannot be built or fail dciodvfy
    assert dciodvfy_errors(geometry.headers, geometry.shape, geometry.spacing_mm)

    repaired = repair_source_headers(geometry.headers)
    outputs = build_outputs(repaired.headers, geometry.shape, geometry.spacing_mm)
    for name, document in outputs.items():
        result = validate(document)
        assert result.errors == [], f"{name}: {result.errors}"
        assert result.warnings == list(defect.warnings), f"{name}: {result.warnings}"
        for keyword, expected in defect.expected.items():
            if expected is ABSENT:
                assert keyword not in document, f"{name} still carries {keyword}"
            elif callable(expected):
                assert expected(document[keyword].value), f"{name}: {keyword} = {document[keyword].value!r}"
            else:
                assert str(document[keyword].value or "") == expected, f"{name}: {keyword}"
    missing = [finding for finding in defect.findings if finding not in repaired.findings]
    assert not missing, f"findings lack {missing}; they are {repaired.findings}"
    assert not [value for value in PATIENT_VALUES for finding in repaired.findings if value in finding]


def test_clean_source_is_shared_unchanged(volume_hu, tmp_path):
    geometry = read_geometry(defective_series(volume_hu, tmp_path / "ct", lambda datasets: None))
    repaired = repair_source_headers(geometry.headers)
    assert repaired.findings == []
    for source, copy in zip(geometry.headers, repaired.headers, strict=True):
        assert copy is not source
        assert [element.tag for element in copy] == [element.tag for element in source]
        assert all(copy[element.tag] is element for element in source)


def snapshot(dataset: Dataset) -> list[tuple[Any, str, str]]:
    """Every element of ``dataset`` as (tag, VR, repr of the value, nested items included)."""
    return [(element.tag, element.VR, repr(element.value)) for element in dataset]


def test_source_datasets_are_never_modified(volume_hu, tmp_path):
    def every_defect(datasets: list[Dataset]) -> None:
        for ds in datasets:
            for inject in (incomplete_references, empty_codes, acr_nema_dates, invalid_vr_values, missing_type2):
                inject(ds)

    geometry = read_geometry(defective_series(volume_hu, tmp_path / "ct", every_defect))
    before = [snapshot(header) for header in geometry.headers]
    repaired = repair_source_headers(geometry.headers)
    assert len(repaired.findings) > 10
    assert [snapshot(header) for header in geometry.headers] == before


def test_a_defective_study_uid_is_kept_and_reported(volume_hu, tmp_path):
    """The study our objects belong to is the source's: an invalid StudyInstanceUID cannot be replaced."""
    def leading_zero(datasets: list[Dataset]) -> None:
        for ds in datasets:
            ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.0123"

    geometry = read_geometry(defective_series(volume_hu, tmp_path / "ct", leading_zero))
    repaired = repair_source_headers(geometry.headers)
    assert repaired.findings == [
        ("StudyInstanceUID (0020,000D) is not a valid UI value (Type 1): kept, it identifies what our objects share "
         "with the source; they inherit this defect")]
    assert {str(h.StudyInstanceUID) for h in repaired.headers} == {"1.2.826.0.1.3680043.10.0123"}


def test_an_instance_with_other_sop_class_uses_its_own_modules(volume_hu, tmp_path):
    """The copied modules come from highdicom's tables for the source's SOP class; an unknown class reads as CT."""
    geometry = read_geometry(defective_series(volume_hu, tmp_path / "ct", every(acr_nema_dates)))
    for header in geometry.headers:
        header.SOPClassUID = "1.2.826.0.1.3680043.10.99.1"  # a private SOP class highdicom does not know
    repaired = repair_source_headers(geometry.headers)
    assert "StudyDate (0008,0020) is not a valid DA value: separators removed (YYYY.MM.DD written as YYYYMMDD)" \
        in repaired.findings
    assert all(header.SOPClassUID != CT_IMAGE for header in repaired.headers)

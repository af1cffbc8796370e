"""A study whose headers carry the defects of real archives still gets a SEG and two SRs that
pass dciodvfy, the job lists what was repaired, and the source instances in Orthanc stay as sent.
All through the real Orthanc + our plugin + storescu."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from tooling.convert import StudyInfo, volume_to_ct_series, write_series
from tooling.dciodvfy import assert_valid

PATIENT = StudyInfo(patient_name="Haugland^Ingrid", patient_id="PID-90210", accession_number="ACC-31337",
                    patient_birth_date="19580717", patient_sex="F")
PATIENT_VALUES = ("Haugland", "Ingrid", "PID-90210", "ACC-31337", "19580717")
EXPECTED_REPAIRS = (
    "ReferencedStudySequence (0008,1110) item 1 dropped: lacks ReferencedSOPClassUID (0008,1150)",
    "ReferencedStudySequence (0008,1110) has no valid item left: removed (Type 3)",
    "ProcedureCodeSequence (0008,1032) item 1 dropped: CodeMeaning (0008,0104) is empty",
    "StudyDate (0008,0020) is not a valid DA value: separators removed (YYYY.MM.DD written as YYYYMMDD)",
    "StudyTime (0008,0030) is not a valid TM value: separators removed (HH:MM:SS written as HHMMSS)",
    "PatientAge (0010,1010) is not a valid AS value: removed (Type 3)",
    "StudyDescription (0008,1030) is longer than 64 characters (LO): truncated to 64 characters",
    "PatientName (0010,0010) has more than 5 name components: trailing empty name components removed",
    ("SpecificCharacterSet (0008,0005) is not a character set highdicom accepts: replaced by ISO_IR 192 "
     "(the copied text is written as UTF-8)"),
)


def raw(dataset: Dataset, keyword: str, vr: str, value: bytes) -> None:
    """Put the bytes into the dataset as they are (a source file's defect, not validated)."""
    tag = Tag(keyword)
    dataset[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)


def defective_study(volume_hu, directory: Path) -> list[pydicom.Dataset]:
    """The converter's CT series with the defects of real archives in every instance, written to disk."""
    datasets = volume_to_ct_series(volume_hu, (2.5, 1.0, 1.0), uid_seed="defective-headers", info=PATIENT)
    for ds in datasets:
        incomplete = Dataset()
        incomplete.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.10.2.1"
        ds.ReferencedStudySequence = [incomplete]
        empty_code = Dataset()
        empty_code.CodeValue, empty_code.CodingSchemeDesignator, empty_code.CodeMeaning = "T-D1600", "SRT", ""
        ds.ProcedureCodeSequence = [empty_code]
        raw(ds, "StudyDate", "DA", b"2020.01.15")
        raw(ds, "StudyTime", "TM", b"12:30:45")
        raw(ds, "PatientAge", "AS", b"45")
        raw(ds, "StudyDescription", "LO", b"CT NECK WITH CONTRAST FOR SUSPECTED DEEP NECK ABSCESS, LEFT SIDE, URGENT ")
        raw(ds, "PatientName", "PN", b"Haugland^Ingrid^^^^^^")
        raw(ds, "SpecificCharacterSet", "CS", b"ISO_IR 6")
        ds.add_new(0x00101000, "LO", "OLD-PID-1")  # Other Patient IDs, retired
    write_series(datasets, directory)
    return datasets


def test_defective_source_gets_valid_seg_and_srs_and_the_job_lists_the_repairs(start_node, ct_crop, tmp_path):
    node = start_node("defective-headers")
    datasets = defective_study(ct_crop(12), tmp_path / "ct")
    node.storescu(tmp_path / "ct")
    job = node.wait_for_job(datasets[0].StudyInstanceUID, timeout=300)
    assert job["state"] == "done", job

    repairs = job["result"]["source_repairs"]
    assert [finding for finding in EXPECTED_REPAIRS if finding not in repairs] == [], repairs
    warnings = job["selection"]["warnings"]
    assert [f"source header: {finding}" for finding in repairs] == [w for w in warnings if w.startswith("source header: ")]
    served = json.dumps(node.get("/abscess-node/jobs", study=datasets[0].StudyInstanceUID))
    assert not [value for value in PATIENT_VALUES if value in served]

    for name in ("seg", "measurements", "similar_cases"):
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(node.http.get(f"{node.url}/instances/{job['result'][name]['orthanc_id']}/file", timeout=60).content)
        assert_valid(path)
        written = pydicom.dcmread(path)
        assert written.StudyInstanceUID == datasets[0].StudyInstanceUID
        assert (written.StudyDate, written.StudyTime, str(written.PatientName)) == ("20200115", "123045", "Haugland^Ingrid")
        assert "ReferencedStudySequence" not in written and "PatientAge" not in written

    # the source instances in Orthanc are as the PACS sent them
    source_ids = node.http.post(node.url + "/tools/find", json={
        "Level": "Instance", "Query": {"StudyInstanceUID": datasets[0].StudyInstanceUID, "Modality": "CT"}}, timeout=30).json()
    assert len(source_ids) == len(datasets)
    stored = pydicom.dcmread(pydicom.filebase.DicomBytesIO(
        node.http.get(f"{node.url}/instances/{source_ids[0]}/file", timeout=60).content))
    assert stored["StudyDate"].value == "2020.01.15" and stored.SpecificCharacterSet == "ISO_IR 6"
    assert len(stored.ReferencedStudySequence) == 1 and "ReferencedSOPClassUID" not in stored.ReferencedStudySequence[0]

"""dcmtk's dsrdump reads both SRs without a warning and shows what a PACS user would see."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from dicom_node.identity import DEVICE_NAME, NODE_NAME
from dicom_node.reports.measurement import build_measurement_report
from dicom_node.reports.similar_cases import NO_SIMILAR_CASE_TEXT, ReportedQuery, build_similar_cases_report
from dicom_node.similar.query import SimilarCase, SlicePair
from index.lesions import Lesion
from index.records import StudyRecord
from tooling.synthetic_ct import TEST_ALGORITHM, make_abscess_mask, make_abscess_seg, make_ct_series

LESION = Lesion(label=1, voxel_count=360, volume_ml=0.288, longest_axial_diameter_mm=12.5, core_mean_hu=18.5,
                core_sd_hu=9.25, loculi=2, first_slice=2, last_slice=4, space="parapharyngeal")


def dsrdump(document: pydicom.Dataset, path: Path) -> str:
    """dsrdump's output; it must succeed without a single warning."""
    document.save_as(path, enforce_file_format=True)
    dump = subprocess.run(["dsrdump", str(path)], check=False, capture_output=True, text=True, timeout=30)
    assert dump.returncode == 0, dump.stderr
    assert dump.stderr == "", dump.stderr
    return dump.stdout


def test_dsrdump_reads_the_measurement_reports(tmp_path):
    ct = make_ct_series()
    seg = make_abscess_seg(ct, make_abscess_mask())
    common = {"algorithm": TEST_ALGORITHM, "series_number": 91, "instance_number": 1, "manufacturer": NODE_NAME,
              "device_name": DEVICE_NAME}
    dump = dsrdump(build_measurement_report(ct, seg, [LESION], **common), tmp_path / "measurements.dcm")
    assert '"Imaging Measurement Report"' in dump
    assert 'NUM:(,,"Volume")="0.288" (ml,UCUM,"milliliter")' in dump
    assert 'NUM:(,,"Number of loculi")="2" ({loculi},UCUM,"loculi")' in dump
    assert 'TEXT:(,,"Tracking Identifier")="Abscess 1"' in dump
    dump = dsrdump(build_measurement_report(ct, None, [], **common), tmp_path / "none.dcm")
    assert 'CODE:(,,"Abscess")=(272519000,SCT,"Absent")' in dump


def test_dsrdump_reads_the_similar_cases_reports(tmp_path):
    ct = make_ct_series()
    case = SimilarCase(rank=1, score=0.93, mode="study",
                       study=StudyRecord(generate_uid(), series_uid=generate_uid(), study_date="20220811"),
                       best_slices=(SlicePair(2, 40, generate_uid(), 0.97),), lesions=(LESION,))
    common = {"algorithm": TEST_ALGORITHM, "series_number": 92, "instance_number": 1, "manufacturer": NODE_NAME,
              "device_name": DEVICE_NAME}
    dump = dsrdump(build_similar_cases_report(ct, [case], ReportedQuery("study", 3), **common), tmp_path / "s.dcm")
    assert '<CONTAINER:(,,"Similar cases")' in dump
    assert 'NUM:(,,"Similarity score")="0.93"' in dump
    dump = dsrdump(build_similar_cases_report(ct, [], ReportedQuery("study", 3), **common), tmp_path / "none.dcm")
    assert NO_SIMILAR_CASE_TEXT in dump

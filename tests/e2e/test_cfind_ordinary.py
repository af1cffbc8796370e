"""Ordinary C-FIND: our plugin (which replaces Orthanc's C-FIND SCP) answers like a plain Orthanc.

Two real Orthanc 1.10 servers hold the same instances: a plain one (no plugin) and ours. The
same dcmtk findscu queries (patient/study/series/image levels, wildcards, date ranges, UID
lists, empty return keys, computed keys, non-main tags) go to both; the answers, as sorted
dumps of every returned element, must be equal.
"""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from tooling.convert import StudyInfo, volume_to_ct_series, write_series
from tooling.orthanc_harness import OrthancProcess, free_port, scratch_node_configuration

CALLING = "EQUIV"


def _series(seed: str, info: StudyInfo, modality: str = "CT", slices: int = 3, study_uid: str | None = None,
            series_number: int = 2) -> list[pydicom.Dataset]:
    rng = np.random.default_rng(len(seed))
    volume = rng.normal(0, 50, (slices, 16, 16)).astype(np.float32)
    info = dataclasses.replace(info, series_number=series_number)
    datasets = volume_to_ct_series(volume, (2.5, 1.0, 1.0), info=info, uid_seed=seed, study_uid=study_uid)
    for ds in datasets:
        ds.Modality = modality
        ds.PatientAge = "042Y"
    return datasets


@pytest.fixture(scope="module")
def two_orthancs(tmp_path_factory):
    """(plain Orthanc, our node), same AET, same modalities, same instances."""
    directory = tmp_path_factory.mktemp("equivalence")
    common = {"DicomAet": "ABSCESS_NODE", "StableAge": 1, "DicomModalities": {"eq": [CALLING, "127.0.0.1", 1]}}
    ours_config = scratch_node_configuration(directory / "ours", {"Enabled": False, "WorkerCount": 0}, **common)
    plain_config = {key: value for key, value in ours_config.items() if key not in ("PythonScript", "AbscessNode")}
    plain_config.update(HttpPort=free_port(), DicomPort=free_port(), Plugins=[],
                        StorageDirectory=str(directory / "plain-db"), IndexDirectory=str(directory / "plain-db"))
    plain = OrthancProcess(plain_config, directory / "plain").start()
    ours = OrthancProcess(ours_config, directory / "ours").start()
    try:
        studies = [
            _series("eq-1", StudyInfo(patient_name="Doe^John", patient_id="EQ-1", study_date="20200105",
                                      study_description="CT NECK", accession_number="A1", patient_sex="M")),
            _series("eq-2", StudyInfo(patient_name="DOE^JANE", patient_id="EQ-2", study_date="20210610",
                                      study_description="ct neck contrast", accession_number="A2", patient_sex="F")),
            _series("eq-3", StudyInfo(patient_name="Roe^Rick", patient_id="EQ-3", study_date="20221231",
                                      study_description="MR HEAD", accession_number="A3"), modality="MR", slices=2),
        ]
        extra = _series("eq-1b", StudyInfo(patient_name="Doe^John", patient_id="EQ-1", study_date="20200105",
                                           study_description="CT NECK", accession_number="A1", patient_sex="M",
                                           series_description="Dose report"), modality="SR", slices=1,
                        study_uid=studies[0][0].StudyInstanceUID, series_number=9)
        paths = []
        for number, datasets in enumerate([*studies, extra]):
            paths += write_series(datasets, directory / f"files-{number}")
        for server in (plain, ours):
            server.storescu(paths)
        yield plain, ours, studies
    finally:
        ours.stop()
        plain.stop()


def answers(server: OrthancProcess, keys: list[str], out: Path, root: str) -> tuple[str, list[list[str]]]:
    """findscu answers as sorted dumps of their elements, and the final status line."""
    out.mkdir(parents=True)
    done = subprocess.run(["findscu", "-v", root, "-aet", CALLING, "-aec", server.aet, "-X", "-od", str(out),  # noqa: PLW1510
                           "127.0.0.1", str(server.dicom_port), *[a for k in keys for a in ("-k", k)]],
                          capture_output=True, text=True, timeout=120)
    final = [line for line in done.stderr.splitlines() if "Final Find Response" in line or "Failed" in line]
    dumps = []
    for path in out.glob("rsp*.dcm"):
        dataset = pydicom.dcmread(path)
        dumps.append([f"{element.tag} {element.VR} {element.value!r}" for element in dataset])
    return "\n".join(final), sorted(dumps)


QUERIES = {
    "patients": ("-P", ["QueryRetrieveLevel=PATIENT", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                        "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries", "NumberOfPatientRelatedInstances"]),
    "patient-name-wildcard-any-case": ("-P", ["QueryRetrieveLevel=PATIENT", "PatientName=doe*", "PatientID"]),
    "studies": ("-S", ["QueryRetrieveLevel=STUDY", "StudyInstanceUID", "PatientName", "PatientID", "StudyDate",
                       "StudyTime", "StudyID", "StudyDescription", "AccessionNumber", "ModalitiesInStudy",
                       "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances", "SOPClassesInStudy",
                       "ReferringPhysicianName"]),
    "study-date-range": ("-S", ["QueryRetrieveLevel=STUDY", "StudyDate=20200101-20211231", "StudyInstanceUID"]),
    "study-date-open-range": ("-S", ["QueryRetrieveLevel=STUDY", "StudyDate=20210101-", "AccessionNumber"]),
    "study-description-wildcard-case-sensitive": ("-S", ["QueryRetrieveLevel=STUDY", "StudyDescription=*NECK*",
                                                         "StudyInstanceUID"]),
    "modalities-in-study": ("-S", ["QueryRetrieveLevel=STUDY", "ModalitiesInStudy=MR", "PatientName"]),
    "non-main-tag": ("-S", ["QueryRetrieveLevel=STUDY", "PatientAge", "StudyInstanceUID"]),
    "series": ("-S", ["QueryRetrieveLevel=SERIES", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber",
                      "SeriesDescription", "NumberOfSeriesRelatedInstances", "PatientName"]),
    "series-modality-list": ("-S", ["QueryRetrieveLevel=SERIES", "Modality=SR\\MR", "SeriesInstanceUID"]),
    "images": ("-S", ["QueryRetrieveLevel=IMAGE", "SOPInstanceUID", "InstanceNumber", "SOPClassUID"]),
    "no-level": ("-S", ["PatientName"]),
}


@pytest.mark.parametrize("name", QUERIES)
def test_same_answers_as_plain_orthanc(two_orthancs, tmp_path, name):
    plain, ours, _ = two_orthancs
    root, keys = QUERIES[name]
    expected = answers(plain, keys, tmp_path / "plain", root)
    got = answers(ours, keys, tmp_path / "ours", root)
    assert got == expected
    if name not in ("no-level", "modalities-in-study"):
        assert expected[1], "the query should match something"


def test_uid_list_and_single_series(two_orthancs, tmp_path):
    plain, ours, studies = two_orthancs
    uids = "\\".join(ds[0].StudyInstanceUID for ds in studies[:2])
    keys = ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={uids}", "StudyDate", "PatientName"]
    expected = answers(plain, keys, tmp_path / "plain", "-S")
    assert len(expected[1]) == 2
    assert answers(ours, keys, tmp_path / "ours", "-S") == expected
    keys = ["QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={studies[0][0].StudyInstanceUID}",
            f"SeriesInstanceUID={studies[0][0].SeriesInstanceUID}", "SOPInstanceUID", "ImagePositionPatient"]
    expected = answers(plain, keys, tmp_path / "plain2", "-S")
    assert len(expected[1]) == 3
    assert answers(ours, keys, tmp_path / "ours2", "-S") == expected

"""End to end: a study sent with storescu comes back from the real Orthanc as a valid DICOM SEG."""

from __future__ import annotations

import io
import json
import sqlite3
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from tooling.convert import StudyInfo, nifti_to_ct_series, write_series
from tooling.dciodvfy import assert_valid
from dicom_node.series import read_geometry, read_hu


def seg_instances(node, study_uid: str) -> list[str]:
    """Orthanc ids of the SEG instances of a study."""
    found = node.http.post(node.url + "/tools/find", json={
        "Level": "Instance", "Query": {"StudyInstanceUID": study_uid, "Modality": "SEG"}}, timeout=30).json()
    return found


@pytest.fixture(scope="module")
def head_ct(tmp_path_factory, sample) -> tuple[list[pydicom.Dataset], Path]:
    """The real head-and-neck CT (dicom2stl) as a DICOM series, written to disk."""
    datasets = nifti_to_ct_series(sample("ct_head"), StudyInfo(), uid_seed="e2e-head")
    directory = tmp_path_factory.mktemp("head_ct")
    write_series(datasets, directory)
    return datasets, directory


def test_study_comes_back_as_seg_then_growth_replaces_it(node, head_ct, forward_scp, weights_path, tmp_path):
    datasets, directory = head_ct
    study_uid = datasets[0].StudyInstanceUID
    files = sorted(directory.glob("*.dcm"))

    # A PACS sends the first 60 slices; the node segments them.
    sent = node.storescu(files[:60])
    assert sent.returncode == 0, sent.stderr
    first = node.wait_for_job(study_uid)
    assert first["state"] == "done", first
    assert first["series_uid"] == datasets[0].SeriesInstanceUID
    assert set(first["timings"]) >= {"select", "download", "geometry", "segment", "seg", "store", "forward"}
    assert first["result"]["frames"] == 60
    first_seg_id = first["result"]["seg"]["orthanc_id"]
    assert seg_instances(node, study_uid) == [first_seg_id]

    # The study grows: the rest of the slices arrive later. The SEG is replaced, never duplicated.
    sent = node.storescu(files[60:])
    assert sent.returncode == 0, sent.stderr
    second = node.wait_for_job(study_uid, after_id=first["id"], accept=lambda job: job["state"] != "skipped"
                               and bool(job["forwards"]) and job["forwards"][0]["state"] == "sent")
    assert second["state"] == "done", second
    assert second["result"]["frames"] == len(files)
    assert sorted(second["result"]["replaced"]) == sorted(first["result"]["orthanc_ids"])  # SEG + both SRs
    seg_id = second["result"]["seg"]["orthanc_id"]
    assert seg_instances(node, study_uid) == [seg_id]

    # The SEG as any client gets it from Orthanc.
    seg_bytes = node.http.get(f"{node.url}/instances/{seg_id}/file", timeout=60).content
    seg_path = tmp_path / "seg.dcm"
    seg_path.write_bytes(seg_bytes)
    assert_valid(seg_path)
    seg = hd.seg.segread(io.BytesIO(seg_bytes))
    source = datasets[0]
    assert seg.StudyInstanceUID == study_uid
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID"):
        assert seg.get(keyword) == source.get(keyword), keyword
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert seg.SegmentationType == "BINARY"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == len(datasets)
    assert int(seg.NumberOfFrames) == len(datasets)  # a frame for every slice, empty ones too
    description = seg.SegmentSequence[0]
    assert description.SegmentLabel == "Abscess"
    assert description.SegmentedPropertyTypeCodeSequence[0].CodeValue == "44132006"
    algorithm = description.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "VM-UNet"
    assert "not for clinical use" in seg.ContentDescription
    assert "abscess-node" in [item.Manufacturer for item in seg.ContributingEquipmentSequence]

    # Frame i covers source slice i: same position, same referenced instance.
    by_uid = {ds.SOPInstanceUID: ds for ds in datasets}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        referenced = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert position == pytest.approx([float(v) for v in by_uid[referenced].ImagePositionPatient], abs=1e-3)

    # Pixel-exact: the SEG holds what the network gives for these slices, less the candidates the
    # plausibility rules reject (default LesionRules, the series' own anatomy).
    from models.anatomy import analyse_neck
    from models.plausibility import filter_candidates
    from models.segmenter import Segmenter

    geometry = read_geometry(files)
    volume_hu = read_hu(geometry)
    probabilities = Segmenter.load(weights_path, device="cpu").run(
        volume_hu, pixel_spacing_mm=geometry.spacing_mm[1:]).probabilities
    stored = np.stack([
        seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[ds.SOPInstanceUID], combine_segments=True, skip_overlap_checks=True)[0]
        for ds in geometry.headers]).astype(bool)
    assert stored.shape == probabilities.shape
    # exact wherever the network is not within float noise of the threshold (thread counts differ)
    decided = np.abs(probabilities - 0.5) > 1e-4
    kept = filter_candidates(probabilities > 0.5, volume_hu, geometry.spacing_mm,
                             analyse_neck(volume_hu, geometry.spacing_mm)).kept
    assert np.array_equal(stored[decided], kept[decided])
    assert decided.mean() > 0.999
    plausibility = second["result"]["plausibility"]
    assert set(plausibility["removed_by_rule"]) == {"neck_soft_tissue", "min_volume", "core_attenuation",
                                                    "rim_enhancement"}
    assert all(lesion["space"] and lesion["side"] for lesion in second["result"]["lesions"])

    # The measurement SR and the similar-cases SR sit in the same study, valid, with the demo wording.
    for name, title in (("measurements", "Imaging Measurement Report"), ("similar_cases", "Similar cases")):
        sr_bytes = node.http.get(f"{node.url}{second['result'][name]['url']}/file", timeout=60).content
        sr_path = tmp_path / f"{name}.dcm"
        sr_path.write_bytes(sr_bytes)
        assert_valid(sr_path)
        sr = pydicom.dcmread(sr_path)
        assert sr.StudyInstanceUID == study_uid and sr.Modality == "SR"
        assert sr.ConceptNameCodeSequence[0].CodeMeaning == title
        assert "NOT FOR CLINICAL USE" in sr_path.read_bytes().decode("latin-1").upper()
    measurement_sr = pydicom.dcmread(tmp_path / "measurements.dcm")
    assert seg.SOPInstanceUID in str(measurement_sr.CurrentRequestedProcedureEvidenceSequence) or not second["result"]["lesions"]

    # SEG and measurement SR forwarded to the configured modality with a real C-STORE; the
    # similar-cases SR (other patients, even pseudonymised) stays here (ForwardSimilarCasesReport false).
    forwarded = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
                 for p in Path(forward_scp["directory"]).rglob("*") if p.is_file()}
    assert {seg.SOPInstanceUID, second["result"]["measurements"]["sop_instance_uid"]} <= forwarded
    assert second["result"]["similar_cases"]["sop_instance_uid"] not in forwarded
    assert [(f["destination"], f["state"], f["attempts"]) for f in second["forwards"]] == [("forward", "sent", 1)]


def test_same_content_again_does_nothing(node, head_ct):
    datasets, directory = head_ct
    study_uid = datasets[0].StudyInstanceUID
    before = node.wait_for_job(study_uid)
    orthanc_study = node.http.post(node.url + "/tools/lookup", data=study_uid, timeout=30).json()[0]["ID"]
    answer = node.http.post(f"{node.url}/abscess-node/studies/{orthanc_study}/process",
                           data=json.dumps({"Force": False}), timeout=30)
    assert answer.status_code == 200 and answer.json()["state"] in ("queued", "running", "skipped")
    again = node.wait_for_job(study_uid, after_id=before["id"])
    assert again["state"] == "skipped" and again["result"]["unchanged"] is True
    assert "download" not in again["timings"]  # recognised from Orthanc's index: no pixel data fetched
    assert len(seg_instances(node, study_uid)) == 1
    # our own SEG/SRs made the study stable again after the first run: those jobs downloaded nothing either
    ours = [job for job in node.get("/abscess-node/jobs", study=study_uid) if (job.get("result") or {}).get("unchanged")]
    assert ours and all("download" not in job["timings"] for job in ours)


def test_a_crash_between_storing_and_recording_is_adopted_not_duplicated(node, head_ct):
    """The outputs record is lost (a crash right after the store): the forced re-run stores the very
    same SEG/SRs (UIDs derived from the content), which Orthanc already holds: adopted, not duplicated."""
    datasets, _ = head_ct
    study_uid = datasets[0].StudyInstanceUID
    before = node.wait_for_job(study_uid)
    with sqlite3.connect(node.directory / "jobs.sqlite") as jobs:
        jobs.execute("delete from outputs where study_uid = ?", [study_uid])
    orthanc_study = node.http.post(node.url + "/tools/lookup", data=study_uid, timeout=30).json()[0]["ID"]
    assert node.http.post(f"{node.url}/abscess-node/studies/{orthanc_study}/process", timeout=30).status_code == 200
    again = node.wait_for_job(study_uid, after_id=before["id"], accept=lambda job: job["state"] != "skipped")
    assert again["state"] == "done" and sorted(again["result"]["adopted"]) == ["measurements", "seg", "similar_cases"]
    assert len(seg_instances(node, study_uid)) == 1


def test_jobs_rest_routes(node):
    assert node.http.get(node.url + "/abscess-node/jobs/999999", timeout=10).status_code == 404
    assert node.http.get(node.url + "/abscess-node/jobs?state=bogus", timeout=10).status_code == 400
    assert node.http.post(node.url + "/abscess-node/studies/0000-unknown/process", timeout=10).status_code == 404
    jobs = node.http.get(node.url + "/abscess-node/jobs", timeout=10).json()
    assert isinstance(jobs, list)

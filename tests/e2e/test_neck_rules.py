"""The default series rules through a real node: a chest CT without a neck is skipped with the
reason, and a head-and-neck CT gets a SEG whose second segment holds the rejected candidates
(``RejectedCandidatesSegment``) and a measurement SR that counts them per rule."""

from __future__ import annotations

import io

import highdicom as hd
import numpy as np
import pydicom

from tooling.convert import StudyInfo, nifti_to_ct_series, write_series
from tooling.dciodvfy import assert_valid


def test_chest_ct_is_skipped_and_neck_ct_reports_its_rejected_candidates(start_node, sample, tmp_path):
    node = start_node("neck-rules", {"SeriesRules": {"RequireNeckCoverage": True}, "RejectedCandidatesSegment": True,
                                     "ChunkSlices": 32})
    chest = sorted(p for p in sample("rider_lung_ct").glob("*.dcm"))
    chest_uid = pydicom.dcmread(chest[0], stop_before_pixels=True).StudyInstanceUID
    assert node.storescu(chest).returncode == 0
    job = node.wait_for_job(chest_uid, timeout=600)
    assert job["state"] == "skipped", job
    assert "no neck in the series" in job["error"] and "RequireNeckCoverage" in job["error"]
    assert job["selection"]["neck"]["covers_neck"] is False
    found = node.http.post(node.url + "/tools/find", json={
        "Level": "Instance", "Query": {"StudyInstanceUID": chest_uid, "Modality": "SEG"}}, timeout=30).json()
    assert found == []

    datasets = nifti_to_ct_series(sample("ct_head"), StudyInfo(patient_id="NECK-RULES"), uid_seed="neck-rules")
    write_series(datasets, tmp_path / "head")
    assert node.storescu(tmp_path / "head").returncode == 0
    job = node.wait_for_job(datasets[0].StudyInstanceUID, timeout=600)
    assert job["state"] == "done", job
    neck = job["result"]["neck"]
    assert neck["covers_neck"] and neck["neck_band_mm"] >= 25
    plausibility = job["result"]["plausibility"]
    seg_bytes = node.http.get(f"{node.url}/instances/{job['result']['seg']['orthanc_id']}/file", timeout=60).content
    (tmp_path / "seg.dcm").write_bytes(seg_bytes)
    assert_valid(tmp_path / "seg.dcm")
    seg = hd.seg.segread(io.BytesIO(seg_bytes))
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Abscess", "Abscess candidate (rejected)"]
    frames = np.stack([seg.get_pixels_by_source_instance([ds.SOPInstanceUID], combine_segments=False)[0]
                       for ds in datasets])
    assert not (frames[..., 0].astype(bool) & frames[..., 1].astype(bool)).any()  # kept and rejected never overlap
    assert bool(frames[..., 1].any()) == any(plausibility["removed_by_rule"].values())
    band = neck["neck_slices"]
    kept_slices = np.flatnonzero(frames[..., 0].any(axis=(1, 2)))
    assert all(band[0] <= z <= band[1] for z in kept_slices)  # lesions only in the neck band
    sr_bytes = node.http.get(f"{node.url}/instances/{job['result']['measurements']['orthanc_id']}/file",
                            timeout=60).content
    (tmp_path / "sr.dcm").write_bytes(sr_bytes)
    assert_valid(tmp_path / "sr.dcm")
    sr = pydicom.dcmread(io.BytesIO(sr_bytes))
    counts = {item.ConceptNameCodeSequence[0].CodeMeaning: int(item.MeasuredValueSequence[0].NumericValue)
              for element in sr.iterall() if element.keyword == "ContentSequence" for item in element.value
              if item.ConceptNameCodeSequence[0].CodeMeaning.startswith("Candidates removed")}
    assert sum(counts.values()) == sum(plausibility["removed_by_rule"].values()) and len(counts) == 4


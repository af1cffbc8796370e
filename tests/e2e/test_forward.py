"""Forwarding retries: a modality that cannot be reached ends the job failed with the reason,
while the SEG and SRs stay stored in Orthanc."""

from __future__ import annotations

from tooling.convert import volume_to_ct_series, write_series
from tooling.orthanc_harness import free_port


def test_unreachable_modality_is_retried_then_reported(tmp_path, start_node, ct_crop):
    node = start_node("forward-dead", {"ForwardTo": ["dead"], "ForwardRetries": 2},
                      DicomModalities={"dead": ["NOBODY", "127.0.0.1", free_port()]})
    datasets = volume_to_ct_series(ct_crop(12), (2.5, 1.0, 1.0), uid_seed="forward-dead")
    write_series(datasets, tmp_path / "ct")
    node.storescu(tmp_path / "ct")
    job = node.wait_for_job(datasets[0].StudyInstanceUID, timeout=300)
    assert job["state"] == "failed"
    assert "forwarding failed after 2 attempt(s) to: dead" in job["error"]
    assert [f["attempts"] for f in job["result"]["forwarded"]] == [2]
    for name in ("seg", "measurements", "similar_cases"):
        assert node.get(f"/instances/{job['result'][name]['orthanc_id']}")["ID"]

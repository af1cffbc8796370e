"""Forwarding retries: a modality that cannot be reached ends the job failed with the reason,
while the SEG and SRs stay stored in Orthanc."""

from __future__ import annotations

from dicom_node.convert import volume_to_ct_series, write_series
from dicom_node.orthanc_process import OrthancProcess, free_port, node_configuration
from tests.test_bad_input import real_ct_crop


def test_unreachable_modality_is_retried_then_reported(tmp_path, weights_path):
    directory = tmp_path / "node"
    config = node_configuration(
        HttpPort=free_port(), DicomPort=free_port(), StableAge=1,
        StorageDirectory=str(directory / "db"), IndexDirectory=str(directory / "db"),
        DicomModalities={"dead": ["NOBODY", "127.0.0.1", free_port()]},
        AbscessNode={"WeightsPath": str(weights_path), "JobsDatabase": str(directory / "jobs.sqlite"),
                     "IndexDirectory": str(directory / "index"), "WorkDirectory": str(directory / "work"),
                     "LogDirectory": str(directory / "logs"), "ForwardTo": ["dead"], "ForwardRetries": 2})
    node = OrthancProcess(config, directory).start()
    try:
        datasets = volume_to_ct_series(real_ct_crop(12), (2.5, 1.0, 1.0), uid_seed="forward-dead")
        write_series(datasets, tmp_path / "ct")
        node.storescu(tmp_path / "ct")
        job = node.wait_for_job(datasets[0].StudyInstanceUID, timeout=300)
        assert job["state"] == "failed"
        assert "forwarding failed after 2 attempt(s) to: dead" in job["error"]
        assert [f["attempts"] for f in job["result"]["forwarded"]] == [2]
        for name in ("seg", "measurements", "similar_cases"):
            assert node.get(f"/instances/{job['result'][name]['orthanc_id']}")["ID"]
    finally:
        node.stop()

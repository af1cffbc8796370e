"""Forwarding is a queue the node works through: a destination that is down is retried with
back-off until it answers, and one that never answers is given up visibly; the SEG and SRs stay
stored in Orthanc either way."""

from __future__ import annotations

import subprocess
import time

import pydicom

from tooling.convert import volume_to_ct_series, write_series
from tooling.orthanc_harness import free_port


def forwards_settled(job: dict) -> bool:
    return bool(job["forwards"]) and all(f["state"] in ("sent", "failed") for f in job["forwards"])


def test_unreachable_modality_is_retried_then_given_up(tmp_path, start_node, ct_crop):
    node = start_node("forward-dead", {"ForwardTo": ["dead"], "ForwardRetries": 2, "ForwardBackoffSeconds": 1},
                      DicomModalities={"dead": ["NOBODY", "127.0.0.1", free_port()]})
    datasets = volume_to_ct_series(ct_crop(12), (2.5, 1.0, 1.0), uid_seed="forward-dead")
    write_series(datasets, tmp_path / "ct")
    node.storescu(tmp_path / "ct")
    job = node.wait_for_job(datasets[0].StudyInstanceUID, timeout=300, accept=forwards_settled)
    assert job["state"] == "failed"
    assert "forwarding to dead gave up after 2 attempt(s)" in job["error"]
    assert [(f["destination"], f["state"], f["attempts"]) for f in job["forwards"]] == [("dead", "failed", 2)]
    for name in ("seg", "measurements", "similar_cases"):
        assert node.get(f"/instances/{job['result'][name]['orthanc_id']}")["ID"]


def test_a_destination_that_comes_back_gets_the_seg_without_a_rerun(tmp_path, start_node, ct_crop):
    port = free_port()
    node = start_node("forward-late", {"ForwardTo": ["late"], "ForwardRetries": 8, "ForwardBackoffSeconds": 2},
                      DicomModalities={"late": ["LATE_SCP", "127.0.0.1", port]})
    datasets = volume_to_ct_series(ct_crop(12), (2.5, 1.0, 1.0), uid_seed="forward-late")
    write_series(datasets, tmp_path / "ct")
    node.storescu(tmp_path / "ct")
    study_uid = datasets[0].StudyInstanceUID
    job = node.wait_for_job(study_uid, timeout=300, accept=lambda j: bool(j["forwards"]) and j["forwards"][0]["attempts"] >= 1)
    assert job["state"] == "done" and job["forwards"][0]["state"] == "pending"  # down: waiting, not lost
    received = tmp_path / "received"
    received.mkdir()
    scp = subprocess.Popen(["storescp", "-aet", "LATE_SCP", "-od", str(received), str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        job = node.wait_for_job(study_uid, timeout=120, accept=forwards_settled)
        assert job["state"] == "done" and job["forwards"][0]["state"] == "sent", job["forwards"]
        assert job["forwards"][0]["attempts"] >= 2
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(list(received.iterdir())) < 2:
            time.sleep(0.2)
        arrived = {pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID for path in received.iterdir()}
        assert {job["result"]["seg"]["sop_instance_uid"], job["result"]["measurements"]["sop_instance_uid"]} <= arrived
    finally:
        scp.terminate()
        scp.wait(10)

"""A job that was running when the node died is picked up again when the node starts."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from tooling.convert import volume_to_ct_series, write_series
from tooling.orthanc_harness import OrthancProcess


def worker_pids(settings_directory) -> list[int]:
    found = subprocess.run(["pgrep", "-f", "--", f"--settings {settings_directory}"], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def test_running_job_survives_a_crash_of_the_node(tmp_path, start_node, ct_crop):
    node = start_node("crash", {"ChunkSlices": 8, "InferenceBatchSize": 1})
    config, directory = node.config, node.directory
    try:
        datasets = volume_to_ct_series(ct_crop(300, size=64), (1.0, 1.0, 1.0), uid_seed="crash")
        write_series(datasets, tmp_path / "ct")
        node.storescu(tmp_path / "ct")
        study_uid = datasets[0].StudyInstanceUID
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            jobs = node.get("/abscess-node/jobs", study=study_uid)
            if jobs and jobs[0]["state"] == "running":
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"the job never ran: {jobs}")
        # the whole node dies at once (power loss, OOM killer): Orthanc and its worker, SIGKILL
        victims = worker_pids(directory / "work")
        assert victims, "no worker process found"
        os.kill(node.process.pid, signal.SIGKILL)
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        node.process.wait()
        time.sleep(0.5)
        node = OrthancProcess(config, directory).start()  # same storage, same job store
        job = node.wait_for_job(study_uid, timeout=300)
        assert job["state"] == "done", job
        assert job["reason"] == "restart" and job["attempts"] == 2
        assert job["result"]["frames"] == 300
    finally:
        node.stop()

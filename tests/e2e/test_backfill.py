"""Archive backfill against the real Orthanc: studies stored before the node processed anything
are queued by ``python -m dicom_node backfill`` (filters, a shallow queue, a progress bar), each
processed once, and an interrupted backfill is continued by running it again."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from dicom_node.config import CHECKOUT
from dicom_node.jobs import PRIORITY_BACKFILL
from dicom_node.private_files import write_private_file
from tooling.convert import StudyInfo, volume_to_ct_series, write_series
from tooling.orthanc_harness import ADMIN, OrthancProcess, scratch_node_configuration, wait_until

ARCHIVE = [("arch-1", "20190301"), ("arch-2", "20200715"), ("arch-3", "20211102"), ("arch-4", "20220120"),
           ("arch-5", "20230509")]


def test_backfill_processes_each_archived_study_once_and_resumes_after_an_interrupt(tmp_path, weights_path, ct_crop):
    # An archive the node never saw: Enabled false, so storing queues nothing (as if the studies
    # had arrived before the node was connected).
    # No worker at first: the interrupted backfill below then waits on a full queue, whatever the
    # machine's speed (with a worker the 5 small studies can all be done before Ctrl-C arrives).
    config = scratch_node_configuration(tmp_path, {"WeightsPath": str(weights_path), "Enabled": False, "ChunkSlices": 32,
                                                   "WorkerCount": 0,
                                                   "SeriesRules": {"RequireNeckCoverage": False}})  # 64 x 64 crops
    node = OrthancProcess(config, tmp_path).start()
    try:
        archive = {}
        for number, (seed, study_date) in enumerate(ARCHIVE):
            datasets = volume_to_ct_series(ct_crop(12, z0=6 * number), (2.5, 1.0, 1.0), uid_seed=seed,
                                           info=StudyInfo(patient_id=seed.upper(), study_date=study_date))
            write_series(datasets, tmp_path / seed)
            archive[datasets[0].StudyInstanceUID] = seed
        too_old = volume_to_ct_series(ct_crop(12), (2.5, 1.0, 1.0), uid_seed="arch-old",
                                      info=StudyInfo(patient_id="ARCH-OLD", study_date="20150101"))
        mr = volume_to_ct_series(ct_crop(12), (2.5, 1.0, 1.0), uid_seed="arch-mr",
                                 info=StudyInfo(patient_id="ARCH-MR", study_date="20220101"))
        for ds in mr:
            ds.Modality = "MR"
        write_series(too_old, tmp_path / "old")
        write_series(mr, tmp_path / "mr")
        node.storescu([tmp_path / seed for seed, _ in ARCHIVE] + [tmp_path / "old", tmp_path / "mr"])
        wait_until(lambda: len(node.get("/studies")) == 7, 60, "7 studies in Orthanc")
        time.sleep(2)  # past StableAge: with Enabled false, nothing is queued
        assert node.get("/abscess-node/jobs") == []

        password_file = tmp_path / "admin-password"
        write_private_file(password_file, config["RegisteredUsers"][ADMIN])
        command = [sys.executable, "-m", "dicom_node", "backfill", "--config", str(tmp_path / "orthanc.json"),
                   "--orthanc-password-file", str(password_file), "--since", "2019-01-01", "--modality", "CT",
                   "--max-queued", "2"]

        # Interrupted (Ctrl-C) while it waits for room in its shallow queue (two studies queued).
        # Ctrl-C reaches it even when this test itself was started in the background by a
        # non-interactive shell, which sets SIGINT to ignored for its children (Python then
        # installs no KeyboardInterrupt handler).
        first = subprocess.Popen(command, cwd=CHECKOUT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        wait_until(lambda: len(node.get("/abscess-node/jobs")) >= 2, 300, "two backfilled jobs")
        time.sleep(1)  # it would queue a third now if it did not wait for the queue
        first.send_signal(signal.SIGINT)
        _, stderr = first.communicate(timeout=60)
        assert first.returncode == 130, stderr
        assert "run the same command again" in stderr
        queued_before = len(node.get("/abscess-node/jobs"))
        assert queued_before == 2, node.get("/abscess-node/jobs")

        # The node restarted with a worker (same storage, same job store).
        node.stop()
        config["AbscessNode"]["WorkerCount"] = 1
        node = OrthancProcess(config, tmp_path).start()

        # The same command again: continues with the studies that have no job yet, and waits for them.
        second = subprocess.run(command, cwd=CHECKOUT, capture_output=True, text=True, timeout=900)
        assert second.returncode == 0, second.stderr
        assert (f"backfill: {len(ARCHIVE)} matching studies in Orthanc, {queued_before} already had a job, "
                f"{len(ARCHIVE) - queued_before} queued") in second.stdout, second.stdout
        assert "processed" in second.stderr  # the progress bar
        for study_uid in archive:
            node.wait_for_job(study_uid, timeout=300)

        jobs = node.get("/abscess-node/jobs", limit=100)
        per_study = {}
        for job in jobs:
            per_study.setdefault(job["study_uid"], []).append(job)
        assert set(per_study) == set(archive), "only the CT studies since 2019 are backfilled"
        for study_uid, study_jobs in per_study.items():
            assert len(study_jobs) == 1, f"{archive[study_uid]} processed {len(study_jobs)} times"
            (job,) = study_jobs
            assert job["state"] == "done" and job["reason"] == "backfill" and job["priority"] == PRIORITY_BACKFILL, job

        # Nothing left: a third run queues nothing.
        third = subprocess.run(command, cwd=CHECKOUT, capture_output=True, text=True, timeout=120)
        assert third.returncode == 0 and f"{len(ARCHIVE)} already had a job, 0 queued" in third.stdout, third.stdout
    finally:
        node.stop()

"""Faults are normal: real signals against a real node, and every study ends done exactly once.

Each test starts its own node (a real Orthanc with the plugin), injects one fault with a real
signal or a real resource limit, and checks what a radiologist and an admin would: the job's
end state and attempts, one SEG and one set of SRs in the study, one entry in the case index,
no orphan process, no scratch data left behind. Marker ``faults`` (part of ``make test``).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tooling.convert import StudyInfo, volume_to_ct_series, write_series
from tooling.orthanc_harness import OrthancProcess

pytestmark = pytest.mark.faults


def pids_of(pattern: str) -> list[int]:
    found = subprocess.run(["pgrep", "-f", "--", pattern], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def worker_pid(node: OrthancProcess, name: str = "worker-0") -> int:
    pids = pids_of(f"worker --settings {node.directory / 'work' / name}.settings.json")
    assert len(pids) == 1, f"{name}: {pids}"
    return pids[0]


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_until(condition, timeout: float, what: str, period: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(period)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def running_in_stage(node: OrthancProcess, study_uid: str, stage: str):
    jobs = node.get("/abscess-node/jobs", study=study_uid)
    return next((job for job in jobs if job["state"] == "running" and job["stage"] == stage), None)


def send(node: OrthancProcess, ct_crop, tmp_path: Path, seed: str, slices: int = 12, size: int = 64) -> str:
    datasets = volume_to_ct_series(ct_crop(slices, size=size), (2.0, 1.0, 1.0), uid_seed=seed,
                                   info=StudyInfo(patient_id=seed.upper()))
    write_series(datasets, tmp_path / seed)
    node.storescu(tmp_path / seed)
    return datasets[0].StudyInstanceUID


def our_objects(node: OrthancProcess, study_uid: str) -> Counter:
    """How many SEG / measurement SR / similar-cases SR instances the study holds."""
    orthanc_id = node.http.post(node.url + "/tools/lookup", data=study_uid, timeout=30).json()[0]["ID"]
    counted: Counter = Counter()
    for series in node.get(f"/studies/{orthanc_id}/series"):
        tags = series["MainDicomTags"]
        if tags.get("Modality") in ("SEG", "SR"):
            counted[(tags["Modality"], tags.get("SeriesNumber", ""))] += len(series["Instances"])
    return counted


def assert_exactly_once(node: OrthancProcess, study_uid: str) -> None:
    objects = our_objects(node, study_uid)
    assert sorted(objects.values()) == [1, 1, 1], objects  # one SEG, one measurement SR, one similar-cases SR
    with sqlite3.connect(node.directory / "index" / "index.sqlite") as index:
        assert index.execute("select count(*) from studies where study_uid = ?", [study_uid]).fetchone()[0] == 1
        assert index.execute("select count(distinct slice_index) = count(*) from slices where study_uid = ? "
                             "and live = 1", [study_uid]).fetchone()[0] == 1


SLOW = {"ChunkSlices": 4, "InferenceBatchSize": 1}
"""Chunks of 4 slices: segmenting 150 slices takes long enough to be interrupted."""


def test_worker_killed_mid_segmentation_is_rerun_at_once(start_node, ct_crop, tmp_path):
    node = start_node("kill-worker", SLOW)
    study_uid = send(node, ct_crop, tmp_path, "kill-worker", slices=150)
    job = wait_until(lambda: running_in_stage(node, study_uid, "segment"), 300, "segmentation to start")
    scratch = node.directory / "work" / f"job-{job['id']}"
    assert scratch.exists()
    killed_at = time.monotonic()
    os.kill(worker_pid(node), signal.SIGKILL)  # the OOM killer, a segfault in a native library
    done = node.wait_for_job(study_uid, timeout=600)
    assert done["state"] == "done" and done["attempts"] == 2, done
    assert "died" in done["attempt_errors"][0]["error"]
    print(f"worker SIGKILLed in segmentation: study done {time.monotonic() - killed_at:.1f} s later")
    assert not scratch.exists()
    assert_exactly_once(node, study_uid)


def test_orthanc_killed_mid_job_then_restarted_ends_done_once(start_node, ct_crop, tmp_path):
    node = start_node("kill-orthanc", SLOW)
    study_uid = send(node, ct_crop, tmp_path, "kill-orthanc", slices=150)
    wait_until(lambda: running_in_stage(node, study_uid, "segment"), 300, "segmentation to start")
    children = pids_of(f"--settings {node.directory / 'work'}")
    assert len(children) == 2  # the worker and the similar-cases service
    killed_at = time.monotonic()
    os.kill(node.process.pid, signal.SIGKILL)
    node.process.wait()
    wait_until(lambda: not pids_of(f"--settings {node.directory / 'work'}"), 20, "the orphans to die with Orthanc")
    restarted = OrthancProcess(node.config, node.directory).start()
    try:
        done = restarted.wait_for_job(study_uid, timeout=600)
        assert done["state"] == "done" and done["attempts"] == 2, done
        assert_exactly_once(restarted, study_uid)
        print(f"Orthanc SIGKILLed in segmentation, restarted: study done {time.monotonic() - killed_at:.1f} s "
              f"after the kill, objects {dict(our_objects(restarted, study_uid))}")
    finally:
        restarted.stop()
    assert not pids_of(f"--settings {node.directory / 'work'}")


def test_a_stopped_worker_loses_its_job_and_changes_nothing_when_resumed(start_node, ct_crop, tmp_path):
    node = start_node("stop-worker", {**SLOW, "WorkerCount": 2, "LeaseSeconds": 8, "HeartbeatSeconds": 2})
    study_uid = send(node, ct_crop, tmp_path, "stop-worker", slices=150)
    job = wait_until(lambda: running_in_stage(node, study_uid, "segment"), 300, "segmentation to start")
    frozen = worker_pid(node, job["worker"])
    stopped_at = time.monotonic()
    os.kill(frozen, signal.SIGSTOP)  # a hung worker: alive, silent
    try:
        taken = wait_until(lambda: next((j for j in node.get("/abscess-node/jobs", study=study_uid)
                                         if j["state"] == "running" and j["worker"] != job["worker"]), None),
                           120, "another worker to take the job")
        print(f"SIGSTOP: job taken over by {taken['worker']} {time.monotonic() - stopped_at:.1f} s after the stop")
        done = node.wait_for_job(study_uid, timeout=600)
        assert done["state"] == "done" and done["worker"] == taken["worker"] and done["attempts"] == 2
        print(f"SIGSTOP: study done {time.monotonic() - stopped_at:.1f} s after the stop")
    finally:
        os.kill(frozen, signal.SIGCONT)
    log = node.directory / "logs" / f"{job['worker']}.log"
    wait_until(lambda: "stopping without writing" in log.read_text() or "lease lost" in log.read_text(), 60,
               "the resumed worker to notice it lost the job")
    time.sleep(3)
    assert node.get(f"/abscess-node/jobs/{done['id']}")["state"] == "done"
    assert_exactly_once(node, study_uid)


def test_a_poison_study_fails_after_max_attempts(start_node, ct_crop, tmp_path):
    node = start_node("poison", {**SLOW, "MaxAttempts": 3})
    study_uid = send(node, ct_crop, tmp_path, "poison", slices=150)
    for attempt in range(1, 4):
        wait_until(lambda: (j := running_in_stage(node, study_uid, "segment")) and j["attempts"] == attempt, 300,
                   f"attempt {attempt}")
        os.kill(worker_pid(node), signal.SIGKILL)  # the study crashes its worker, every time
    failed = node.wait_for_job(study_uid, timeout=120)
    assert failed["state"] == "failed" and failed["attempts"] == 3
    print(f"poison: failed after {failed['attempts']} attempts: {failed['error'][:160]}")
    assert len(failed["attempt_errors"]) == 3 and "failed 3 times (MaxAttempts=3)" in failed["error"]
    time.sleep(3)
    assert node.get(f"/abscess-node/jobs/{failed['id']}")["state"] == "failed"  # not retried forever
    assert our_objects(node, study_uid) == Counter()


def test_a_job_over_its_time_limit_is_killed_and_failed(start_node, ct_crop, tmp_path):
    # A hung worker (stopped, so no progress however fast the machine) holding a long lease: only the time
    # limit can end the attempt.
    node = start_node("timeout", {**SLOW, "JobTimeoutSeconds": 10, "MaxAttempts": 1, "LeaseSeconds": 600})
    study_uid = send(node, ct_crop, tmp_path, "timeout", slices=150)
    job = wait_until(lambda: running_in_stage(node, study_uid, "segment"), 300, "segmentation to start")
    hung = worker_pid(node, job["worker"])
    os.kill(hung, signal.SIGSTOP)
    failed = node.wait_for_job(study_uid, timeout=120)
    assert not pid_alive(hung)
    assert failed["state"] == "failed" and "exceeded JobTimeoutSeconds=10" in failed["error"]
    print(f"time limit: {failed['error'][:160]}")
    healthy = send(node, ct_crop, tmp_path, "after-timeout")  # the restarted worker takes the next study
    assert node.wait_for_job(healthy, timeout=300)["state"] == "done"


def test_a_burst_of_20_studies_from_4_senders_is_processed_once_each(start_node, ct_crop, tmp_path):
    node = start_node("burst", {"WorkerCount": 2})
    studies = []
    folders = []
    for number in range(20):
        datasets = volume_to_ct_series(ct_crop(12, z0=number), (2.0, 1.0, 1.0), uid_seed=f"burst-{number}",
                                       info=StudyInfo(patient_id=f"BURST-{number}"))
        folder = tmp_path / f"burst-{number}"
        write_series(datasets, folder)
        studies.append(datasets[0].StudyInstanceUID)
        folders.append(folder)
    peak = {"rss_mb": 0.0}
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.5):
            pids = [node.process.pid, *pids_of(f"--settings {node.directory / 'work'}")]
            total = 0
            for pid in pids:
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                total += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
            peak["rss_mb"] = max(peak["rss_mb"], total / 1024)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    senders = [subprocess.Popen(["storescu", "-aet", f"PACS{i}", "-aec", node.aet, "+sd", "+r", "127.0.0.1",
                                 str(node.dicom_port), *map(str, folders[i::4])], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
               for i in range(4)]
    for sender in senders:
        _, error = sender.communicate(timeout=300)
        assert sender.returncode == 0 and "Store Failed" not in error, error
    finished = [node.wait_for_job(uid, timeout=900) for uid in studies]
    elapsed = time.monotonic() - started
    sampling.set()
    sampler.join(5)
    assert all(job["state"] == "done" for job in finished), [j["state"] for j in finished]
    jobs = node.get("/abscess-node/jobs", limit=1000)
    processed = Counter(job["study_uid"] for job in jobs if job["state"] == "done")
    assert all(processed[uid] == 1 for uid in studies), processed  # no study processed twice
    for uid in studies:
        assert sorted(our_objects(node, uid).values()) == [1, 1, 1]
    errors = [line for line in node.log_path.read_text().splitlines() if line.startswith("E")]
    assert errors == [], errors[:5]
    print(f"burst: 20 studies in {elapsed:.1f} s = {20 / elapsed * 60:.1f} studies/min with 2 workers; "
          f"peak RSS of Orthanc + children {peak['rss_mb']:.0f} MB")


def test_a_corrupt_index_database_is_quarantined_and_rebuilt(start_node, ct_crop, tmp_path):
    node = start_node("corrupt")
    first = send(node, ct_crop, tmp_path, "corrupt-first")
    assert node.wait_for_job(first, timeout=300)["state"] == "done"
    database = node.directory / "index" / "index.sqlite"
    with open(database, "r+b") as handle:  # a disk fault: the header is garbage
        handle.write(b"\xde\xad\xbe\xef" * 64)
    second = send(node, ct_crop, tmp_path, "corrupt-second", slices=12)
    assert node.wait_for_job(second, timeout=300)["state"] == "done"
    quarantined = list(node.directory.glob("index.corrupt-*"))
    assert quarantined and (quarantined[0] / "index.sqlite").exists()
    reindexed = wait_until(lambda: [j for j in node.get("/abscess-node/jobs", study=first)
                                    if j["reason"] == "reindex" and j["state"] == "done"], 300, "the re-index job")
    assert reindexed
    with sqlite3.connect(database) as index:
        assert {row[0] for row in index.execute("select study_uid from studies")} == {first, second}
    print(f"corrupt index: quarantined to {quarantined[0].name}, {len(reindexed)} re-index job(s) done")


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs as the workers' scratch space (a full disk without filling the machine's)."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_disk_fails_the_job_clearly_and_the_node_keeps_running(start_node, ct_crop, tmp_path, small_disk):
    node = start_node("disk-full", {"WorkDirectory": str(small_disk), "MaxAttempts": 1})
    big = send(node, ct_crop, tmp_path, "disk-full", slices=120, size=160)  # ~6 MB of DICOM
    failed = node.wait_for_job(big, timeout=300)
    assert failed["state"] == "failed" and "disk full" in failed["error"] and str(small_disk) in failed["error"]
    print(f"disk full: {failed['error'][:200]}")
    assert not any(small_disk.glob("job-*"))  # the partial download is gone
    small = send(node, ct_crop, tmp_path, "disk-ok")
    assert node.wait_for_job(small, timeout=300)["state"] == "done"

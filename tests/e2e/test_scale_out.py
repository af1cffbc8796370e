"""Scale-out on PostgreSQL, with real parts on one machine: two Orthancs, two remote workers.

A real PostgreSQL 15 holds Orthanc's index and files (Debian's ``orthanc-postgresql`` 4.0,
``"Lock": false``), the job queue and the case index. One Orthanc ingests (our plugin enqueues
its stable studies, it starts no worker); a second one reads the same database (our plugin
with ``Enabled`` false: no queueing, its own similar-cases service and index cache). Two
workers run as separate processes with their own work and cache directories and a config
file, reaching Orthanc only over REST and the databases only by URL, as on other machines.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest

from dicom_node.config import CHECKOUT
from dicom_node.private_files import create_secret, write_private_file
from tooling.convert import StudyInfo, volume_to_ct_series, write_series
from tooling.orthanc_harness import ADMIN, OrthancProcess, scratch_node_configuration, wait_until
from tooling.postgres import PostgresServer, orthanc_on_postgres

BURST = 10
LEASE = {"LeaseSeconds": 8, "HeartbeatSeconds": 2}


class Cluster:
    """The two Orthancs, the two workers (restartable by name) and the database URL."""

    def __init__(self, directory: Path, server: PostgresServer, weights_path: Path) -> None:
        self.directory = directory
        self.abscess_url = server.create_database("abscess")
        server.create_database("orthanc")
        create_secret(directory / "pseudonym.key")  # the node's pseudonym secret (make install creates it)
        shared = {"WeightsPath": str(weights_path), "JobsDatabase": self.abscess_url,
                  "IndexDatabase": self.abscess_url, "WorkerCount": 0, "ChunkSlices": 4, "InferenceBatchSize": 1,
                  "SeriesRules": {"RequireNeckCoverage": False},  # 64 x 64 crops of the neck CT
                  "AllowedSimilarCasesUsers": [ADMIN], "PseudonymSecretPath": str(directory / "pseudonym.key"),
                  **LEASE}
        # the ingest Orthanc also starts one worker of its own: plugin-started and remote workers mix
        self.ingest = self._orthanc("ingest", server, {**shared, "Enabled": True, "WorkerCount": 1})
        self.reader = self._orthanc("reader", server, {**shared, "Enabled": False})
        self.workers: dict[str, subprocess.Popen] = {}
        self.worker_settings = shared

    def _orthanc(self, name: str, server: PostgresServer, abscess: dict[str, Any]) -> OrthancProcess:
        directory = self.directory / name
        # StableAge 3 s: on two shared cores a study must not look complete between two of its instances
        config = orthanc_on_postgres(scratch_node_configuration(directory, abscess, StableAge=3), server, "orthanc")
        return OrthancProcess(config, directory).start(timeout=120)

    def start_worker(self, name: str) -> subprocess.Popen:
        """A remote worker: its own folders, a config file, the ingest's REST API with a 0600 password file."""
        home = self.directory / name
        password_file = home / "orthanc-password"
        write_private_file(password_file, self.ingest.credentials[1])
        secret = home / "pseudonym.key"  # the node's secret, copied to the worker machine
        if not secret.exists():
            write_private_file(secret, (self.directory / "pseudonym.key").read_text())
        section = {**self.worker_settings, "OrthancUrl": self.ingest.url, "OrthancUser": ADMIN,
                   "OrthancPasswordFile": str(password_file), "PseudonymSecretPath": str(secret),
                   "WorkDirectory": str(home / "work"), "IndexDirectory": str(home / "index-cache"),
                   "LogDirectory": str(home / "logs"), "Device": "cpu"}
        (home / "worker.json").write_text(json.dumps({"AbscessNode": section}, indent=1))
        log_file = home / "worker.log"
        log_file.unlink(missing_ok=True)
        with open(home / "worker.stderr.log", "ab") as stderr:  # what escapes logging (a crash at start)
            process = subprocess.Popen(
                [str(CHECKOUT / ".venv" / "bin" / "python"), "-m", "dicom_node", "worker", "--config",
                 str(home / "worker.json"), "--name", name, "--log-file", str(log_file)],
                cwd=str(CHECKOUT), stdout=stderr, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.workers[name] = process
        wait_until(lambda: log_file.exists() and "ready" in log_file.read_text(), 180, f"{name} to be ready")
        return process

    def plugin_worker_pids(self) -> list[int]:
        """Process ids of the workers the ingest Orthanc's plugin started (its children running a worker)."""
        threads = Path(f"/proc/{self.ingest.process.pid}/task").iterdir()  # any thread may have spawned it
        children = " ".join((thread / "children").read_text() for thread in threads)
        return [int(pid) for pid in children.split()
                if b"worker" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]

    def stop(self) -> None:
        for process in self.workers.values():
            if process.poll() is None:
                process.terminate()
                process.wait(20)
        for node in (self.reader, self.ingest):
            node.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, postgres_server: PostgresServer,
            weights_path: Path) -> Iterator[Cluster]:
    if not Path("/usr/share/orthanc/plugins/libOrthancPostgreSQLIndex.so").exists():
        pytest.fail("Debian's orthanc-postgresql plugin is not installed: run `make install`")
    started = Cluster(tmp_path_factory.mktemp("scale-out"), postgres_server, weights_path)
    try:
        started.start_worker("worker-a")
        started.start_worker("worker-b")
        yield started
    finally:
        started.stop()


def send(node: OrthancProcess, ct_crop, directory: Path, seed: str, slices: int, z0: int = 0) -> str:
    datasets = volume_to_ct_series(ct_crop(slices, size=64, z0=z0), (2.0, 1.0, 1.0), uid_seed=seed,
                                   info=StudyInfo(patient_id=seed.upper()))
    write_series(datasets, directory / seed)
    node.storescu(directory / seed)
    return datasets[0].StudyInstanceUID


def done_jobs(node: OrthancProcess, study_uid: str) -> list[dict[str, Any]]:
    """The study's jobs that ended done (the re-runs our own SEG/SR trigger end skipped: content unchanged)."""
    return [job for job in node.get("/abscess-node/jobs", study=study_uid) if job["state"] == "done"]


def our_series(node: OrthancProcess, study_uid: str) -> Counter:
    """SEG and SR instances in the study, seen through this Orthanc's DICOMweb (QIDO-RS)."""
    counted: Counter = Counter()
    for series in node.get(f"/dicom-web/studies/{study_uid}/series"):
        modality = series["00080060"]["Value"][0]
        if modality in ("SEG", "SR"):
            counted[modality] += int(series["00201209"]["Value"][0])
    return counted


def indexed_rows(url: str, study_uid: str) -> tuple[int, int]:
    with psycopg.connect(url) as connection:
        studies = connection.execute("select count(*) from index_studies where study_uid = %s", [study_uid]).fetchone()
        slices = connection.execute("select count(*) from index_slices where study_uid = %s", [study_uid]).fetchone()
    return studies[0], slices[0]


def test_a_burst_of_10_studies_is_processed_once_each_and_the_reader_serves_the_segs(cluster, ct_crop, tmp_path):
    study_uids = [send(cluster.ingest, ct_crop, tmp_path, f"burst-{number}", slices=12, z0=4 * number)
                  for number in range(BURST)]
    finished = {uid: cluster.ingest.wait_for_job(uid, timeout=900) for uid in study_uids}
    assert all(job["state"] == "done" for job in finished.values()), finished
    for uid in study_uids:
        jobs = done_jobs(cluster.ingest, uid)
        assert len(jobs) == 1 and jobs[0]["attempts"] == 1, cluster.ingest.get("/abscess-node/jobs", study=uid)
        assert our_series(cluster.reader, uid) == Counter({"SEG": 1, "SR": 2})  # via the reader's DICOMweb
        assert indexed_rows(cluster.abscess_url, uid) == (1, 12)
    workers = {job["worker"] for job in finished.values()}
    assert len(workers) >= 2 and workers <= {"worker-a", "worker-b", plugin_worker_name(cluster)}, workers
    assert cluster.reader.get("/abscess-node/jobs", study=study_uids[0]) == cluster.ingest.get(
        "/abscess-node/jobs", study=study_uids[0])  # one queue, seen from both Orthancs


def plugin_worker_name(cluster: Cluster) -> str:
    """The name the ingest Orthanc's own worker claims jobs under (host:port/worker-0 on a shared store)."""
    return f"{socket.gethostname()}:{urlsplit(cluster.ingest.url).port}/worker-0"


def test_the_plugin_started_worker_shares_the_queue_with_the_remote_ones(cluster, ct_crop, tmp_path):
    remote = [process.pid for process in cluster.workers.values()]
    for pid in remote:  # only the plugin's worker may claim meanwhile
        os.kill(pid, signal.SIGSTOP)
    try:
        study_uid = send(cluster.ingest, ct_crop, tmp_path, "plugin-worker", slices=12, z0=60)
        done = cluster.ingest.wait_for_job(study_uid, timeout=600)
    finally:
        for pid in remote:
            os.kill(pid, signal.SIGCONT)
    assert done["state"] == "done" and done["worker"] == plugin_worker_name(cluster), done
    assert len(done_jobs(cluster.ingest, study_uid)) == 1
    assert our_series(cluster.reader, study_uid) == Counter({"SEG": 1, "SR": 2})
    assert indexed_rows(cluster.abscess_url, study_uid) == (1, 12)


def test_reader_and_ingest_rank_similar_cases_alike(cluster):
    studies = cluster.ingest.get("/studies")
    assert len(studies) >= 2, "the burst test indexes the studies first"
    query = studies[0]
    rankings = []
    for node in (cluster.ingest, cluster.reader):
        answer = node.http.get(f"{node.url}/abscess-node/studies/{query}/similar", params={"k": 5}, timeout=120)
        assert answer.status_code == 200, answer.text
        rankings.append([(result["study_uid"], result["rank"], result["score"]) for result in answer.json()["results"]])
    assert 2 <= len(rankings[0]) <= 5 and rankings[0] == rankings[1]  # the studies the one-neighbour table hits


def test_a_worker_killed_mid_job_loses_its_lease_and_the_other_finishes(cluster, ct_crop, tmp_path):
    plugin_workers = cluster.plugin_worker_pids()
    assert plugin_workers, "the ingest Orthanc runs no worker of its own"
    for pid in plugin_workers:  # the lease test is about a remote worker: the plugin's waits meanwhile
        os.kill(pid, signal.SIGSTOP)
    try:
        study_uid = send(cluster.ingest, ct_crop, tmp_path, "killed-worker", slices=150)
        job = wait_until(lambda: next((j for j in cluster.ingest.get("/abscess-node/jobs", study=study_uid)
                                       if j["state"] == "running" and j["stage"] == "segment"), None),
                         300, "segmentation to start")
    finally:
        for pid in plugin_workers:
            os.kill(pid, signal.SIGCONT)
    victim = job["worker"]
    os.kill(cluster.workers[victim].pid, signal.SIGKILL)  # a machine lost, an OOM kill
    cluster.workers[victim].wait()
    done = cluster.ingest.wait_for_job(study_uid, timeout=600)
    assert done["state"] == "done" and done["attempts"] == 2 and done["worker"] != victim, done
    assert f"worker {victim} lost its lease in stage segment" in done["attempt_errors"][0]["error"]
    assert our_series(cluster.reader, study_uid) == Counter({"SEG": 1, "SR": 2})
    assert indexed_rows(cluster.abscess_url, study_uid) == (1, 150)
    shutil.rmtree(cluster.directory / victim / "work", ignore_errors=True)  # the lost machine's disk
    cluster.start_worker(victim)

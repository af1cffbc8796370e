"""A remote worker's configuration (``python -m dicom_node worker --config``): what it needs, what it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dicom_node.__main__ import main
from dicom_node.private_files import write_private_file


def worker_config(tmp_path: Path, **section) -> Path:
    path = tmp_path / "worker.json"
    path.write_text(json.dumps({"AbscessNode": section}))
    return path


@pytest.mark.parametrize(("section", "message"), [
    ({}, "AbscessNode.OrthancUrl is required for a worker started with --config"),
    ({"OrthancUrl": "http://ingest:8042", "JobsDatabase": "postgresql://abscess:pw@db/abscess"},
     "AbscessNode.JobsDatabase: the URL carries a password"),
    ({"OrthancUrl": "http://ingest:8042", "OrthancPasswordFile": "missing-password"}, "missing-password"),
])
def test_a_remote_worker_refuses_an_incomplete_config(tmp_path: Path, capsys, section, message):
    assert main(["worker", "--config", str(worker_config(tmp_path, **section))]) == 2
    assert message in capsys.readouterr().err


def test_a_remote_worker_refuses_a_password_file_others_can_read(tmp_path: Path, capsys):
    password_file = tmp_path / "password"
    write_private_file(password_file, "secret")
    password_file.chmod(0o644)
    config = worker_config(tmp_path, OrthancUrl="http://ingest:8042", OrthancPasswordFile=str(password_file))
    assert main(["worker", "--config", str(config)]) == 2
    error = capsys.readouterr().err
    assert "is readable by other users: chmod 600 it" in error and "secret" not in error


WATCHED_JOB = """
import sys, time
from dicom_node.config import NodeConfig
from dicom_node.jobs import open_job_store
from dicom_node.worker import heartbeating

config = NodeConfig.from_section({"JobTimeoutSeconds": 10, "LeaseSeconds": 6, "HeartbeatSeconds": 1})
store = open_job_store(sys.argv[1])
store.enqueue("hung-study", "1.9")
job, lease = store.claim("remote-1", config.lease_seconds)
with heartbeating(store, lease, config, own_watchdog=True):
    time.sleep(60)  # a hung pipeline: the heartbeat thread would renew the lease forever
"""


def test_a_remote_worker_ends_itself_when_a_job_outlives_its_time_limit(tmp_path: Path):
    import subprocess
    import sys
    import time

    from dicom_node.config import CHECKOUT
    from dicom_node.jobs import open_job_store
    from dicom_node.worker import EXIT_OVER_TIME

    jobs = tmp_path / "jobs.sqlite"
    ended = subprocess.run([sys.executable, "-c", WATCHED_JOB, str(jobs)], cwd=CHECKOUT, capture_output=True,
                           text=True, timeout=50)
    assert ended.returncode == EXIT_OVER_TIME, ended.stderr[-2000:]
    assert "exceeded JobTimeoutSeconds=10" in ended.stderr
    store = open_job_store(jobs)
    time.sleep(max(0.0, store.running_jobs()[0]["lease_expires"] - time.time()) + 0.1)
    assert store.reap() == [{"id": 1, "worker": "remote-1", "state": "queued"}]  # no more heartbeats: it lapses

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

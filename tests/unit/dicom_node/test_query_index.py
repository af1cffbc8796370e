"""Similar-case queries read a long-lived index that never waits for the workers' writer.

Real parts: the service's C-FIND handler, the real case index (SQLite + FAISS) in a temporary
directory, the workers' exclusive file lock and a real SQLite write transaction.
"""

from __future__ import annotations

import fcntl
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset

from dicom_node.config import NodeConfig
from dicom_node.similar.query import open_index, query_index
from dicom_node.similar.request import PENDING, SUCCESS
from dicom_node.similar.service import SimilarCaseService
from index.records import SliceRecord, StudyRecord
from tooling.synthetic_embeddings import ClusteredEmbeddings

DIM, SLICES = 16, 10
VIEWER = "VIEWER"


def study_uid(number: int) -> str:
    return f"1.2.826.0.1.3680043.77.{number}"


def index_study(index, number: int, distribution: ClusteredEmbeddings) -> None:
    uid = study_uid(number)
    index.replace_study(StudyRecord(uid, series_uid=f"{uid}.1", patient_id=f"P{number}"),
                        [SliceRecord(i, f"{uid}.1.{i}") for i in range(SLICES)], distribution.sample(SLICES))


def query(uid: str) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = uid
    return identifier


def answered_uids(service: SimilarCaseService, uid: str) -> list[str]:
    responses = list(service.find(query(uid), VIEWER))
    assert [status.Status for status, _ in responses] == [PENDING] * (len(responses) - 1) + [SUCCESS]
    return [answer.StudyInstanceUID for _, answer in responses[:-1]]


@pytest.fixture
def service_and_index(tmp_path: Path):
    config = NodeConfig(index_directory=tmp_path / "index", jobs_database=tmp_path / "jobs.sqlite",
                        allowed_similar_cases_aets=(VIEWER,), similar_cases_top_k=3)
    distribution = ClusteredEmbeddings(DIM, np.random.default_rng(3), clusters=6, noise=0.5)
    with open_index(config.index_directory) as index:
        for number in range(6):
            index_study(index, number, distribution)
    return SimilarCaseService(config), config, distribution


def test_a_query_is_answered_while_a_writer_holds_the_lock_and_the_database(service_and_index):
    service, config, distribution = service_and_index
    assert len(answered_uids(service, study_uid(0))) == 3  # opens the long-lived index
    holding, release = threading.Event(), threading.Event()

    def worker_mid_commit() -> None:
        """A worker that indexed study 6 and is committing the next one: file lock and SQLite write lock held."""
        with open_index(config.index_directory) as index:
            index_study(index, 6, distribution)
            database = sqlite3.connect(config.index_directory / "index.sqlite", isolation_level=None)
            database.execute("BEGIN IMMEDIATE")
            database.execute("UPDATE meta SET value = value WHERE key = 'generation'")
            holding.set()
            release.wait(60)
            database.execute("ROLLBACK")
            database.close()

    with ThreadPoolExecutor(2) as pool:
        written = pool.submit(worker_mid_commit)
        assert holding.wait(60)
        with open(config.index_directory / ".lock") as lock, pytest.raises(BlockingIOError):
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the workers' lock really is taken
        answer = pool.submit(answered_uids, service, study_uid(6))
        try:
            uids = answer.result(timeout=60)  # would time out if queries waited for the writer
            still_holding = not release.is_set()
        finally:
            release.set()
        written.result(timeout=60)
    assert still_holding and len(uids) == 3 and study_uid(6) not in uids


def test_the_long_lived_index_sees_a_study_indexed_after_it_was_opened(service_and_index):
    service, config, distribution = service_and_index
    assert len(answered_uids(service, study_uid(2))) == 3
    with open_index(config.index_directory) as index:
        index_study(index, 7, distribution)
    assert len(answered_uids(service, study_uid(7))) == 3
    with query_index(config.index_directory) as shared, query_index(config.index_directory) as again:
        assert shared is again and shared.read_only and shared.pending_vectors() == SLICES


def test_the_configured_vector_encoding_reaches_the_writer(tmp_path: Path):
    config = NodeConfig.from_section({"IndexVectorEncoding": "sq8", "IndexDirectory": str(tmp_path / "index")})
    assert config.index_vector_encoding == "sq8"
    distribution = ClusteredEmbeddings(DIM, np.random.default_rng(4), clusters=3)
    with open_index(config.index_directory, vector_encoding=config.index_vector_encoding) as index:
        index_study(index, 1, distribution)
        assert index.vector_encoding == "sq8"
    with open_index(config.index_directory) as index:  # a writer that names no encoding keeps the index's
        assert index.vector_encoding == "sq8"


def test_the_configured_ef_search_reaches_readers_and_writers(tmp_path: Path):
    config = NodeConfig.from_section({"IndexEfSearch": 48, "IndexDirectory": str(tmp_path / "index")})
    assert config.index_ef_search == 48 and NodeConfig().index_ef_search == 32
    distribution = ClusteredEmbeddings(DIM, np.random.default_rng(5), clusters=3)
    with open_index(config.index_directory, ef_search=config.index_ef_search) as index:
        index_study(index, 1, distribution)
        assert index.ef_search == 48
    with query_index(config.index_directory, ef_search=config.index_ef_search) as index:
        assert index.ef_search == 48 and index.read_only
    with pytest.raises(Exception, match="IndexEfSearch"):
        NodeConfig.from_section({"IndexEfSearch": 2})


@pytest.mark.parametrize(("given", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_node_processes_let_openmp_threads_sleep_unless_the_admin_chose(given, expected):
    import os
    import subprocess
    import sys

    environment = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    if given:
        environment["OMP_WAIT_POLICY"] = given
    printed = subprocess.run([sys.executable, "-c", "import dicom_node, os; print(os.environ['OMP_WAIT_POLICY'])"],
                             env=environment, capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parents[3])
    assert printed.stdout.strip() == expected

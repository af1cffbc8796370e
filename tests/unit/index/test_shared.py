"""The shared case index on a real PostgreSQL 15: every cache answers like the embedded index."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from index.lesions import Lesion
from index.records import SliceRecord, StudyRecord
from index.shared import SharedCaseIndex
from index.store import CaseIndex, StudyNotIndexed
from tooling.synthetic_embeddings import clustered_unit_vectors

DIM = 24
SLICES = 10


def write_study(index: CaseIndex, number: int, seed: int | None = None) -> None:
    """Index study ``number`` with seeded embeddings (a few ROI rows) and one lesion."""
    rng = np.random.default_rng(number if seed is None else seed)
    slice_embeddings = clustered_unit_vectors(SLICES, DIM, rng, clusters=3)
    roi_embeddings = np.zeros_like(slice_embeddings)
    roi_embeddings[2:5] = clustered_unit_vectors(3, DIM, rng, clusters=1)
    uid = f"1.2.826.0.9.{number}"
    index.replace_study(
        StudyRecord(uid, series_uid=uid + ".1", patient_id=f"P{number}", orthanc_study_id=f"orthanc-{number}",
                    modalities=("CT",), extra={"site": "north"}),
        [SliceRecord(i, f"{uid}.1.{i}", 2.5 * i) for i in range(SLICES)], slice_embeddings, roi_embeddings,
        [Lesion(label=1, voxel_count=50 + number, volume_ml=float(number), longest_axial_diameter_mm=9.0,
                core_mean_hu=18.0, core_sd_hu=4.0, loculi=1 + number % 2, first_slice=2, last_slice=4,
                space="retropharyngeal")])


def ranking(index: CaseIndex, study_uid: str, **options) -> list[tuple[str, float]]:
    """Top 5 with 3 neighbours per query slice (the default one neighbour reaches fewer than 5 of 8 studies)."""
    return [(hit.study_uid, round(hit.score, 5)) for hit in index.similar_studies(study_uid, top=5, k=3, **options)]


def test_every_cache_ranks_like_the_embedded_index(postgres_url: str, tmp_path: Path):
    embedded = CaseIndex.open(tmp_path / "embedded")
    ingest = SharedCaseIndex.open(tmp_path / "ingest-cache", postgres_url)
    for number in range(8):
        write_study(embedded, number)
        write_study(ingest, number)
    reader = SharedCaseIndex.open(tmp_path / "reader-cache", postgres_url)  # a query service on another machine
    query = "1.2.826.0.9.3"
    expected = ranking(embedded, query)
    assert len(expected) == 5
    assert ranking(ingest, query) == ranking(reader, query) == expected
    assert ranking(reader, query, space="roi") == ranking(embedded, query, space="roi")
    assert reader.get_study(query) == embedded.get_study(query)
    assert reader.lesions(query) == embedded.lesions(query)
    assert reader.slice_instance_uids(query) == embedded.slice_instance_uids(query)


def test_writes_reach_other_caches_through_the_change_log(postgres_url: str, tmp_path: Path):
    ingest = SharedCaseIndex.open(tmp_path / "ingest-cache", postgres_url)
    reader = SharedCaseIndex.open(tmp_path / "reader-cache", postgres_url)
    for number in range(4):
        write_study(ingest, number)
    assert reader.study_uids() == ingest.study_uids() and reader.applied_change() == 4
    write_study(ingest, 2, seed=99)  # re-indexed with new content: replaced, never doubled
    ingest.delete_study("1.2.826.0.9.1")
    assert reader.pull() == 2 and reader.applied_change() == 6
    assert reader.study_uids() == ["1.2.826.0.9.0", "1.2.826.0.9.2", "1.2.826.0.9.3"]
    assert reader.vector_count() == 3 * SLICES
    np.testing.assert_array_equal(reader.study_embeddings("1.2.826.0.9.2")[1],
                                  ingest.study_embeddings("1.2.826.0.9.2")[1])
    assert reader.pull() == 0  # nothing new
    with pytest.raises(StudyNotIndexed):
        reader.delete_study("1.2.826.0.9.1")


def test_a_lost_cache_is_rebuilt_and_a_foreign_cache_is_emptied(postgres_server, postgres_url: str, tmp_path: Path):
    index = SharedCaseIndex.open(tmp_path / "cache", postgres_url)
    for number in range(3):
        write_study(index, number)
    expected = ranking(index, "1.2.826.0.9.0")
    index.close()
    for path in (tmp_path / "cache").iterdir():  # the machine lost its cache (a new disk)
        path.unlink()
    rebuilt = SharedCaseIndex.open(tmp_path / "cache", postgres_url)
    assert ranking(rebuilt, "1.2.826.0.9.0") == expected and rebuilt.check_consistency()[0].ok
    rebuilt.close()
    other = SharedCaseIndex.open(tmp_path / "cache", postgres_server.create_database())  # pointed at another index
    assert other.study_uids() == [] and other.vector_count() == 0


def test_concurrent_writers_leave_one_gapless_ordered_log(postgres_url: str, tmp_path: Path):
    errors: list[BaseException] = []

    def write_range(name: str, numbers: range) -> None:
        try:
            with SharedCaseIndex.open(tmp_path / name, postgres_url) as index:
                for number in numbers:
                    write_study(index, number)
        except BaseException as error:  # noqa: BLE001 - collected for the assertion
            errors.append(error)

    writers = [threading.Thread(target=write_range, args=(f"w{i}", range(i * 5, i * 5 + 5))) for i in range(2)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(120)
    assert errors == []
    reader = SharedCaseIndex.open(tmp_path / "reader", postgres_url)
    assert len(reader.study_uids()) == 10 and reader.applied_change() == 10
    assert reader.check_consistency()[0].ok

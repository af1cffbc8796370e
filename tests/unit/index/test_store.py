"""The case index store on a real SQLite database and real FAISS indexes (seeded data)."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import faiss
import numpy as np
import pytest

from index.lesions import Lesion
from index.metrics import knn_recall
from index.store import (
    CaseIndex,
    DimensionMismatch,
    SliceRecord,
    StudyNotIndexed,
    StudyRecord,
)
from tooling.synthetic_embeddings import ClusteredEmbeddings, clustered_unit_vectors

DIM = 24
SLICES = 12
REPO = Path(__file__).resolve().parents[3]  # the checkout


def study_vectors(seed: int, dim: int = DIM, slices: int = SLICES) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    slice_embeddings = clustered_unit_vectors(slices, dim, rng, clusters=4)
    roi_embeddings = np.zeros_like(slice_embeddings)
    roi_embeddings[3:6] = clustered_unit_vectors(3, dim, rng, clusters=1)
    return slice_embeddings, roi_embeddings


def add_study(index: CaseIndex, number: int, seed: int | None = None, **study_fields) -> np.ndarray:
    slice_embeddings, roi_embeddings = study_vectors(number if seed is None else seed)
    uid = f"1.2.826.0.1.{number}"
    index.replace_study(
        StudyRecord(uid, series_uid=uid + ".1", **study_fields),
        [SliceRecord(i, f"{uid}.1.{i}", 2.5 * i) for i in range(SLICES)],
        slice_embeddings,
        roi_embeddings,
        [Lesion(label=1, voxel_count=100, volume_ml=float(number), longest_axial_diameter_mm=10.0, core_mean_hu=20.0,
                core_sd_hu=5.0, loculi=1 + number % 3, first_slice=0, last_slice=1, space="parapharyngeal")],
    )
    return slice_embeddings


def all_pairs(hits):
    return [(hit.study_uid, hit.slice_index) for row in hits for hit in row]


@pytest.fixture
def filled(tmp_path):
    index = CaseIndex.open(tmp_path / "index", hnsw_m=16, ef_construction=80, ef_search=64)
    vectors = {number: add_study(index, number) for number in range(8)}
    yield index, vectors
    index.close()


def test_hnsw_recall_at_10_against_exact_flat_index(tmp_path):
    distribution = ClusteredEmbeddings(32, np.random.default_rng(7), clusters=40, noise=0.8)
    vectors = distribution.sample(4000)
    index = CaseIndex.open(tmp_path, hnsw_m=16, ef_construction=100, ef_search=64)
    for number in range(40):
        rows = vectors[number * 100 : (number + 1) * 100]
        index.replace_study(StudyRecord(f"2.{number}"), [SliceRecord(i) for i in range(100)], rows)
    queries = distribution.sample(200)

    approximate = index.search_slices(queries, k=10)
    exact = faiss.IndexFlatIP(32)
    exact.add(vectors)
    _, exact_rows = exact.search(queries, 10)
    # Row r of `vectors` is slice r % 100 of study 2.(r // 100).
    to_row = {(f"2.{n}", s): n * 100 + s for n in range(40) for s in range(100)}
    approximate_rows = np.array([[to_row[(h.study_uid, h.slice_index)] for h in row] for row in approximate])

    assert knn_recall(approximate_rows, exact_rows, 10) >= 0.95
    index.close()


def test_search_returns_study_slice_and_cosine(filled):
    index, vectors = filled
    (hits,) = index.search_slices(vectors[3][5], k=3)
    assert (hits[0].study_uid, hits[0].slice_index) == ("1.2.826.0.1.3", 5)
    assert hits[0].sop_instance_uid == "1.2.826.0.1.3.1.5"
    assert hits[0].similarity == pytest.approx(1.0, abs=1e-5)
    assert [h.similarity for h in hits] == sorted((h.similarity for h in hits), reverse=True)


def test_query_study_is_excluded(filled):
    index, vectors = filled
    hits = index.search_slices(vectors[3], k=20, exclude_study_uid="1.2.826.0.1.3")
    assert all(len(row) == 20 for row in hits)
    assert "1.2.826.0.1.3" not in {uid for uid, _ in all_pairs(hits)}


def test_reindexing_replaces_without_duplicates_and_leaves_tombstones(filled):
    index, vectors = filled
    old = vectors[2]
    new = add_study(index, 2, seed=1002, study_description="re-processed")

    assert index.vector_count("slice") == 8 * SLICES
    assert index.vector_count("slice", live_only=False) == 9 * SLICES
    assert index.tombstone_count("slice") == SLICES
    assert index.study_uids().count("1.2.826.0.1.2") == 1
    assert index.get_study("1.2.826.0.1.2").study_description == "re-processed"
    np.testing.assert_allclose(index.study_embeddings("1.2.826.0.1.2")[1], new, atol=1e-6)
    # The old vectors are never returned; the new ones are, once each.
    (stale,) = index.search_slices(old[0], k=8 * SLICES)
    pairs = [(h.study_uid, h.slice_index) for h in stale]
    assert len(pairs) == len(set(pairs)) == 8 * SLICES
    assert all(h.similarity < 0.999 for h in stale if h.study_uid == "1.2.826.0.1.2")
    (fresh,) = index.search_slices(new[0], k=1)
    assert (fresh[0].study_uid, fresh[0].slice_index) == ("1.2.826.0.1.2", 0)


def test_compaction_drops_tombstones(tmp_path):
    index = CaseIndex.open(tmp_path, compact_fraction=0.3)
    for number in range(4):
        add_study(index, number)
    add_study(index, 0, seed=100)  # 12 of 60 dead: below the threshold
    assert index.tombstone_count() == SLICES
    add_study(index, 1, seed=101)  # 24 of 72 dead: above -> compaction
    assert index.tombstone_count() == 0
    assert index.vector_count(live_only=False) == index.vector_count() == 4 * SLICES
    dead_rows = index._db.execute("SELECT count(*) FROM slices WHERE live = 0").fetchone()[0]
    assert dead_rows == 0
    assert all(report.ok for report in index.check_consistency())
    index.close()


def test_delete_study(filled):
    index, vectors = filled
    index.delete_study("1.2.826.0.1.4")
    with pytest.raises(StudyNotIndexed):
        index.get_study("1.2.826.0.1.4")
    with pytest.raises(StudyNotIndexed):
        index.delete_study("1.2.826.0.1.4")
    (hits,) = index.search_slices(vectors[4][0], k=50)
    assert "1.2.826.0.1.4" not in {h.study_uid for h in hits}


def test_persistence_across_reopen(tmp_path):
    index = CaseIndex.open(tmp_path, hnsw_m=16)
    vectors = {number: add_study(index, number, study_date="20260105", modalities=("CT", "SEG")) for number in range(5)}
    before = all_pairs(index.search_slices(vectors[1], k=5))
    index.close()

    reopened = CaseIndex.open(tmp_path)
    assert reopened.dim == DIM
    assert all(report.ok for report in reopened.last_check)
    assert all_pairs(reopened.search_slices(vectors[1], k=5)) == before
    study = reopened.get_study("1.2.826.0.1.1")
    assert (study.study_date, study.modalities, study.series_uid) == ("20260105", ("CT", "SEG"), "1.2.826.0.1.1.1")
    assert reopened.lesions("1.2.826.0.1.1")[0].loculi == 2
    assert reopened.vector_count("roi") == 5 * 3
    reopened.close()


@pytest.mark.parametrize("damage", ["delete", "corrupt", "truncate"])
def test_damaged_faiss_file_is_rebuilt_from_stored_embeddings(tmp_path, damage):
    index = CaseIndex.open(tmp_path)
    vectors = {number: add_study(index, number) for number in range(4)}
    expected = all_pairs(index.search_slices(vectors[2], k=3))
    index.close()
    path = tmp_path / "slices.faiss"
    if damage == "delete":
        path.unlink()
    elif damage == "corrupt":
        path.write_bytes(b"not a faiss index" * 10)
    else:
        path.write_bytes(path.read_bytes()[:1000])

    reopened = CaseIndex.open(tmp_path)
    slice_report = reopened.last_check[0]
    assert slice_report.broken and not slice_report.ok
    assert all(report.ok for report in reopened.check_consistency())
    assert all_pairs(reopened.search_slices(vectors[2], k=3)) == expected
    reopened.close()


def test_stale_faiss_file_is_repaired(tmp_path):
    index = CaseIndex.open(tmp_path, compact_fraction=1.0)
    for number in range(3):
        add_study(index, number)
    older = (tmp_path / "slices.faiss").read_bytes()
    new_vectors = add_study(index, 3)  # the file now lags behind SQLite
    index.close()
    (tmp_path / "slices.faiss").write_bytes(older)

    reopened = CaseIndex.open(tmp_path)
    assert reopened.last_check[0].missing == SLICES
    assert all(report.ok for report in reopened.check_consistency())
    assert reopened.search_slices(new_vectors[0], k=1)[0][0].study_uid == "1.2.826.0.1.3"
    add_study(reopened, 0, seed=500)  # study 0's old vectors become tombstones
    reopened.compact()  # ... and their rows are deleted: the old file now holds unknown ids
    reopened.close()
    (tmp_path / "slices.faiss").write_bytes(older)

    rebuilt = CaseIndex.open(tmp_path)
    assert rebuilt.last_check[0].unknown == SLICES
    assert all(report.ok for report in rebuilt.check_consistency())
    assert rebuilt.vector_count("slice", live_only=False) == 4 * SLICES
    rebuilt.close()


_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    sys.path.insert(0, sys.argv[3])
    from index.lesions import Lesion
    from index.store import CaseIndex, SliceRecord, StudyRecord
    from tooling.synthetic_embeddings import ClusteredEmbeddings, clustered_unit_vectors

    directory, mode = sys.argv[1], sys.argv[2]
    index = CaseIndex.open(directory, hnsw_m=8, ef_construction=40)
    rng = np.random.default_rng(0)

    def insert(number):
        vectors = clustered_unit_vectors(12, 24, rng, clusters=3)
        rois = np.zeros_like(vectors)
        rois[2:5] = vectors[2:5]
        index.replace_study(
            StudyRecord(f"9.{number % 4}"), [SliceRecord(i) for i in range(12)], vectors, rois,
            [Lesion(1, 50, 3.0, 8.0, 20.0, 5.0, 1, 2, 4)],
        )
        print(number, flush=True)

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    for number in range(4):
        insert(number)
    if mode == "after-commit":
        index._save_indexes = die           # SQLite committed, FAISS files not written
    elif mode == "during-save":
        os.replace = die                    # temp file written, never renamed
    number = 4
    while True:
        insert(number)
        number += 1
    """
)


def assert_recovered(directory: Path, *, repaired: bool) -> None:
    index = CaseIndex.open(directory)
    if repaired:  # the FAISS files lagged behind SQLite: the check at open fixed them
        assert index.last_check[0].missing == 12 and index.last_check[1].missing == 3
    assert all(report.ok for report in index.check_consistency())
    assert index.study_uids() == [f"9.{n}" for n in range(4)]
    assert index.vector_count("slice") == 4 * 12
    assert index.vector_count("roi") == 4 * 3
    for uid in index.study_uids():
        positions, vectors = index.study_embeddings(uid)
        assert positions.tolist() == list(range(12))
        (hits,) = index.search_slices(vectors[0], k=1)
        assert (hits[0].study_uid, hits[0].slice_index) == (uid, 0)
        assert len(index.lesions(uid)) == 1
    assert index.similar_studies("9.0", top=3)
    assert not list(directory.glob("*.tmp-*"))
    index.close()


@pytest.mark.parametrize("mode", ["after-commit", "during-save", "random"])
def test_kill_9_during_insert_leaves_a_working_index(tmp_path, mode):
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    directory = tmp_path / "index"
    rounds = 3 if mode == "random" else 1
    for round_number in range(rounds):
        writer = subprocess.Popen(
            [sys.executable, str(script), str(directory), mode, str(REPO)],
            stdout=subprocess.PIPE,
            text=True,
        )
        if mode == "random":
            for _ in range(5):  # let it get going, then kill it at some point of an insert
                writer.stdout.readline()
            time.sleep(0.01 + 0.03 * round_number)
            writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=60)
        assert writer.returncode == -signal.SIGKILL
        assert_recovered(directory, repaired=mode != "random")


def test_dimension_and_shape_errors(tmp_path):
    index = CaseIndex.open(tmp_path, dim=DIM)
    with pytest.raises(DimensionMismatch):
        index.replace_study(StudyRecord("3.1"), [SliceRecord(0)], np.ones((1, DIM + 1)))
    with pytest.raises(ValueError, match="one row per slice"):
        index.replace_study(StudyRecord("3.1"), [SliceRecord(0)], np.ones((2, DIM)))
    with pytest.raises(ValueError, match="all-zero"):
        index.replace_study(StudyRecord("3.1"), [SliceRecord(0)], np.zeros((1, DIM)))
    with pytest.raises(ValueError, match="roi_embeddings"):
        index.replace_study(StudyRecord("3.1"), [SliceRecord(0)], np.ones((1, DIM)), np.ones((1, 3)))
    with pytest.raises(ValueError, match="study_uid"):
        StudyRecord("")
    with pytest.raises(StudyNotIndexed, match="3.9"):
        index.get_study("3.9")
    with pytest.raises(StudyNotIndexed):
        index.similar_studies("3.9")
    index.close()
    with pytest.raises(DimensionMismatch):
        CaseIndex.open(tmp_path, dim=DIM + 1)


def test_sqlite_is_in_wal_mode(filled):
    index, _ = filled
    assert index._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert os.path.exists(index.directory / "index.sqlite")


@pytest.mark.skipif(faiss.get_num_gpus() == 0, reason="needs faiss with GPU support and a GPU (device machine)")
def test_gpu_rebuild_gives_a_searchable_hnsw_graph(tmp_path, caplog, monkeypatch):
    import index.store

    monkeypatch.setattr(index.store, "GPU_BUILD_MIN_VECTORS", 1000)
    distribution = ClusteredEmbeddings(32, np.random.default_rng(11), clusters=50, noise=0.8)
    vectors = distribution.sample(5000)
    case_index = CaseIndex.open(tmp_path)
    for number in range(50):
        rows = vectors[number * 100 : (number + 1) * 100]
        case_index.replace_study(StudyRecord(f"4.{number}"), [SliceRecord(i) for i in range(100)], rows)
    with caplog.at_level("INFO", logger="index.store"):
        case_index.compact()
    assert "rebuilt on gpu-cagra->hnsw" in caplog.text
    queries = distribution.sample(100)
    exact = faiss.IndexFlatIP(32)
    exact.add(vectors)
    _, exact_rows = exact.search(queries, 10)
    to_row = {(f"4.{n}", s): n * 100 + s for n in range(50) for s in range(100)}
    found = case_index.search_slices(queries, k=10)
    assert (
        knn_recall(np.array([[to_row[(h.study_uid, h.slice_index)] for h in row] for row in found]), exact_rows, 10)
        >= 0.9
    )
    extra = distribution.sample(10)  # incremental add on the converted graph
    case_index.replace_study(StudyRecord("4.extra"), [SliceRecord(i) for i in range(10)], extra)
    assert case_index.search_slices(extra[0], k=1)[0][0].study_uid == "4.extra"
    case_index.close()


def test_a_reader_catches_up_with_another_writer(tmp_path):
    writer = CaseIndex.open(tmp_path, compact_fraction=0.3)
    add_study(writer, 0)
    reader = CaseIndex.open(tmp_path)  # its own connection and in-memory FAISS, like another process
    new = add_study(writer, 1)
    assert reader.search_slices(new[0], k=1)[0][0].study_uid == "1.2.826.0.1.1"
    replaced = add_study(writer, 1, seed=77)  # 12 of 36 dead -> the writer compacts
    assert writer.tombstone_count() == 0
    (hit,) = reader.search_slices(replaced[3], k=1)[0]
    assert (hit.study_uid, hit.slice_index, round(hit.similarity, 4)) == ("1.2.826.0.1.1", 3, 1.0)
    assert reader.vector_count() == 2 * SLICES
    assert all(report.ok for report in reader.check_consistency())
    reader.close()
    writer.close()


def test_measured_lesions_are_stored_and_filterable(tmp_path):
    from index.lesions import measure_lesions

    shape = (SLICES, 40, 60)
    grid = np.indices(shape)

    def blob(x):
        return ((grid[0] - 6) ** 2 + (grid[1] - 20) ** 2 + (grid[2] - x) ** 2) <= 25

    mask = blob(15) | blob(45)
    mask[6, 20, 15:46] = True  # two loculi joined by a channel
    lesions = measure_lesions(mask, np.full(shape, 20.0, np.float32), (2.0, 1.0, 1.0), space="retropharyngeal")
    index = CaseIndex.open(tmp_path)
    slice_embeddings, _ = study_vectors(5)
    index.replace_study(StudyRecord("5.1"), [SliceRecord(i) for i in range(SLICES)], slice_embeddings, None, lesions)
    add_study(index, 6)
    (stored,) = index.lesions("5.1")
    assert stored == lesions[0] and stored.loculi == 2
    query = slice_embeddings + 0.05
    assert [hit.study_uid for hit in index.search_studies(query, filters=["loculi>=2", "space=retropharyngeal"])] == [
        "5.1"
    ]
    assert index.vector_count("roi") == 3  # study 5.1 has no ROI rows
    index.close()


def test_lesion_side_is_stored_filterable_and_old_indexes_gain_the_column(tmp_path):
    import sqlite3

    index = CaseIndex.open(tmp_path)
    add_study(index, 7)
    slice_embeddings, _ = study_vectors(8)
    left = Lesion(label=1, voxel_count=50, volume_ml=2.0, longest_axial_diameter_mm=20.0, core_mean_hu=20.0,
                  core_sd_hu=5.0, loculi=1, first_slice=0, last_slice=1, space="parapharyngeal", side="left")
    index.replace_study(StudyRecord("8.1"), [SliceRecord(i) for i in range(SLICES)], slice_embeddings, None, [left])
    query = slice_embeddings + 0.05
    assert [hit.study_uid for hit in index.search_studies(query, filters=["side=left", "space=parapharyngeal"])] == [
        "8.1"]
    assert index.search_studies(query, filters=["side=right"]) == []
    mixed = index.search_studies(query, query_descriptors={"space": "parapharyngeal", "side": "left"}, top=5)
    assert mixed[0].study_uid == "8.1" and mixed[0].descriptor_score == 1.0
    index.close()
    with sqlite3.connect(tmp_path / "index.sqlite") as db:  # an index written before lesions had a side
        db.execute("ALTER TABLE lesions DROP COLUMN side")
    reopened = CaseIndex.open(tmp_path)
    assert reopened.lesions("8.1")[0].side == "left"
    reopened.close()


def file_stamps(directory: Path) -> dict[str, tuple[int, int]]:
    """(mtime, size) of the FAISS files, the database and its write-ahead log."""
    paths = [*directory.glob("*.faiss"), directory / "index.sqlite", directory / "index.sqlite-wal"]
    return {path.name: (path.stat().st_mtime_ns, path.stat().st_size) for path in paths}


def test_a_read_only_index_catches_up_incrementally_and_writes_nothing(tmp_path):
    writer = CaseIndex.open(tmp_path, compact_fraction=1.0)
    vectors = {number: add_study(writer, number) for number in range(3)}
    reader = CaseIndex.open(tmp_path, read_only=True)
    new = add_study(writer, 3)
    replaced = add_study(writer, 1, seed=91)
    writer.delete_study("1.2.826.0.1.2")
    stamps = file_stamps(tmp_path)
    # the reader keeps its graph and holds the 2 new studies' vectors in its exact tier
    (hit,) = reader.search_slices(new[4], k=1)[0]
    assert (hit.study_uid, hit.slice_index, round(hit.similarity, 4)) == ("1.2.826.0.1.3", 4, 1.0)
    assert reader.pending_vectors("slice") == 2 * SLICES and reader.pending_vectors("roi") == 2 * 3
    assert reader.tombstone_count() == 2 * SLICES  # study 1's old and study 2's vectors
    hits = reader.search_slices(vectors[1], k=4 * SLICES)
    assert all(h.similarity < 0.999 for row in hits for h in row if h.study_uid == "1.2.826.0.1.1")
    assert "1.2.826.0.1.2" not in {h.study_uid for row in hits for h in row}
    assert reader.search_slices(replaced[2], k=1)[0][0].study_uid == "1.2.826.0.1.1"
    assert [h.study_uid for h in reader.similar_studies("1.2.826.0.1.3", top=5)] == [
        h.study_uid for h in writer.similar_studies("1.2.826.0.1.3", top=5)]
    stored = reader.embeddings_of_studies(["1.2.826.0.1.0", "1.2.826.0.1.3", "1.2.826.0.1.9"])  # graph, tier, none
    assert sorted(stored) == ["1.2.826.0.1.0", "1.2.826.0.1.3"]
    for uid, (positions, matrix) in stored.items():
        expected_positions, expected = writer.study_embeddings(uid)
        assert positions.tolist() == expected_positions.tolist()
        np.testing.assert_array_equal(matrix, expected)
    roi_hits = reader.similar_studies("1.2.826.0.1.1", space="roi", top=5, k=10)  # both tiers reached
    assert {h.study_uid for h in roi_hits} == {"1.2.826.0.1.0", "1.2.826.0.1.3"}
    assert all(report.ok for report in reader.check_consistency())

    with pytest.raises(PermissionError, match="read-only"):
        add_study(reader, 7)
    with pytest.raises(PermissionError, match="read-only"):
        reader.compact()
    assert file_stamps(tmp_path) == stamps
    reader.close()
    writer.close()


def test_a_read_only_index_swaps_in_fresh_graphs_in_the_background(tmp_path):
    writer = CaseIndex.open(tmp_path, compact_fraction=0.3)
    for number in range(2):
        add_study(writer, number)
    reader = CaseIndex.open(tmp_path, read_only=True, refresh_vectors=2 * SLICES)
    add_study(writer, 2)
    assert reader.search_slices(study_vectors(2)[0][0], k=1)[0][0].study_uid == "1.2.826.0.1.2"
    assert reader.pending_vectors() == SLICES
    latest = add_study(writer, 3)
    reader.search_slices(latest[0], k=1)  # the tier reaches refresh_vectors: a reload starts
    reader.wait_for_refresh()
    assert reader.pending_vectors() == 0 and reader.vector_count(live_only=False) == 4 * SLICES
    assert reader.search_slices(latest[0], k=1)[0][0].study_uid == "1.2.826.0.1.3"

    replaced = add_study(writer, 0, seed=300)
    add_study(writer, 1, seed=301)  # 24 of 72 dead -> the writer compacts and deletes the dead rows
    assert writer.tombstone_count() == 0
    (hit,) = reader.search_slices(replaced[5], k=1)[0]  # answered at once from the old graph + tier
    assert (hit.study_uid, hit.slice_index) == ("1.2.826.0.1.0", 5)
    reader.wait_for_refresh()  # ... and the compacted files are loaded behind it
    assert reader.tombstone_count() == 0 and reader.vector_count(live_only=False) == 4 * SLICES
    assert all(report.ok for report in reader.check_consistency())
    reader.close()
    writer.close()


def test_a_read_only_index_searches_while_a_writer_holds_the_database(tmp_path):
    writer = CaseIndex.open(tmp_path)
    vectors = add_study(writer, 0)
    add_study(writer, 1)
    reader = CaseIndex.open(tmp_path, read_only=True)
    with writer._transaction():  # a write transaction left open: SQLite's write lock is taken
        writer._db.execute("UPDATE slices SET live = 0 WHERE study_uid = '1.2.826.0.1.1'")
        (hit,) = reader.search_slices(vectors[7], k=1)[0]
        assert (hit.study_uid, hit.slice_index) == ("1.2.826.0.1.0", 7)
        assert {h.study_uid for h in reader.similar_studies("1.2.826.0.1.0", top=2)} == {"1.2.826.0.1.1"}
        writer._db.execute("ROLLBACK")
        writer._db.execute("BEGIN")  # the context manager commits
    reader.close()
    writer.close()


def test_sq8_vectors_search_with_high_recall_and_an_encoding_change_converts(tmp_path):
    from index.vectors import encoding_of

    distribution = ClusteredEmbeddings(32, np.random.default_rng(5), clusters=40, noise=0.8)
    vectors = distribution.sample(3000)
    index = CaseIndex.open(tmp_path, vector_encoding="sq8", hnsw_m=16, ef_construction=100, ef_search=64)
    for number in range(30):
        rows = vectors[number * 100 : (number + 1) * 100]
        index.replace_study(StudyRecord(f"6.{number}"), [SliceRecord(i) for i in range(100)], rows)
    index.close()
    assert encoding_of(faiss.read_index(str(tmp_path / "slices.faiss"))) == "sq8"

    reader = CaseIndex.open(tmp_path, read_only=True)
    queries = distribution.sample(200)
    exact = faiss.IndexFlatIP(32)
    exact.add(vectors)
    _, exact_rows = exact.search(queries, 10)
    found = reader.search_slices(queries, k=10)
    found_rows = np.array([[int(h.study_uid.split(".")[1]) * 100 + h.slice_index for h in row] for row in found])
    assert reader.vector_encoding == "sq8" and knn_recall(found_rows, exact_rows, 10) >= 0.9

    converted = CaseIndex.open(tmp_path, vector_encoding="flat")
    assert encoding_of(faiss.read_index(str(tmp_path / "slices.faiss"))) == "flat"
    assert CaseIndex.open(tmp_path).vector_encoding == "flat"  # the index remembers its encoding
    reader.search_slices(queries[:1], k=1)  # the reader sees the conversion and reloads
    reader.wait_for_refresh()
    assert reader.vector_encoding == "flat" and reader.search_slices(vectors[42], k=1)[0][0].study_uid == "6.0"
    reader.close()
    converted.close()


def test_an_index_written_before_tombstone_generations_is_migrated(tmp_path):
    index = CaseIndex.open(tmp_path)
    for number in range(3):
        add_study(index, number)
    add_study(index, 0, seed=40)
    for table in ("slices", "rois"):  # the layout of earlier releases: no retired column
        index._db.execute(f"DROP INDEX {table}_retired")
        index._db.execute(f"ALTER TABLE {table} DROP COLUMN retired")
    index.close()

    reader = CaseIndex.open(tmp_path, read_only=True)
    assert "retired" in {row[1] for row in reader._db.execute("PRAGMA table_info(slices)")}
    assert reader.tombstone_count() == SLICES and all(report.ok for report in reader.last_check)
    writer = CaseIndex.open(tmp_path, compact_fraction=1.0)
    add_study(writer, 1, seed=41)
    assert reader.tombstone_count() == SLICES
    reader.search_slices(study_vectors(41)[0][0], k=1)
    assert reader.tombstone_count() == 2 * SLICES
    reader.close()
    writer.close()


def test_search_threads_are_limited_for_faiss_and_blas() -> None:
    """The similar-cases service searches on SimilarCasesThreads threads (FAISS and BLAS)."""
    import faiss
    from threadpoolctl import threadpool_info

    from index.vectors import limit_search_threads

    before = faiss.omp_get_max_threads()
    try:
        limit_search_threads(1)
        assert faiss.omp_get_max_threads() == 1
        blas = [pool for pool in threadpool_info() if pool["user_api"] == "blas"]
        assert blas and all(pool["num_threads"] == 1 for pool in blas)
    finally:
        limit_search_threads(before)
    with pytest.raises(ValueError):
        limit_search_threads(0)

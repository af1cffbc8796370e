"""The FAISS side of the case index: one HNSW index per vector space, mirrored from the database.

Each :class:`VectorSpace` is an ``IndexIDMap2(IndexHNSWFlat, inner product)`` whose ids are the
row ids of its table. The database is the source of truth: :meth:`VectorSpace.sync` compares
the file with the rows and repairs it (adds missing vectors, or rebuilds from the stored
embeddings when the file is unreadable, stale or inconsistent). Files are written atomically.

**GPU.** When the installed faiss has GPUs (``faiss.get_num_gpus() > 0``) and CAGRA, full
rebuilds of large indexes are built on the GPU with ``GpuIndexCagra`` and converted to a CPU
HNSW graph (``IndexHNSWCagra``); otherwise, and whenever that fails, the CPU HNSW build runs.
The path taken is logged. Searches always run on the CPU graph.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import faiss
import numpy as np

log = logging.getLogger(__name__)

SPACES = ("slice", "roi")
"""Vector spaces: whole-slice embeddings and ROI (mask-pooled) embeddings."""
GPU_BUILD_MIN_VECTORS = 50_000
"""Full rebuilds of at least this many vectors use the GPU CAGRA build when a GPU is present."""


@dataclass(frozen=True)
class ConsistencyReport:
    """Result of comparing one FAISS index with its SQLite rows.

    Attributes:
        space: "slice" or "roi".
        faiss_count: Vectors in the FAISS index (tombstones included).
        live_rows: Live rows in SQLite.
        missing: Live ids absent from the FAISS index.
        unknown: FAISS ids with no row in SQLite (a stale or foreign file).
        broken: Why the FAISS index is unusable (unreadable, count mismatch ...), else "".
    """

    space: str
    faiss_count: int
    live_rows: int
    missing: int
    unknown: int
    broken: str = ""

    @property
    def ok(self) -> bool:
        """True when every live row is searchable and nothing else is in the index."""
        return not (self.missing or self.unknown or self.broken)


class EmbeddingRows(Protocol):
    """What a vector space needs from the database that holds its embeddings."""

    hnsw_m: int
    ef_construction: int

    def row_ids(self, table: str) -> tuple[np.ndarray, np.ndarray]:
        """(all row ids, live row ids) of ``table``."""

    def embeddings_by_id(self, table: str, ids: np.ndarray) -> Iterable[tuple[np.ndarray, np.ndarray]]:
        """Stored embeddings of ``ids`` in batches of (ids, float32 [b, D])."""


class VectorSpace:
    """One FAISS index (slices or ROIs) mirrored from a table of the index database.

    Args:
        directory: The index directory (the file is ``<table>.faiss`` in it).
        name: ``"slice"`` or ``"roi"``.
        rows: The database side (row ids and stored embeddings).
    """

    def __init__(self, directory: Path, name: str, rows: EmbeddingRows) -> None:
        self.rows = rows
        self.name = name
        self.table = "slices" if name == "slice" else "rois"
        self.path = directory / f"{self.table}.faiss"
        self.index: faiss.IndexIDMap2 | None = None
        self.dead_ids = np.empty(0, dtype=np.int64)
        self.broken = ""
        self.file_stamp: tuple[int, int] | None = None

    def file_changed(self) -> bool:
        """Whether the file on disk differs from the one last loaded or saved here."""
        return _stamp(self.path) != self.file_stamp

    # -- loading and checking ------------------------------------------------------------
    def load(self, dim: int) -> None:
        """Read the FAISS file (remembering why it is unusable, if it is)."""
        self.index, self.broken = None, ""
        self.file_stamp = _stamp(self.path)
        if not self.path.exists():
            self.broken = "file missing"
            return
        try:
            loaded = faiss.read_index(str(self.path))
        except RuntimeError as error:
            self.broken = f"unreadable ({str(error).splitlines()[0][:120]})"
            return
        if not isinstance(loaded, faiss.IndexIDMap2) or loaded.d != dim:
            self.broken = f"not an IndexIDMap2 of dimension {dim}"
        elif loaded.ntotal != loaded.id_map.size() or loaded.index.ntotal != loaded.ntotal:
            self.broken = "count mismatch between the vectors and the id map"
        else:
            self.index = loaded

    def faiss_ids(self) -> np.ndarray:
        if self.index is None:
            return np.empty(0, dtype=np.int64)
        return faiss.vector_to_array(self.index.id_map).astype(np.int64)

    def row_ids(self) -> tuple[np.ndarray, np.ndarray]:
        """(all row ids, live row ids) of the table."""
        return self.rows.row_ids(self.table)

    def check(self) -> ConsistencyReport:
        known, live = self.row_ids()
        in_faiss = self.faiss_ids()
        unique = np.unique(in_faiss)
        broken = self.broken or ("duplicate ids" if unique.size != in_faiss.size else "")
        return ConsistencyReport(
            space=self.name,
            faiss_count=int(in_faiss.size),
            live_rows=int(live.size),
            missing=int(np.count_nonzero(~np.isin(live, unique))),
            unknown=int(np.count_nonzero(~np.isin(unique, known))),
            broken=broken,
        )

    def sync(self, dim: int, *, save: bool) -> ConsistencyReport:
        """Check against SQLite and repair: add missing vectors, or rebuild when unusable."""
        report = self.check()
        fresh = report.broken == "file missing" and not report.live_rows and not report.faiss_count
        if fresh:
            self.index = new_hnsw_index(dim, self.rows.hnsw_m, self.rows.ef_construction)
            if save:
                self.save()
        elif report.broken or report.unknown:
            log.warning(
                "%s index %s: %s; rebuilding from %d stored embeddings",
                self.name,
                self.path,
                report.broken or f"{report.unknown} unknown ids",
                report.live_rows,
            )
            self.rebuild(dim)
            if save:
                self.save()
        elif report.missing:
            if self.index is None:
                self.index = new_hnsw_index(dim, self.rows.hnsw_m, self.rows.ef_construction)
            in_faiss = self.faiss_ids()
            _, live = self.row_ids()
            missing = live[~np.isin(live, in_faiss)]
            log.warning("%s index %s: adding %d vectors missing from the file", self.name, self.path, missing.size)
            for ids, vectors in self.rows.embeddings_by_id(self.table, missing):
                self.index.add_with_ids(vectors, ids)
            if save:
                self.save()
        elif self.index is None:
            self.index = new_hnsw_index(dim, self.rows.hnsw_m, self.rows.ef_construction)
        known_live = self.row_ids()[1]
        in_faiss = self.faiss_ids()
        self.dead_ids = in_faiss[~np.isin(in_faiss, known_live)]
        return report

    # -- writing --------------------------------------------------------------------------
    def rebuild(self, dim: int) -> None:
        """Build a fresh index from the live embeddings in SQLite (tombstones dropped)."""
        started = time.perf_counter()
        _, live = self.row_ids()
        self.index, path = None, "cpu-hnsw"
        if live.size >= GPU_BUILD_MIN_VECTORS and faiss.get_num_gpus() > 0:
            vectors = np.concatenate([v for _, v in self.rows.embeddings_by_id(self.table, live)])
            self.index = _build_on_gpu(vectors, live, self.rows.hnsw_m)
            path = "gpu-cagra->hnsw" if self.index is not None else "cpu-hnsw (GPU build failed)"
        if self.index is None:
            self.index = new_hnsw_index(dim, self.rows.hnsw_m, self.rows.ef_construction)
            for ids, vectors in self.rows.embeddings_by_id(self.table, live):
                self.index.add_with_ids(vectors, ids)
        self.dead_ids = np.empty(0, dtype=np.int64)
        self.broken = ""
        log.info(
            "%s index rebuilt on %s: %d vectors in %.2f s",
            self.name,
            path,
            live.size,
            time.perf_counter() - started,
        )

    def save(self) -> None:
        """Write the index atomically: temp file, fsync, os.replace, fsync of the directory."""
        temporary = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        faiss.write_index(self.index, str(temporary))
        _fsync_path(temporary)
        os.replace(temporary, self.path)
        _fsync_path(self.path.parent)
        self.file_stamp = _stamp(self.path)

    # -- searching ------------------------------------------------------------------------
    def search(
        self, queries: np.ndarray, k: int, exclude_ids: np.ndarray, ef_search: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """kNN over live vectors, skipping tombstones and ``exclude_ids``; -1 ids are padding."""
        if self.index is None or self.index.ntotal == 0:
            return np.zeros((len(queries), k), np.float32), np.full((len(queries), k), -1, np.int64)
        excluded = np.union1d(self.dead_ids, exclude_ids).astype(np.int64)
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(ef_search, k)
        if excluded.size:
            batch = faiss.IDSelectorBatch(excluded)
            selector = faiss.IDSelectorNot(batch)
            params.sel = selector
        similarities, ids = self.index.search(queries, k, params=params)
        # Defensive post-filter: the selector already removed these.
        ids[np.isin(ids, excluded)] = -1
        return similarities, ids


def new_hnsw_index(dim: int, hnsw_m: int, ef_construction: int) -> faiss.IndexIDMap2:
    """An empty IndexIDMap2(IndexHNSWFlat) with inner-product metric (cosine on unit vectors)."""
    hnsw = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = ef_construction
    return faiss.IndexIDMap2(hnsw)


def _build_on_gpu(vectors: np.ndarray, ids: np.ndarray, hnsw_m: int) -> faiss.IndexIDMap2 | None:
    """Build a CAGRA graph on the GPU and convert it to a CPU HNSW index (None if unsupported).

    Only called when ``faiss.get_num_gpus() > 0``; the GPU classes are looked up lazily so a
    CPU-only faiss never touches them.
    """
    if not hasattr(faiss, "GpuIndexCagra") or not hasattr(faiss, "IndexHNSWCagra"):
        log.info("faiss has GPUs but no CAGRA support: building HNSW on the CPU")
        return None
    try:
        resources = faiss.StandardGpuResources()
        config = faiss.GpuIndexCagraConfig()
        config.graph_degree = 2 * hnsw_m
        config.intermediate_graph_degree = 4 * hnsw_m
        gpu_index = faiss.GpuIndexCagra(resources, vectors.shape[1], faiss.METRIC_INNER_PRODUCT, config)
        gpu_index.train(vectors)
        cpu_graph = faiss.IndexHNSWCagra(vectors.shape[1], hnsw_m, faiss.METRIC_INNER_PRODUCT)
        # Keep the upper HNSW levels so that later incremental adds work on the CPU graph.
        cpu_graph.base_level_only = False
        index = faiss.IndexIDMap2(cpu_graph)  # wrap while empty, then fill graph and id map
        gpu_index.copyTo(cpu_graph)
        faiss.copy_array_to_vector(ids.astype(np.int64), index.id_map)
        index.ntotal = cpu_graph.ntotal
        index.construct_rev_map()
        return index
    except (RuntimeError, AttributeError, TypeError) as error:
        log.warning("GPU CAGRA build failed (%s): building HNSW on the CPU", error)
        return None


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        status = path.stat()
    except FileNotFoundError:
        return None
    return status.st_mtime_ns, status.st_size


def remove_orphaned_temporaries(directory: Path) -> None:
    """Delete index temp files left by writers that died (a kill -9 during a save)."""
    for temporary in directory.glob("*.faiss.tmp-*"):
        try:
            os.kill(int(temporary.name.rsplit("-", 1)[1]), 0)
        except (ValueError, ProcessLookupError):
            temporary.unlink(missing_ok=True)
        except PermissionError:  # a live process of another user
            pass


def _fsync_path(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)

"""The FAISS side of the case index: one HNSW graph per vector space, mirrored from the database.

Each :class:`VectorSpace` holds an ``IndexIDMap2`` over an HNSW graph whose ids are the row ids
of its table, with one of two vector encodings (:data:`ENCODINGS`): ``flat`` (``IndexHNSWFlat``,
float32 vectors) or ``sq8`` (``IndexHNSWSQ`` with 8-bit scalar quantisation: a quarter of the
vector memory, distances slightly approximate). Inner product metric (cosine on unit vectors).

The database is the source of truth: :meth:`VectorSpace.sync` compares the file with the rows
and repairs it (adds missing vectors, or rebuilds from the stored embeddings when the file is
unreadable, stale, inconsistent or of another encoding). Files are written atomically.

**Catching up without rebuilding.** Vectors committed after the graph was loaded are either
added to the graph in place (a writer) or kept in a small *recent* tier that is searched
exactly beside the graph (a read-only index: it never mutates a graph that searches may be
using; it swaps in a freshly loaded graph once the recent tier is large). Every search runs on
a :class:`SpaceSnapshot`, an immutable view of graph, recent tier and tombstones.

**GPU.** When the installed faiss has GPUs (``faiss.get_num_gpus() > 0``) and CAGRA, full
rebuilds of large flat indexes are built on the GPU with ``GpuIndexCagra`` and converted to a
CPU HNSW graph (``IndexHNSWCagra``); otherwise, and whenever that fails, the CPU HNSW build
runs. The path taken is logged. Searches always run on the CPU graph.
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
ENCODINGS = ("flat", "sq8")
"""How the graph stores its vectors: float32 (``flat``) or 8-bit scalar quantised (``sq8``)."""
GPU_BUILD_MIN_VECTORS = 50_000
"""Full rebuilds of at least this many vectors use the GPU CAGRA build when a GPU is present."""
SQ8_RANGE_MARGIN = 0.1
"""The 8-bit quantiser's per-dimension range is the trained [min, max] widened by this fraction
of its width on each side, so vectors added later than the training sample are rarely clipped."""
SQ8_TRAINING_SAMPLE = 100_000
"""At most this many stored embeddings train the quantiser of a rebuilt ``sq8`` graph."""


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


@dataclass(frozen=True)
class SpaceSnapshot:
    """An immutable view of one vector space for one search.

    Attributes:
        graph: The HNSW graph (None before the dimension is known).
        dead_ids: Sorted ids of tombstones in the graph.
        recent_ids: Ids of live vectors not in the graph (searched exactly), sorted.
        recent_vectors: Their unit vectors, float32 [len(recent_ids), D].
    """

    graph: faiss.IndexIDMap2 | None
    dead_ids: np.ndarray
    recent_ids: np.ndarray
    recent_vectors: np.ndarray
    graph_ids: np.ndarray
    """Sorted ids held by the graph (tombstones included)."""
    exact_graph: bool
    """Whether the graph keeps the float32 vectors themselves (``flat``), so they can be read back."""

    def stored_vectors(self, ids: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """The unit vectors of ``ids`` as this snapshot holds them (recent tier, or a flat graph).

        Returns:
            (found bool [m], vectors float32 [m, D]); rows not found are zero (read them from the
            database: an ``sq8`` graph only holds approximations).
        """
        ids = np.asarray(ids, dtype=np.int64)
        vectors = np.zeros((ids.size, dim), np.float32)
        position = np.searchsorted(self.recent_ids, ids)
        in_recent = position < self.recent_ids.size
        in_recent[in_recent] = self.recent_ids[position[in_recent]] == ids[in_recent]
        if in_recent.any():
            vectors[in_recent] = self.recent_vectors[position[in_recent]]
        found = in_recent.copy()
        if self.exact_graph and self.graph is not None:
            position = np.searchsorted(self.graph_ids, ids)
            in_graph = ~in_recent & (position < self.graph_ids.size)
            in_graph[in_graph] = self.graph_ids[position[in_graph]] == ids[in_graph]
            if in_graph.any():
                vectors[in_graph] = self.graph.reconstruct_batch(ids[in_graph])
            found |= in_graph
        return found, vectors

    def search(
        self, queries: np.ndarray, k: int, exclude_ids: np.ndarray, ef_search: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """kNN over live vectors, skipping tombstones and ``exclude_ids``; -1 ids are padding.

        The graph is searched with a FAISS ``IDSelector`` (so the walk continues past excluded
        vectors instead of returning fewer), the recent tier exactly; the two are merged.
        """
        similarities = np.full((len(queries), k), -np.inf, np.float32)
        ids = np.full((len(queries), k), -1, np.int64)
        if self.graph is not None and self.graph.ntotal > 0:
            excluded = np.union1d(self.dead_ids, exclude_ids).astype(np.int64)
            params = faiss.SearchParametersHNSW()
            params.efSearch = max(ef_search, k)
            if excluded.size:
                batch = faiss.IDSelectorBatch(excluded)
                selector = faiss.IDSelectorNot(batch)
                params.sel = selector
            similarities, ids = self.graph.search(queries, k, params=params)
            similarities[ids < 0] = -np.inf
        if self.recent_ids.size:
            recent_similarities = queries @ self.recent_vectors.T
            recent_similarities[:, np.isin(self.recent_ids, exclude_ids)] = -np.inf
            keep = min(k, self.recent_ids.size)
            best = np.argpartition(-recent_similarities, keep - 1, axis=1)[:, :keep]
            similarities = np.concatenate([similarities, np.take_along_axis(recent_similarities, best, 1)], axis=1)
            ids = np.concatenate([ids, self.recent_ids[best]], axis=1)
            order = np.argsort(-similarities, axis=1, kind="stable")[:, :k]
            similarities, ids = np.take_along_axis(similarities, order, 1), np.take_along_axis(ids, order, 1)
        ids[~np.isfinite(similarities)] = -1
        similarities[ids < 0] = 0.0
        return similarities, ids


class VectorSpace:
    """One FAISS index (slices or ROIs) mirrored from a table of the index database.

    Args:
        directory: The index directory (the file is ``<table>.faiss`` in it).
        name: ``"slice"`` or ``"roi"``.
        rows: The database side (row ids and stored embeddings).
        encoding: One of :data:`ENCODINGS`, for new builds; a file of another encoding is rebuilt.
    """

    def __init__(self, directory: Path, name: str, rows: EmbeddingRows, encoding: str = "flat") -> None:
        if encoding not in ENCODINGS:
            raise ValueError(f"vector encoding must be one of {', '.join(ENCODINGS)}, not {encoding!r}")
        self.rows = rows
        self.name = name
        self.encoding = encoding
        self.table = "slices" if name == "slice" else "rois"
        self.path = directory / f"{self.table}.faiss"
        self.index: faiss.IndexIDMap2 | None = None
        self.dead_ids = np.empty(0, dtype=np.int64)
        self.recent_ids = np.empty(0, dtype=np.int64)
        self.recent_vectors = np.empty((0, 0), dtype=np.float32)
        self.high_water = 0
        """The largest row id this space has caught up to (everything at or below is mirrored)."""
        self.graph_ids = np.empty(0, dtype=np.int64)
        """Sorted ids in the graph (kept with it: :meth:`SpaceSnapshot.stored_vectors` looks them up)."""
        self.broken = ""
        self.file_stamp: tuple[int, int] | None = None

    def file_changed(self) -> bool:
        """Whether the file on disk differs from the one last loaded or saved here."""
        return _stamp(self.path) != self.file_stamp

    def snapshot(self) -> SpaceSnapshot:
        """The current graph, tombstones and recent tier (take it under the index's lock)."""
        exact = self.index is not None and encoding_of(self.index) == "flat"
        return SpaceSnapshot(self.index, self.dead_ids, self.recent_ids, self.recent_vectors, self.graph_ids, exact)

    # -- loading and checking ------------------------------------------------------------
    def load(self, dim: int) -> None:
        """Read the FAISS file (remembering why it is unusable, if it is)."""
        self.index, self.broken, self.graph_ids = None, "", np.empty(0, dtype=np.int64)
        self.recent_ids, self.recent_vectors = np.empty(0, dtype=np.int64), np.empty((0, dim), dtype=np.float32)
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
        elif encoding_of(loaded) != self.encoding:
            self.broken = f"encoded as {encoding_of(loaded)}, configured {self.encoding}"
        else:
            self.index = loaded

    def faiss_ids(self) -> np.ndarray:
        """Ids in the graph (tombstones included)."""
        if self.index is None:
            return np.empty(0, dtype=np.int64)
        return faiss.vector_to_array(self.index.id_map).astype(np.int64)

    def row_ids(self) -> tuple[np.ndarray, np.ndarray]:
        """(all row ids, live row ids) of the table."""
        return self.rows.row_ids(self.table)

    def check(self) -> ConsistencyReport:
        """Compare the graph and recent tier with the table's rows (no repair)."""
        known, live = self.row_ids()
        in_faiss = np.concatenate([self.faiss_ids(), self.recent_ids])
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
            self.index = self.new_graph(dim)
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
                self.index = self.new_graph(dim)
            in_faiss = self.faiss_ids()
            _, live = self.row_ids()
            missing = live[~np.isin(live, in_faiss)]
            log.warning("%s index %s: adding %d vectors missing from the file", self.name, self.path, missing.size)
            for ids, vectors in self.rows.embeddings_by_id(self.table, missing):
                self.add(ids, vectors)
            if save:
                self.save()
        elif self.index is None:
            self.index = self.new_graph(dim)
        known, known_live = self.row_ids()
        in_faiss = self.faiss_ids()
        self.graph_ids = np.sort(in_faiss)
        self.dead_ids = in_faiss[~np.isin(in_faiss, known_live)]
        self.high_water = int(max(known.max(initial=0), in_faiss.max(initial=0)))
        return report

    # -- catching up ----------------------------------------------------------------------
    def absorb(self, new_ids: np.ndarray, new_vectors: np.ndarray, retired_ids: np.ndarray, *, in_place: bool) -> None:
        """Mirror rows committed since :attr:`high_water` and rows retired since the last look.

        Args:
            new_ids: Live ids above :attr:`high_water`, sorted.
            new_vectors: Their unit vectors, float32 [len(new_ids), D].
            retired_ids: Ids that became dead (tombstones) since the last look.
            in_place: Add new vectors to the graph (a writer) or to the recent tier, replacing
                arrays instead of changing them so that running searches keep their snapshot.
        """
        retired_ids = np.asarray(retired_ids, dtype=np.int64)
        retired_ids = retired_ids[retired_ids <= self.high_water]  # newer ones were never mirrored
        in_recent = np.isin(self.recent_ids, retired_ids)
        self.dead_ids = np.union1d(self.dead_ids, np.setdiff1d(retired_ids, self.recent_ids))
        if in_recent.any():
            self.recent_ids, self.recent_vectors = self.recent_ids[~in_recent], self.recent_vectors[~in_recent]
        if new_ids.size:
            if in_place:
                self.add(new_ids, new_vectors)
            else:
                self.recent_ids = np.concatenate([self.recent_ids, new_ids])
                self.recent_vectors = np.concatenate([self.recent_vectors.reshape(-1, new_vectors.shape[1]), new_vectors])
            self.high_water = max(self.high_water, int(new_ids.max()))

    def retire(self, ids: np.ndarray) -> None:
        """Mark ids of the graph as tombstones (a writer's own deletes)."""
        self.dead_ids = np.union1d(self.dead_ids, np.asarray(ids, dtype=np.int64))

    # -- writing --------------------------------------------------------------------------
    def new_graph(self, dim: int) -> faiss.IndexIDMap2:
        """An empty graph of this space's encoding."""
        return new_hnsw_index(dim, self.rows.hnsw_m, self.rows.ef_construction, self.encoding)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors to the graph in place (an untrained ``sq8`` graph trains on them first)."""
        if not self.index.is_trained:
            train_quantiser(self.index, vectors)
        ids = np.asarray(ids, dtype=np.int64)
        self.index.add_with_ids(vectors, ids)
        self.graph_ids = np.union1d(self.graph_ids, ids)
        self.high_water = max(self.high_water, int(np.max(ids)))

    def rebuild(self, dim: int) -> None:
        """Build a fresh index from the live embeddings in SQLite (tombstones dropped)."""
        started = time.perf_counter()
        known, live = self.row_ids()
        self.index, path = None, "cpu-hnsw"
        self.graph_ids = np.empty(0, dtype=np.int64)
        if self.encoding == "flat" and live.size >= GPU_BUILD_MIN_VECTORS and faiss.get_num_gpus() > 0:
            vectors = np.concatenate([v for _, v in self.rows.embeddings_by_id(self.table, live)])
            self.index = _build_on_gpu(vectors, live, self.rows.hnsw_m)
            path = "gpu-cagra->hnsw" if self.index is not None else "cpu-hnsw (GPU build failed)"
            self.graph_ids = np.sort(live) if self.index is not None else self.graph_ids
        if self.index is None:
            self.index = self.new_graph(dim)
            if self.encoding != "flat" and live.size:
                sample = np.sort(np.random.default_rng(0).permutation(live)[:SQ8_TRAINING_SAMPLE])
                train_quantiser(self.index, np.concatenate([v for _, v in self.rows.embeddings_by_id(self.table, sample)]))
            for ids, vectors in self.rows.embeddings_by_id(self.table, live):
                self.add(ids, vectors)
        self.dead_ids = np.empty(0, dtype=np.int64)
        self.recent_ids, self.recent_vectors = np.empty(0, dtype=np.int64), np.empty((0, dim), dtype=np.float32)
        self.high_water = int(known.max(initial=0))
        self.broken = ""
        log.info(
            "%s index rebuilt on %s (%s): %d vectors in %.2f s",
            self.name,
            path,
            self.encoding,
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


def limit_search_threads(threads: int) -> None:
    """Run this process's searches (FAISS's OpenMP loops and the BLAS products of re-ranking) on
    ``threads`` threads.

    A query service beside busy workers is fastest and steadiest on one thread: with a second
    thread on a core another process holds, every parallel loop waits at its barrier for the
    descheduled thread (measured on 2 cores with one busy: HNSW search of 100 query slices 16 ms
    on one thread against 32 ms on two; the re-ranking product 15 ms against 34 ms).
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    from threadpoolctl import threadpool_limits

    faiss.omp_set_num_threads(threads)
    threadpool_limits(limits=threads, user_api="blas")


def new_hnsw_index(dim: int, hnsw_m: int, ef_construction: int, encoding: str = "flat") -> faiss.IndexIDMap2:
    """An empty IndexIDMap2 over an inner-product HNSW graph (cosine on unit vectors).

    Args:
        dim: Vector dimension.
        hnsw_m: Graph degree M.
        ef_construction: efConstruction of the build.
        encoding: ``flat`` (IndexHNSWFlat) or ``sq8`` (IndexHNSWSQ, 8-bit; must be trained:
            :func:`train_quantiser`).
    """
    if encoding == "flat":
        hnsw = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
    elif encoding == "sq8":
        hnsw = faiss.IndexHNSWSQ(dim, faiss.ScalarQuantizer.QT_8bit, hnsw_m, faiss.METRIC_INNER_PRODUCT)
    else:
        raise ValueError(f"vector encoding must be one of {', '.join(ENCODINGS)}, not {encoding!r}")
    hnsw.hnsw.efConstruction = ef_construction
    return faiss.IndexIDMap2(hnsw)


def train_quantiser(index: faiss.IndexIDMap2, vectors: np.ndarray) -> None:
    """Train an ``sq8`` graph's scalar quantiser on ``vectors`` (range widened by :data:`SQ8_RANGE_MARGIN`)."""
    storage = faiss.downcast_index(faiss.downcast_index(index.index).storage)
    storage.sq.rangestat = faiss.ScalarQuantizer.RS_minmax
    storage.sq.rangestat_arg = SQ8_RANGE_MARGIN
    index.train(np.ascontiguousarray(vectors, dtype=np.float32))


def encoding_of(index: faiss.IndexIDMap2) -> str:
    """``flat`` or ``sq8``: how the graph under an IndexIDMap2 stores its vectors."""
    graph = faiss.downcast_index(index.index)
    if isinstance(graph, faiss.IndexHNSWSQ):
        storage = faiss.downcast_index(graph.storage)
        return "sq8" if storage.sq.qtype == faiss.ScalarQuantizer.QT_8bit else f"sq(qtype {storage.sq.qtype})"
    flat_graphs = tuple(getattr(faiss, name) for name in ("IndexHNSWFlat", "IndexHNSWCagra") if hasattr(faiss, name))
    return "flat" if isinstance(graph, flat_graphs) else type(graph).__name__


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

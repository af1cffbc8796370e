"""Scale-out on PostgreSQL vs the embedded default (SQLite), measured in one run on this machine.

Parts (``--parts``, default all):

``throughput``  studies per minute through a real node (Orthanc + plugin + workers, CPU), with
                1 and 2 workers, on the embedded default (SQLite files) and on PostgreSQL
                (Orthanc's index and files, the job queue and the case index in PostgreSQL 15).
``sync``        index sync lag: how long after a study is committed to the shared index
                another machine's cache has it (a reader polling every ``--poll-ms``), and
                what a query pays to check the change log when nothing changed.
``query``       similar-case query latency with the index in PostgreSQL vs SQLite at each of
                ``--sizes`` synthetic slice vectors (same rows, same FAISS graph: the shared
                cache was filled from PostgreSQL), and the time a new query service needs to
                build its cache from PostgreSQL.
``memory``      bytes per vector and recall@10 of HNSW flat, HNSW SQ8 and IVF-PQ with exact
                re-ranking (the options for 10^7-10^8 vectors, docs/scale-out.md).

Run: ``nice -n 19 python bench/scale_out.py`` (``--sizes 100000 1000000`` for the figures of the
docs; the throughput part takes several minutes). Each part prints its ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# One BLAS thread: on a loaded machine OpenBLAS's thread hand-offs made a re-ranked query 5-10x slower
# (and its latency noise larger than any difference measured here). Set before numpy loads.
# The nodes of the throughput part run with the machine's defaults (the variable is removed for them).
ONE_BLAS_THREAD_SET_HERE = "OPENBLAS_NUM_THREADS" not in os.environ
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import faiss  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from index.metrics import knn_recall
from index.records import SliceRecord, StudyRecord
from index.shared import SharedCaseIndex
from index.store import CaseIndex
from tooling.convert import StudyInfo, volume_to_ct_series, write_series
from tooling.orthanc_harness import OrthancProcess, scratch_node_configuration
from tooling.postgres import PostgresServer, orthanc_on_postgres
from tooling.synthetic_embeddings import ClusteredEmbeddings

SLICES_PER_STUDY = 200
WEIGHTS = Path(__file__).resolve().parents[1] / "models" / "weights" / "vmunet-demo-v1.pt"


# -- throughput ------------------------------------------------------------------------------------
def _study_series(number: int, slices: int, size: int) -> list:
    rng = np.random.default_rng(number)
    yy, xx = np.mgrid[:size, :size]
    body = ((yy - size / 2) / (size * 0.42)) ** 2 + ((xx - size / 2) / (size * 0.38)) ** 2 <= 1
    volume_hu = np.where(body, 40.0, -1000.0)[None] + rng.normal(0.0, 8.0, (slices, size, size))
    return volume_to_ct_series(volume_hu.astype(np.float32), (2.5, 0.8, 0.8), uid_seed=f"bench-{number}",
                               info=StudyInfo(patient_id=f"BENCH{number}"))


def studies_per_minute(workdir: Path, server: PostgresServer | None, workers: int, studies: int, slices: int,
                       size: int, name: str) -> float:
    """Send ``studies`` studies to a fresh node and time them until every job has ended."""
    abscess = {"WeightsPath": str(WEIGHTS), "WorkerCount": workers, "Device": "cpu", "SimilarCasesReport": "off"}
    if server is not None:
        url = server.create_database(f"abscess_{name}")
        server.create_database(f"orthanc_{name}")
        abscess.update(JobsDatabase=url, IndexDatabase=url)
    config = scratch_node_configuration(workdir, abscess)
    if server is not None:
        config = orthanc_on_postgres(config, server, f"orthanc_{name}")
    node = OrthancProcess(config, workdir).start(timeout=120)
    try:
        time.sleep(20)  # the workers load torch and the weights before the clock starts
        folders = []
        for number in range(studies):
            folders.append(workdir / "send" / f"s{number}")
            write_series(_study_series(number, slices, size), folders[-1])
        started = time.perf_counter()
        node.storescu(folders)
        uids = {node.get(f"/studies/{study}")["MainDicomTags"]["StudyInstanceUID"] for study in node.get("/studies")}
        for uid in uids:
            node.wait_for_job(uid, timeout=1800)
        elapsed = time.perf_counter() - started
    finally:
        node.stop()
    return studies / (elapsed / 60)


def throughput(args: argparse.Namespace, server: PostgresServer) -> None:
    if ONE_BLAS_THREAD_SET_HERE:
        del os.environ["OPENBLAS_NUM_THREADS"]  # the node and its workers as they run in production
    print(f"\n## throughput: {args.studies} studies of {args.slices} slices {args.size}x{args.size}, CPU, "
          "demo weights")
    rates: dict[tuple[str, int], float] = {}
    for round_number in range(args.rounds):  # the configurations alternate: a busy spell slows all alike
        for workers in (1, 2):
            for backend in ("sqlite", "postgresql"):
                with tempfile.TemporaryDirectory(prefix=f"bench-{backend}-{workers}-") as workdir:
                    rate = studies_per_minute(Path(workdir), server if backend == "postgresql" else None, workers,
                                              args.studies, args.slices, args.size, f"{round_number}_{workers}")
                print(f"round {round_number + 1}: {backend:10s} {workers} worker(s): {rate:6.2f} studies/min", flush=True)
                rates[backend, workers] = max(rate, rates.get((backend, workers), 0.0))
    print(f"best of {args.rounds} round(s):")
    for (backend, workers), rate in sorted(rates.items()):
        print(f"{backend:10s} {workers} worker(s): {rate:6.2f} studies/min")
    for backend in ("sqlite", "postgresql"):
        print(f"{backend}: 2 workers / 1 worker = {rates[backend, 2] / rates[backend, 1]:.2f}x")
    for workers in (1, 2):
        print(f"{workers} worker(s): postgresql / sqlite = {rates['postgresql', workers] / rates['sqlite', workers]:.2f}x")


# -- the shared index -------------------------------------------------------------------------------
def _fill(index: SharedCaseIndex, vectors: np.ndarray, first_study: int = 0) -> None:
    """Index ``vectors`` as studies of SLICES_PER_STUDY slices (FAISS files written once)."""
    with index.batch():
        for number, start in enumerate(range(0, len(vectors), SLICES_PER_STUDY), start=first_study):
            uid = f"1.2.826.0.77.{number}"
            block = vectors[start:start + SLICES_PER_STUDY]
            index.replace_study(StudyRecord(uid, series_uid=uid + ".1"),
                                [SliceRecord(i, f"{uid}.1.{i}", 2.5 * i) for i in range(len(block))], block)


def sync_lag(args: argparse.Namespace, server: PostgresServer) -> None:
    print(f"\n## index sync lag: writer and reader caches on one PostgreSQL, studies of {SLICES_PER_STUDY} "
          f"slices, D={args.dim}, reader polls every {args.poll_ms} ms")
    url = server.create_database("sync_lag")
    rng = np.random.default_rng(1)
    generator = ClusteredEmbeddings(args.dim, rng, clusters=200, intrinsic_dim=24)
    with tempfile.TemporaryDirectory(prefix="bench-sync-") as workdir:
        writer = SharedCaseIndex.open(Path(workdir) / "writer", url)
        reader = SharedCaseIndex.open(Path(workdir) / "reader", url)
        _fill(writer, generator.sample(50 * SLICES_PER_STUDY))
        reader.pull()
        lags, applies, idle = [], [], []
        for number in range(args.sync_studies):
            _fill(writer, generator.sample(SLICES_PER_STUDY), first_study=1000 + number)
            committed = time.perf_counter()
            while True:
                polled = time.perf_counter()
                if reader.pull():
                    applies.append(time.perf_counter() - polled)
                    lags.append(time.perf_counter() - committed)
                    break
                time.sleep(args.poll_ms / 1000)
            for _ in range(5):
                started = time.perf_counter()
                reader.pull()
                idle.append(time.perf_counter() - started)
        writer.close()
        reader.close()
    print(f"lag commit -> visible in the other cache: median {1000 * statistics.median(lags):.1f} ms, "
          f"max {1000 * max(lags):.1f} ms ({len(lags)} studies)")
    print(f"applying one study ({SLICES_PER_STUDY} vectors) to a cache: median {1000 * statistics.median(applies):.1f} ms")
    print(f"change-log check when nothing changed: median {1000 * statistics.median(idle):.2f} ms")


def _query_latencies(indexes: list[CaseIndex], study_uids: list[str]) -> list[float]:
    """Median latency of each index over the same queries, interleaved (a busy machine slows both alike)."""
    durations: list[list[float]] = [[] for _ in indexes]
    for uid in study_uids:
        for index, spent in zip(indexes, durations):
            started = time.perf_counter()
            index.similar_studies(uid, top=10, k=10)
            spent.append(time.perf_counter() - started)
    return [statistics.median(spent) for spent in durations]


def query_latency(args: argparse.Namespace, server: PostgresServer) -> None:
    print(f"\n## similar-case query latency (k=10 per slice, re-ranked, {SLICES_PER_STUDY}-slice query study), "
          f"D={args.dim}, one machine")
    faiss.omp_set_num_threads(1)
    for size in args.sizes:
        url = server.create_database(f"query_{size}")
        rng = np.random.default_rng(size)
        vectors = ClusteredEmbeddings(args.dim, rng, clusters=max(100, size // 1000), intrinsic_dim=24).sample(size)
        with tempfile.TemporaryDirectory(prefix=f"bench-query-{size}-") as workdir:
            started = time.perf_counter()
            writer = SharedCaseIndex.open(Path(workdir) / "writer-cache", url)
            _fill(writer, vectors)
            written = time.perf_counter() - started
            writer.close()
            started = time.perf_counter()
            service = SharedCaseIndex.open(Path(workdir) / "service-cache", url)  # a new query service
            cache_built = time.perf_counter() - started
            embedded = CaseIndex.open(Path(workdir) / "writer-cache")  # the same rows and graph, without PostgreSQL
            uids = embedded.study_uids()[:: max(1, len(embedded.study_uids()) // args.queries)]
            _query_latencies([service, embedded], uids[:2])  # warm both
            shared_seconds, embedded_seconds = _query_latencies([service, embedded], uids[:args.queries])
            same = [h.study_uid for h in service.similar_studies(uids[0], top=10)] == [
                h.study_uid for h in embedded.similar_studies(uids[0], top=10)]
            service.close()
            embedded.close()
        print(f"n={size}: SQLite {1000 * embedded_seconds:.1f} ms, PostgreSQL-backed cache {1000 * shared_seconds:.1f} ms"
              f" -> ratio {shared_seconds / embedded_seconds:.3f}; same ranking: {same}; written to PostgreSQL + "
              f"writer cache in {written:.0f} s; a new service's cache built from PostgreSQL in {cache_built:.0f} s")


# -- memory per vector --------------------------------------------------------------------------------
def _bytes_of(index: faiss.Index) -> int:
    path = Path(tempfile.mkstemp(suffix=".faiss")[1])
    faiss.write_index(index, str(path))
    size = path.stat().st_size
    path.unlink()
    return size


def memory(args: argparse.Namespace) -> None:
    n = args.memory_vectors
    print(f"\n## memory per vector and recall@10 at n={n}, D={args.dim} (serialised index size; 200 queries)")
    rng = np.random.default_rng(3)
    generator = ClusteredEmbeddings(args.dim, rng, clusters=max(100, n // 1000), intrinsic_dim=24)
    base, queries = generator.sample(n), generator.sample(200)
    exact = faiss.IndexFlatIP(args.dim)
    exact.add(base)
    truth = exact.search(queries, 10)[1]
    flat = faiss.IndexHNSWFlat(args.dim, 32, faiss.METRIC_INNER_PRODUCT)
    sq8 = faiss.IndexHNSWSQ(args.dim, faiss.ScalarQuantizer.QT_8bit, 32, faiss.METRIC_INNER_PRODUCT)
    lists = int(4 * np.sqrt(n))
    code_bytes = args.dim // 4
    ivfpq = faiss.IndexIVFPQ(faiss.IndexFlatIP(args.dim), args.dim, lists, code_bytes, 8, faiss.METRIC_INNER_PRODUCT)
    candidates = {"HNSW flat (the default)": (flat, None), "HNSW SQ8": (sq8, None),
                  f"IVF{lists},PQ{code_bytes} nprobe 64 + exact re-rank of 100": (ivfpq, 100)}
    for name, (index, refine) in candidates.items():
        if not index.is_trained:
            index.train(base)
        index.add(base)
        searched = index
        if refine is not None:
            index.nprobe = 64
            searched = faiss.IndexRefineFlat(index, faiss.swig_ptr(base))
            searched.k_factor = refine / 10
        else:
            index.hnsw.efSearch = 128
        found = searched.search(queries, 10)[1]
        stored = _bytes_of(index)
        kept_vectors = " (+ the float32 vectors for re-ranking, kept in the database)" if refine else ""
        print(f"{name:48s} {stored / n:7.1f} B/vector{kept_vectors}, recall@10 {knn_recall(found, truth, 10):.3f}")


def main() -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["throughput", "sync", "query", "memory"],
                        choices=["throughput", "sync", "query", "memory"])
    parser.add_argument("--studies", type=int, default=8, help="throughput: studies sent at once")
    parser.add_argument("--slices", type=int, default=24, help="throughput: slices per study")
    parser.add_argument("--size", type=int, default=128, help="throughput: rows = columns of the slices")
    parser.add_argument("--rounds", type=int, default=2, help="throughput: rounds over the four configurations")
    parser.add_argument("--dim", type=int, default=128, help="embedding dimension (the demo weights' D)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000], help="query: vectors in the index")
    parser.add_argument("--queries", type=int, default=20, help="query: query studies per size")
    parser.add_argument("--sync-studies", type=int, default=20, help="sync: studies written one by one")
    parser.add_argument("--poll-ms", type=float, default=10.0, help="sync: the reader's polling period")
    parser.add_argument("--memory-vectors", type=int, default=100_000, help="memory: vectors")
    args = parser.parse_args()
    server = PostgresServer().start()
    try:
        if "memory" in args.parts:
            memory(args)
        if "sync" in args.parts:
            sync_lag(args, server)
        if "query" in args.parts:
            query_latency(args, server)
        if "throughput" in args.parts:
            throughput(args, server)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

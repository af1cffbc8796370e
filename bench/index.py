"""HNSW (as the case index builds it) vs exact IndexFlatIP: speed and recall@10, one run.

For each database size (10k, 100k, 1M, up to --max-vectors, or --sizes) it builds the store's
HNSW index for each vector encoding (``index.vectors.new_hnsw_index``: IndexIDMap2 over
IndexHNSWFlat, or over IndexHNSWSQ with 8-bit scalar quantisation, trained as the store trains
it) and an exact ``IndexFlatIP`` on the same unit vectors, then measures

- build time (all threads) and memory per vector of each HNSW index: its arrays (vectors or
  codes, links, id map) plus the id map's reverse hash map (measured once at start as the
  resident-memory growth of an IndexIDMap2 taking 2M ids over a 1-d index),
- queries/s with one thread (``faiss.omp_set_num_threads(1)``) and with all threads,
- recall@10 of HNSW against the exact answer, for several efSearch values.

Vectors: clustered synthetic unit vectors resembling embeddings (cluster centres plus noise in
a low-dimensional subspace); with ``--embeddings file.npy`` the rows of a real embedding matrix
are the centres (real embeddings plus noise). The last line is machine readable:
``n=<N> hnsw_speedup=<x> recall_at_10=<r>`` for the largest N, at the smallest efSearch that
reaches --target-recall (the best recall when none does), single-thread speedup, one line per
encoding with its memory per vector and build time.

Run: ``python bench/index.py --max-vectors 100000``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from index.metrics import knn_recall
from index.vectors import ENCODINGS, SQ8_TRAINING_SAMPLE, new_hnsw_index, train_quantiser
from tooling.synthetic_embeddings import ClusteredEmbeddings

SIZES = (10_000, 100_000, 1_000_000)
K = 10


def index_bytes(index: faiss.IndexIDMap2) -> int:
    """Bytes held by the index's arrays: vectors or codes, HNSW links, levels, offsets and the id map."""
    graph = faiss.downcast_index(index.index)
    hnsw = graph.hnsw
    storage = faiss.downcast_index(graph.storage)
    vectors = graph.ntotal * (storage.code_size if isinstance(storage, faiss.IndexScalarQuantizer) else graph.d * 4)
    links = hnsw.neighbors.size() * 4 + hnsw.levels.size() * 4 + hnsw.offsets.size() * 8
    return vectors + links + index.id_map.size() * 8


def reverse_map_bytes_per_id(count: int = 2_000_000) -> float:
    """Resident bytes per id of IndexIDMap2's reverse hash map (rev_map), measured."""
    def resident() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    id_map = faiss.IndexIDMap2(faiss.IndexFlatIP(1))
    before = resident()
    id_map.add_with_ids(np.zeros((count, 1), np.float32), np.arange(count))
    return (resident() - before) / count - 4 - 8  # minus the 1-d vector and the id array


def queries_per_second(
    index: faiss.Index, queries: np.ndarray, threads: int, repeats: int = 3
) -> tuple[float, np.ndarray]:
    """Best-of-``repeats`` throughput of one batched search, and its ids."""
    faiss.omp_set_num_threads(threads)
    best, ids = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        _, ids = index.search(queries, K)
        best = min(best, time.perf_counter() - started)
    return len(queries) / best, ids


def sample(distribution: ClusteredEmbeddings, count: int, chunk: int = 100_000) -> np.ndarray:
    return np.concatenate([distribution.sample(min(chunk, count - start)) for start in range(0, count, chunk)])


def run_size(args: argparse.Namespace, count: int, distribution: ClusteredEmbeddings, all_threads: int) -> list[dict]:
    vectors = sample(distribution, count)
    queries = distribution.sample(args.queries)

    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    exact_qps_1, exact_ids = queries_per_second(exact, queries, 1, repeats=1)
    exact_qps_all, _ = queries_per_second(exact, queries, all_threads)
    del exact

    rows = [
        {
            "n": count,
            "index": "flat-ip (exact)",
            "ef": "-",
            "build_s": 0.0,
            "bytes_per_vector": 4 * distribution.dim,
            "qps_1": exact_qps_1,
            "qps_all": exact_qps_all,
            "recall": 1.0,
            "speedup_1": 1.0,
            "speedup_all": 1.0,
        }
    ]
    _print_row(rows[0])
    for encoding in args.encodings:
        faiss.omp_set_num_threads(all_threads)
        started = time.perf_counter()
        hnsw = new_hnsw_index(vectors.shape[1], args.hnsw_m, args.ef_construction, encoding)
        if encoding != "flat":
            train_quantiser(hnsw, vectors[:SQ8_TRAINING_SAMPLE])
        for start in range(0, count, 100_000):
            hnsw.add_with_ids(vectors[start : start + 100_000], np.arange(start, min(count, start + 100_000)))
        build_seconds = time.perf_counter() - started
        bytes_per_vector = index_bytes(hnsw) / count + args.reverse_map_bytes
        graph = faiss.downcast_index(hnsw.index)
        for ef in args.ef_search:
            graph.hnsw.efSearch = ef
            qps_1, ids = queries_per_second(hnsw, queries, 1)
            qps_all, _ = queries_per_second(hnsw, queries, all_threads)
            rows.append(
                {
                    "n": count,
                    "index": f"hnsw-{encoding} M={args.hnsw_m}",
                    "encoding": encoding,
                    "ef": ef,
                    "build_s": build_seconds,
                    "bytes_per_vector": bytes_per_vector,
                    "qps_1": qps_1,
                    "qps_all": qps_all,
                    "recall": knn_recall(ids, exact_ids, K),
                    "speedup_1": qps_1 / exact_qps_1,
                    "speedup_all": qps_all / exact_qps_all,
                }
            )
            _print_row(rows[-1])
        del hnsw, graph
    return rows


def _print_row(row: dict) -> None:
    print(
        f"{row['n']:>9} {row['index']:<18} {row['ef']:>4} {row['build_s']:>8.1f} "
        f"{row['bytes_per_vector']:>7.0f} {row['qps_1']:>9.0f} {row['qps_all']:>9.0f} "
        f"{row['recall']:>9.3f} {row['speedup_1']:>7.1f} {row['speedup_all']:>7.1f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=768, help="embedding dimension (default 768)")
    parser.add_argument("--max-vectors", type=int, default=SIZES[-1], help="largest database size to run")
    parser.add_argument("--sizes", help="comma-separated database sizes (instead of the standard ones)")
    parser.add_argument("--encodings", nargs="+", default=list(ENCODINGS), choices=ENCODINGS)
    parser.add_argument("--queries", type=int, default=500, help="number of query vectors")
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--ef-construction", type=int, default=200)
    parser.add_argument("--ef-search", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--target-recall", type=float, default=0.97)
    parser.add_argument("--clusters-per-100k", type=int, default=500, help="cluster centres per 100k vectors")
    parser.add_argument("--noise", type=float, default=0.6)
    parser.add_argument("--intrinsic-dim", type=int, default=32)
    parser.add_argument("--embeddings", type=Path, help=".npy [m, dim] real embeddings used as cluster centres")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    sizes = [int(size) for size in args.sizes.split(",")] if args.sizes else (
        [size for size in SIZES if size <= args.max_vectors] or [args.max_vectors])
    all_threads = faiss.omp_get_max_threads()
    args.reverse_map_bytes = reverse_map_bytes_per_id()
    centres = np.load(args.embeddings).astype(np.float32) if args.embeddings else None
    dim = centres.shape[1] if centres is not None else args.dim
    print(
        f"faiss {faiss.__version__}, {all_threads} threads, dim {dim}, {args.queries} queries, k={K}, "
        f"{'real embeddings from ' + str(args.embeddings) if centres is not None else 'synthetic clusters'}; "
        f"B/vec includes {args.reverse_map_bytes:.0f} B of the id map's reverse hash map"
    )
    header = (
        f"{'n':>9} {'index':<18} {'ef':>4} {'build s':>8} {'B/vec':>7} {'q/s 1t':>9} {'q/s all':>9} "
        f"{'recall@10':>9} {'x 1t':>7} {'x all':>7}"
    )
    print(header)
    print("-" * len(header))
    rows: list[dict] = []
    for size in sizes:
        rng = np.random.default_rng(args.seed)
        clusters = max(10, size * args.clusters_per_100k // 100_000)
        distribution = ClusteredEmbeddings(dim, rng, clusters, args.noise, centres, args.intrinsic_dim)
        rows = run_size(args, size, distribution, all_threads)
    for encoding in args.encodings:
        graphs = [row for row in rows if row.get("encoding") == encoding]
        reaching = [row for row in graphs if row["recall"] >= args.target_recall]
        chosen = reaching[0] if reaching else max(graphs, key=lambda row: row["recall"])
        print(f"n={chosen['n']} encoding={encoding} ef={chosen['ef']} hnsw_speedup={chosen['speedup_1']:.1f} "
              f"recall_at_10={chosen['recall']:.3f} bytes_per_vector={chosen['bytes_per_vector']:.0f} "
              f"build_s={chosen['build_s']:.0f}")

if __name__ == "__main__":
    main()

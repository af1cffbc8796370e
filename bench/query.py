"""Similar-case query latency at 10k / 100k / 1M slice vectors, with and without an indexing writer.

For each size the script fills a case index with synthetic studies through the real store
(``index.store.CaseIndex`` in batch mode): 100 slices per study, clustered unit embeddings
(``--dim``, 768 by default) whose consecutive slices follow a sequence of anatomical centres,
ROI embeddings on a 20-slice band, one lesion. Filled indexes are kept under ``--cache`` and
reused (``--refill`` rebuilds them).

It then measures the latency of a STUDY-level similar-case C-FIND (K=5, mode ``study``: hit
table + late-interaction re-ranking) answered by ``dicom_node.similar.service.SimilarCaseService``
(the handler behind the C-FIND, the relay and REST; no Orthanc client, so no SR is written),
for random query studies:

- ``service``: the service as it is (after one warm-up query that opens its index);
- ``reopen``: the previous design, for comparison in the same run: every query opens the index
  under the workers' exclusive lock (``open_index``: both FAISS files read, full consistency
  check) and runs the same search;
- both again while a writer process indexes new studies in a loop as a worker does
  (``open_index`` + ``replace_study`` + the ``find_similar`` of the similar-cases SR), leaving the
  lock free ``--writer-pause`` seconds (0.5) between studies, where a worker segments the next one;
- with ``--cfind``, the same query through Orthanc: an Orthanc with the plugin (no workers)
  serving the bench index, queried with dcmtk's ``findscu`` (process start included).

Before timing, the top-5 answers of random queries at the node's ``IndexEfSearch`` are compared
with those at efSearch 512 (a walk that is as good as exact here): the share that is identical,
in order, is printed (``query_ef_agreement_<size>``). The service searches on
``SimilarCasesThreads`` threads (one by default), as in the node.

Printed: p50 / p99 / max in ms per size, path and writer state; the last lines are machine
readable (``query_<path>_<size>_<writer>_p50_ms=...``). The issue's goal: p50 <= 100 ms and
p99 <= 500 ms at 100k vectors with a writer running (``service``).

Run: ``python bench/query.py --sizes 10000,100000 --queries 200 --cfind`` (1M: hours to fill on
2 cores the first time; run it with ``nice -n 19`` in the background).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pydicom.dataset import Dataset

from dicom_node.config import CHECKOUT, NodeConfig
from dicom_node.similar.query import SimilarQuery, find_similar, open_index
from dicom_node.similar.request import SUCCESS
from dicom_node.similar.service import SimilarCaseService
from tooling.synthetic_embeddings import SLICES_PER_STUDY, SyntheticStudies

FILL_ROOT = "1.2.826.0.1.3680043.10.1"
WRITER_ROOT = "1.2.826.0.1.3680043.10.2"
CALLING_AET = "BENCH"
SIMILAR_AET = "ABSCESS_SIMILAR"


def fill(directory: Path, studies: int, dim: int, seed: int) -> float:
    """Index ``studies`` synthetic studies into a fresh case index; returns the seconds it took."""
    shutil.rmtree(directory, ignore_errors=True)
    synthetic = SyntheticStudies(dim, seed)
    started = time.perf_counter()
    with open_index(directory) as index, index.batch():
        for number in range(1, studies + 1):
            index.replace_study(*synthetic.study(f"{FILL_ROOT}.{number}"))
            if number % 500 == 0:
                print(f"  filled {number} / {studies} studies ({time.perf_counter() - started:.0f} s)", flush=True)
    seconds = time.perf_counter() - started
    (directory / "bench-fill.json").write_text(json.dumps({"studies": studies, "dim": dim, "seed": seed,
                                                           "seconds": seconds}))
    return seconds


def writer_loop(directory: Path, dim: int, seed: int, pause: float) -> None:
    """``--writer``: index new studies forever, as a worker does (lock, replace_study, find_similar).

    Between two studies it leaves the lock free for ``pause`` seconds, where a worker segments its
    next study (seconds at least): a loop that re-takes the lock at once would starve the previous
    design's readers, which poll for it, and measure that instead of the query.
    """
    synthetic = SyntheticStudies(dim, seed)
    for number in range(1, 1_000_000):
        uid = f"{WRITER_ROOT}.{seed}.{number}"
        started = time.perf_counter()
        with open_index(directory) as index:
            index.replace_study(*synthetic.study(uid))
            find_similar(index, SimilarQuery(uid, k=5))
        print(f"indexed {uid} {time.perf_counter() - started:.3f}", flush=True)
        time.sleep(pause)


@contextmanager
def running_writer(directory: Path, dim: int, seed: int, pause: float) -> Iterator[list[float]]:
    """A writer process for the duration of the block; yields the seconds of each study it indexed."""
    process = subprocess.Popen([sys.executable, __file__, "--writer", str(directory), "--dim", str(dim),
                                "--seed", str(seed), "--writer-pause", str(pause)], stdout=subprocess.PIPE, text=True)
    seconds: list[float] = []

    def read() -> None:
        for line in process.stdout:
            seconds.append(float(line.split()[-1]))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while not seconds and process.poll() is None:  # measure while it works, not while it starts
        time.sleep(0.1)
    try:
        yield seconds
    finally:
        process.terminate()
        process.wait()
        reader.join()
        with open_index(directory) as index, index.batch():
            for uid in index.study_uids():
                if uid.startswith(WRITER_ROOT):
                    index.delete_study(uid)


def identifier(study_uid: str) -> Dataset:
    """A STUDY-level similar-case identifier (the service's defaults: K and mode)."""
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    query.PatientID = ""
    query.StudyDate = ""
    return query


def service_query(service: SimilarCaseService) -> Callable[[str], None]:
    def run(study_uid: str) -> None:
        responses = list(service.find(identifier(study_uid), CALLING_AET))
        if responses[-1][0].Status != SUCCESS or len(responses) < 2:
            raise RuntimeError(f"query for {study_uid} failed: {responses[-1][0]}")
    return run


def reopen_query(config: NodeConfig) -> Callable[[str], None]:
    """The previous design: open the index under the workers' lock for every query."""
    def run(study_uid: str) -> None:
        with open_index(config.index_directory) as index:
            if study_uid not in set(index.study_uids()):
                raise RuntimeError(f"{study_uid} is not indexed")
            if not find_similar(index, SimilarQuery(study_uid, k=config.similar_cases_top_k)):
                raise RuntimeError(f"no answer for {study_uid}")
    return run


def ef_agreement(directory: Path, uids: list[str], ef_search: int, reference_ef: int, count: int,
                 rng: np.random.Generator) -> tuple[int, int]:
    """How many of ``count`` random queries get the same top-5 (same studies, same order) at the
    node's efSearch as at a far larger one (the graph walk then is as good as exact)."""
    from index.store import CaseIndex

    same = 0
    with CaseIndex.open(directory, read_only=True) as index:
        for uid in rng.choice(uids, size=count):
            answers = []
            for ef in (ef_search, reference_ef):
                index.ef_search = ef
                answers.append([case.study_uid for case in find_similar(index, SimilarQuery(str(uid), k=5))])
            same += answers[0] == answers[1]
    return same, count


def latencies(run: Callable[[str], None], uids: list[str], count: int, rng: np.random.Generator) -> np.ndarray:
    """Milliseconds of ``count`` queries on random studies, one after the other."""
    times = []
    for uid in rng.choice(uids, size=count):
        started = time.perf_counter()
        run(str(uid))
        times.append(1000 * (time.perf_counter() - started))
    return np.asarray(times)


def cfind_node(config: NodeConfig, directory: Path):
    """An Orthanc with the plugin, no workers, serving the bench index to ``CALLING_AET``."""
    from tooling.orthanc_harness import OrthancProcess, free_port, scratch_node_configuration

    scratch = scratch_node_configuration(
        directory, {"IndexDirectory": str(config.index_directory), "WorkerCount": 0, "Enabled": False,
                    "AllowedSimilarCasesAets": [CALLING_AET], "SimilarCasesAet": SIMILAR_AET},
        DicomModalities={"bench": [CALLING_AET, "127.0.0.1", free_port()]})
    return OrthancProcess(scratch, directory).start()


def findscu_query(node) -> Callable[[str], None]:
    def run(study_uid: str) -> None:
        answered = subprocess.run(
            ["findscu", "-S", "-aet", CALLING_AET, "-aec", SIMILAR_AET, "127.0.0.1", str(node.dicom_port),
             "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}", "-k", "PatientID",
             "-k", "StudyDate"], capture_output=True, text=True, timeout=120)
        if answered.returncode != 0 or "Find Response" not in answered.stderr + answered.stdout:
            raise RuntimeError(f"findscu failed: {answered.stderr[-500:]}")
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000", help="slice vectors per index, comma-separated")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--queries", type=int, default=200, help="service queries per measurement")
    parser.add_argument("--reopen-queries", type=int, default=10, help="queries of the previous design (slow)")
    parser.add_argument("--cfind", action="store_true", help="also query through Orthanc with findscu")
    parser.add_argument("--cfind-queries", type=int, default=50)
    parser.add_argument("--cache", type=Path, default=CHECKOUT / ".cache" / "bench" / "query")
    parser.add_argument("--refill", action="store_true", help="rebuild the cached indexes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--writer-pause", type=float, default=0.5,
                        help="seconds the writer leaves the lock free between two studies (a worker segments then)")
    parser.add_argument("--writer", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.writer:
        writer_loop(args.writer, args.dim, args.seed or os.getpid(), args.writer_pause)
        return

    rng = np.random.default_rng(args.seed)
    rows: list[tuple[str, int, str, np.ndarray]] = []
    agreement: list[tuple[int, float]] = []
    print(f"similar-case STUDY query latency, {os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f}), "
          f"dim {args.dim}, {SLICES_PER_STUDY} slices/study")
    for size in (int(value) for value in args.sizes.split(",")):
        studies = size // SLICES_PER_STUDY
        directory = args.cache / f"{size}-{args.dim}"
        described = directory / "bench-fill.json"
        if args.refill or not described.exists() or json.loads(described.read_text())["studies"] != studies:
            print(f"filling {directory} with {studies} studies ...", flush=True)
            print(f"  filled in {fill(directory, studies, args.dim, args.seed):.0f} s", flush=True)
        config = NodeConfig(index_directory=directory, jobs_database=directory / "bench-jobs.sqlite",
                            allowed_similar_cases_aets=(CALLING_AET,))
        uids = [f"{FILL_ROOT}.{number}" for number in range(1, studies + 1)]
        service = SimilarCaseService(config)
        started = time.perf_counter()
        service_query(service)(uids[0])
        print(f"n={size}: the service opened its index in {time.perf_counter() - started:.2f} s (once)", flush=True)
        same, asked = ef_agreement(directory, uids, config.index_ef_search, 512, min(args.queries, 40), rng)
        agreement.append((size, same / asked))
        print(f"  top-5 answers at IndexEfSearch {config.index_ef_search} equal to those at efSearch 512: "
              f"{same} / {asked}", flush=True)
        paths = {"service": (service_query(service), args.queries), "reopen": (reopen_query(config), args.reopen_queries)}
        for writer in ("idle", "writer"):
            with running_writer(directory, args.dim, 1000 + size, args.writer_pause) if writer == "writer" else _nothing() as indexed:
                for path, (run, count) in paths.items():
                    rows.append((path, size, writer, latencies(run, uids, count, rng)))
                    _print_row(rows[-1])
                if indexed is not None:
                    print(f"  (the writer indexed {len(indexed)} studies meanwhile, median "
                          f"{np.median(indexed) if indexed else float('nan'):.2f} s each)", flush=True)
        if args.cfind:
            node = cfind_node(config, args.cache / "orthanc")
            try:
                run = findscu_query(node)
                run(uids[0])  # warm-up: the service process opens its index
                for writer in ("idle", "writer"):
                    with running_writer(directory, args.dim, 2000 + size, args.writer_pause) if writer == "writer" else _nothing():
                        rows.append(("cfind", size, writer, latencies(run, uids, args.cfind_queries, rng)))
                        _print_row(rows[-1])
            finally:
                node.stop()
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    for path, size, writer, times in rows:
        name = f"query_{path}_{_size_name(size)}_{writer}"
        print(f"{name}_p50_ms={np.percentile(times, 50):.1f} {name}_p99_ms={np.percentile(times, 99):.1f}")
    for size, fraction in agreement:
        print(f"query_ef_agreement_{_size_name(size)}={fraction:.3f}")


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


def _size_name(size: int) -> str:
    return f"{size // 1_000_000}M" if size % 1_000_000 == 0 else f"{size // 1000}k"


def _print_row(row: tuple[str, int, str, np.ndarray]) -> None:
    path, size, writer, times = row
    print(f"  {path:<8} n={size:>8} {writer:<6} queries={len(times):>4} p50={np.percentile(times, 50):8.1f} ms "
          f"p99={np.percentile(times, 99):8.1f} ms max={times.max():8.1f} ms", flush=True)


if __name__ == "__main__":
    main()

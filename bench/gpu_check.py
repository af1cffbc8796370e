"""The GPU checks of a lent device, one JSON (``bench/gpu_check.sh`` prepares the packages and runs this).

Sections, each guarded (a failure or a missing package is written into the JSON with its reason,
the other sections still run) and each skipped when the time budget would not cover it:

- ``scan``: mamba-ssm's CUDA selective scan vs ``models.scan.selective_scan_reference``
  (max absolute and relative error; the stable chunked PyTorch scan on the GPU as well);
- ``vmunet``: the paper's VM-UNet (``VMUNet()``, 27.4 M parameters) forward, seconds per
  3x256x256 slice at batch 1 and 16, and one training step (batch 8, AdamW, BCE + Dice);
- ``faiss``: at ``--vectors`` x 768 clustered unit vectors, the store's CPU HNSW build
  (M=32, efConstruction=200, all cores) vs the GPU CAGRA build converted to an HNSW graph
  (``index.vectors._build_on_gpu``, the store's GPU path), their recall@10 against exact
  search, and a CAGRA search on the GPU;
- ``query``: a case index of ``--query-vectors`` synthetic slice vectors rebuilt on the GPU
  (``CaseIndex.compact`` takes the CAGRA path at this size) answering STUDY similar-case
  queries (p50 / p99 ms).

Without CUDA it runs the same code at tiny sizes on the CPU (``"cuda": false`` in the JSON):
that is how its CPU-fallback parts are tested where no GPU is lent.

Run: ``python bench/gpu_check.py --out gpu_check.json`` (``bench/gpu_check.sh`` does it).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class Budget:
    """Seconds left of the run; sections that would not fit are skipped with a reason."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        """Seconds left."""
        return self.deadline - time.monotonic()


def section(report: dict[str, Any], name: str, budget: Budget, needs_seconds: float,
            run: Callable[[], dict[str, Any]]) -> None:
    """Run one check into ``report[name]``: its result, or why it was skipped or failed."""
    if budget.left() < needs_seconds:
        report[name] = {"skipped": f"{budget.left():.0f} s left, needs about {needs_seconds:.0f} s"}
        return
    started = time.perf_counter()
    try:
        report[name] = run()
    except Exception as error:  # noqa: BLE001 - the JSON says what failed, the next section runs
        report[name] = {"error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()[-2000:]}
    report[name]["seconds"] = round(time.perf_counter() - started, 2)
    print(f"{name}: {json.dumps(report[name])[:400]}", flush=True)


def machine() -> dict[str, Any]:
    """What ran the checks: Python, torch, CUDA device, faiss and mamba-ssm availability."""
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda": torch.cuda.is_available()}
    if info["cuda"]:
        info["device"] = torch.cuda.get_device_name(0)
    try:
        import faiss

        info.update(faiss=faiss.__version__, faiss_gpus=faiss.get_num_gpus(),
                    faiss_cagra=hasattr(faiss, "GpuIndexCagra"))
    except ImportError as error:
        info["faiss"] = f"not importable: {error}"
    from models.scan import _load_cuda_kernel, available_backends

    info["scan_backends"] = available_backends()
    if _load_cuda_kernel() is None:
        import models.scan

        info["mamba_ssm"] = f"not importable: {models.scan._cuda_import_error}"
    return info


def check_scan(cuda: bool) -> dict[str, Any]:
    """CUDA scan (and the chunked PyTorch scan) vs the sequential reference, float32."""
    import torch

    from models.scan import forced_backend, selective_scan, selective_scan_reference

    generator = torch.Generator().manual_seed(0)
    batch, channels, states, length = (2, 192, 16, 4096) if cuda else (1, 8, 4, 64)
    u = torch.randn(batch, channels, length, generator=generator)
    delta = torch.randn(batch, channels, length, generator=generator) * 0.5
    A = -torch.rand(channels, states, generator=generator) * 4 - 0.5
    B = torch.randn(batch, states, length, generator=generator)
    C = torch.randn(batch, states, length, generator=generator)
    D = torch.randn(channels, generator=generator)
    delta_bias = torch.randn(channels, generator=generator) * 0.1
    reference = selective_scan_reference(u.double(), delta.double(), A.double(), B.double(), C.double(), D.double(),
                                         delta_bias.double(), True)
    device = "cuda" if cuda else "cpu"
    result: dict[str, Any] = {"shape": [batch, channels, states, length], "reference": "float64 on the CPU"}
    for backend in (["cuda", "torch"] if cuda else ["torch"]):
        with forced_backend(backend):
            inputs = [tensor.to(device) for tensor in (u, delta, A, B, C, D, delta_bias)]
            output = selective_scan(*inputs, delta_softplus=True).double().cpu()
        error = (output - reference).abs()
        result[backend] = {"max_abs_error": float(error.max()),
                           "max_rel_error": float((error / reference.abs().clamp_min(1e-3)).max())}
    return result


def check_vmunet(cuda: bool) -> dict[str, Any]:
    """Paper-config VM-UNet: forward seconds per slice at batch 1 and 16, one training step."""
    import torch
    import torch.nn.functional as F

    from models import VMUNet
    from models.scan import available_backends

    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    model = VMUNet().to(device) if cuda else VMUNet(depths=(1, 1, 1, 1), depths_decoder=(1, 1, 1, 1),
                                                    dims=(8, 16, 32, 64)).to(device)
    size = 256 if cuda else 64
    # the GPU: mamba-ssm's kernel, else the chunked PyTorch scan; the CPU: the default (Numba) backends
    backend = ("cuda" if "cuda" in available_backends() else "torch") if cuda else None
    batches = (1, 16) if cuda else (1, 2)

    def synchronize() -> None:
        if cuda:
            torch.cuda.synchronize()

    result: dict[str, Any] = {"parameters": sum(p.numel() for p in model.parameters()), "input": [3, size, size],
                              "scan_backend": backend or "default (CPU)", "forward_s_per_slice": {}}
    model.eval()
    with _backend(backend), torch.inference_mode():
        for batch in batches:
            images = torch.randn(batch, 3, size, size, device=device)
            for _ in range(3 if cuda else 1):
                model(images)
            synchronize()
            repeats, started = 10 if cuda else 1, time.perf_counter()
            for _ in range(repeats):
                model(images)
            synchronize()
            result["forward_s_per_slice"][f"b{batch}"] = (time.perf_counter() - started) / (repeats * batch)
    model.train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4)
    train_batch = 8 if cuda else 2
    images = torch.randn(train_batch, 3, size, size, device=device)
    targets = (torch.rand(train_batch, 1, size, size, device=device) > 0.9).float()
    step_seconds = []
    with _backend(backend):
        for _ in range(4 if cuda else 2):
            synchronize()
            started = time.perf_counter()
            logits = model(images)
            probabilities = torch.sigmoid(logits)
            dice = 1 - (2 * (probabilities * targets).sum() + 1) / (probabilities.sum() + targets.sum() + 1)
            loss = F.binary_cross_entropy_with_logits(logits, targets) + dice
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            synchronize()
            step_seconds.append(time.perf_counter() - started)
    result[f"train_step_s_batch{train_batch}"] = float(np.median(step_seconds[1:]))
    if cuda:
        result["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def _backend(backend: str | None) -> Any:
    from contextlib import nullcontext

    from models.scan import forced_backend

    return forced_backend(backend) if backend else nullcontext()


def check_faiss(cuda: bool, count: int, budget: Budget) -> dict[str, Any]:
    """CPU HNSW build vs GPU CAGRA build (-> HNSW) at ``count`` x 768, recall@10 against exact search."""
    import faiss

    from index.metrics import knn_recall
    from index.vectors import _build_on_gpu, new_hnsw_index
    from tooling.synthetic_embeddings import ClusteredEmbeddings

    dim, k = 768, 10
    distribution = ClusteredEmbeddings(dim, np.random.default_rng(0), max(10, count // 200), 0.6, intrinsic_dim=32)
    vectors = np.concatenate([distribution.sample(min(100_000, count - start)) for start in range(0, count, 100_000)])
    queries = distribution.sample(500)
    ids = np.arange(count, dtype=np.int64)
    exact_ids = _exact_neighbours(vectors, queries, k, cuda)
    result: dict[str, Any] = {"vectors": count, "dim": dim, "threads": faiss.omp_get_max_threads()}

    def recall_of(index: faiss.Index, ef: int) -> float:
        faiss.downcast_index(index.index).hnsw.efSearch = ef
        return knn_recall(index.search(queries, k)[1], exact_ids, k)

    if cuda and faiss.get_num_gpus() > 0:
        started = time.perf_counter()
        converted = _build_on_gpu(vectors, ids, 32)
        if converted is None:
            result["gpu_cagra"] = {"error": "faiss has no CAGRA (GpuIndexCagra / IndexHNSWCagra); see the log"}
        else:
            result["gpu_cagra"] = {"build_s": time.perf_counter() - started,
                                   "recall_at_10": {ef: recall_of(converted, ef) for ef in (64, 128)}}
            result["gpu_cagra"].update(_cagra_search(vectors, queries, exact_ids, k))
            del converted
    else:
        result["gpu_cagra"] = {"skipped": "no faiss GPU (faiss.get_num_gpus() == 0)"}
    cpu_count = count if budget.left() > 300 else min(count, 200_000)  # the CPU build is the slow one
    started = time.perf_counter()
    hnsw = new_hnsw_index(dim, 32, 200)
    for start in range(0, cpu_count, 100_000):
        end = min(start + 100_000, cpu_count)
        hnsw.add_with_ids(vectors[start:end], ids[start:end])
    result["cpu_hnsw"] = {"vectors_built": cpu_count, "build_s": time.perf_counter() - started}
    if cpu_count == count:
        result["cpu_hnsw"]["recall_at_10"] = {ef: recall_of(hnsw, ef) for ef in (64, 128)}
    if "build_s" in result.get("gpu_cagra", {}):
        result["cagra_build_speedup"] = result["cpu_hnsw"]["build_s"] * count / cpu_count / result["gpu_cagra"]["build_s"]
    return result


def _exact_neighbours(vectors: np.ndarray, queries: np.ndarray, k: int, cuda: bool) -> np.ndarray:
    if cuda:
        import torch

        database = torch.from_numpy(vectors).cuda()
        return torch.topk(torch.from_numpy(queries).cuda() @ database.T, k, dim=1).indices.cpu().numpy()
    import faiss

    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    return exact.search(queries, k)[1]


def _cagra_search(vectors: np.ndarray, queries: np.ndarray, exact_ids: np.ndarray, k: int) -> dict[str, Any]:
    """Queries per second and recall@10 of a CAGRA index searched on the GPU."""
    import faiss

    from index.metrics import knn_recall

    resources = faiss.StandardGpuResources()
    config = faiss.GpuIndexCagraConfig()
    config.graph_degree, config.intermediate_graph_degree = 64, 128
    gpu_index = faiss.GpuIndexCagra(resources, vectors.shape[1], faiss.METRIC_INNER_PRODUCT, config)
    gpu_index.train(vectors)
    gpu_index.search(queries, k)
    started = time.perf_counter()
    _, found = gpu_index.search(queries, k)
    seconds = time.perf_counter() - started
    return {"gpu_search_queries_per_s": len(queries) / seconds, "gpu_search_recall_at_10": knn_recall(found, exact_ids, k)}


def check_query(cuda: bool, count: int) -> dict[str, Any]:
    """STUDY similar-case queries on a case index whose graphs were rebuilt on the GPU."""
    from index.store import CaseIndex
    from index.vectors import GPU_BUILD_MIN_VECTORS
    from tooling.synthetic_embeddings import SLICES_PER_STUDY, SyntheticStudies

    studies = count // SLICES_PER_STUDY
    synthetic = SyntheticStudies(768, seed=1)
    log_lines: list[str] = []
    handler = _ListHandler(log_lines)
    logging.getLogger("index.vectors").addHandler(handler)
    logging.getLogger("index.vectors").setLevel(logging.INFO)
    with tempfile.TemporaryDirectory(prefix="gpu-check-index-") as directory:
        index = CaseIndex.open(directory)
        started = time.perf_counter()
        with index.batch():
            for number in range(1, studies + 1):
                index.replace_study(*synthetic.study(f"1.2.826.0.1.3680043.10.9.{number}"))
        fill_seconds = time.perf_counter() - started
        started = time.perf_counter()
        index.compact()  # a full rebuild: CAGRA on the GPU at >= GPU_BUILD_MIN_VECTORS vectors
        rebuild_seconds = time.perf_counter() - started
        rng = np.random.default_rng(2)
        times = []
        for number in rng.integers(1, studies + 1, size=50):
            started = time.perf_counter()
            hits = index.similar_studies(f"1.2.826.0.1.3680043.10.9.{number}", top=5)
            times.append(1000 * (time.perf_counter() - started))
            assert hits, "a similar-case query returned nothing"
        index.close()
    logging.getLogger("index.vectors").removeHandler(handler)
    return {"vectors": studies * SLICES_PER_STUDY, "gpu_build_min_vectors": GPU_BUILD_MIN_VECTORS,
            "fill_s": fill_seconds, "rebuild_s": rebuild_seconds,
            "rebuild_path": [line for line in log_lines if "rebuilt on" in line],
            "query_p50_ms": float(np.percentile(times, 50)), "query_p99_ms": float(np.percentile(times, 99))}


class _ListHandler(logging.Handler):
    def __init__(self, lines: list[str]) -> None:
        super().__init__()
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--budget-seconds", type=float, default=400.0)
    parser.add_argument("--vectors", type=int, default=1_000_000, help="faiss build comparison size (GPU)")
    parser.add_argument("--query-vectors", type=int, default=100_000, help="case index size of the query check (GPU)")
    args = parser.parse_args()
    budget = Budget(args.budget_seconds)
    started = time.perf_counter()
    report: dict[str, Any] = {}
    section(report, "machine", budget, 0, machine)
    cuda = bool(report["machine"].get("cuda"))
    vectors, query_vectors = (args.vectors, args.query_vectors) if cuda else (5_000, 2_000)
    section(report, "scan", budget, 10, lambda: check_scan(cuda))
    section(report, "vmunet", budget, 30, lambda: check_vmunet(cuda))
    section(report, "faiss", budget, 60, lambda: check_faiss(cuda, vectors, budget))
    section(report, "query", budget, 40, lambda: check_query(cuda, query_vectors))
    report["total_s"] = round(time.perf_counter() - started, 1)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {args.out} ({report['total_s']} s)")


if __name__ == "__main__":
    main()

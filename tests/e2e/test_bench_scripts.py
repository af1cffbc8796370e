"""The benchmark scripts run against the current code (a bench that no longer runs measures nothing).

Small sizes only: these tests check that each script completes and prints its machine-readable
figures, never how fast anything is (the figures themselves are read by people, in one run).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parents[2]


def run_bench(*arguments: str, timeout: int = 300) -> str:
    """Run ``bench/<script>`` with ``arguments``; return stdout, failing the test on a non-zero exit."""
    finished = subprocess.run([sys.executable, *arguments], cwd=CHECKOUT, capture_output=True, text=True,
                              timeout=timeout)
    assert finished.returncode == 0, f"{arguments[0]} failed:\n{finished.stdout[-2000:]}\n{finished.stderr[-4000:]}"
    return finished.stdout


def test_query_bench_prints_every_path_and_writer_state(tmp_path: Path) -> None:
    output = run_bench("bench/query.py", "--sizes", "1000", "--queries", "5", "--reopen-queries", "2",
                       "--cache", str(tmp_path))
    figures = dict(re.findall(r"(query_\w+?_ms)=([0-9.]+)", output))
    expected = {f"query_{path}_1k_{writer}_{percentile}_ms" for path in ("service", "reopen")
                for writer in ("idle", "writer") for percentile in ("p50", "p99")}
    assert expected <= figures.keys(), output
    assert all(float(value) > 0 for value in figures.values())
    assert re.search(r"the writer indexed [1-9]\d* studies meanwhile", output), "the writer never indexed a study"
    agreement = re.search(r"query_ef_agreement_1k=([0-9.]+)", output)
    assert agreement and 0.0 <= float(agreement[1]) <= 1.0, output


@pytest.mark.parametrize("encoding", ["flat", "sq8"])
def test_index_bench_reports_speedup_recall_and_memory(encoding: str) -> None:
    output = run_bench("bench/index.py", "--sizes", "2000", "--queries", "20", "--encodings", encoding,
                       "--ef-search", "32")
    summary = re.search(rf"n=2000 encoding={encoding} ef=\d+ hnsw_speedup=([0-9.]+) recall_at_10=([0-9.]+) "
                        r"bytes_per_vector=(\d+)", output)
    assert summary, output
    speedup, recall, bytes_per_vector = float(summary[1]), float(summary[2]), int(summary[3])
    assert speedup > 0 and 0.5 < recall <= 1.0
    assert bytes_per_vector >= (768 if encoding == "sq8" else 4 * 768), "an index smaller than its vectors"

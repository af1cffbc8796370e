"""Study-to-SEG: from the last C-STORE of the demo study to its SEG in Orthanc, shipped weights, this CPU.

Starts a node exactly as ``make demo`` does (the repository's ``orthanc.json``: its
``StableAge``, the shipped demo weights, one worker) in a scratch directory on free ports,
sends the demo study (dicom2stl's real head-and-neck CT with one inserted abscess) once to warm
the worker up (weights loaded, kernels compiled), then sends the same images as ``--runs`` new
studies (new UIDs) with ``storescu`` and measures, per run:

- ``stable``: last instance stored -> job created (Orthanc waits ``StableAge`` seconds);
- ``queued``: job created -> claimed by the worker;
- ``processing``: claimed -> finished (SEG, SRs and index written), with the job's seconds per
  stage;
- ``total``: storescu returned -> the SEG is in Orthanc.

The goal of the issue: ``total <= StableAge + 1 s per 10 slices``. Last lines, machine readable:
``study_to_seg_s=<median total> budget_s=<StableAge + slices/10> ratio=<total/budget>`` and
``stage_<name>_s=<median>`` per stage.

Run: ``python bench/study.py --runs 3``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tooling.convert import write_series
from tooling.demo import demo_study
from tooling.orthanc_harness import OrthancProcess, free_port, node_configuration


def node_config(directory: Path) -> dict:
    """The shipped ``orthanc.json`` (StableAge, weights, workers) with scratch paths and free ports."""
    config = node_configuration()
    abscess = config["AbscessNode"]
    abscess.update({name: str(directory / name.lower()) for name in
                    ("IndexDirectory", "JobsDatabase", "WorkDirectory", "LogDirectory")})
    config.update(HttpPort=free_port(), DicomPort=free_port(), StorageDirectory=str(directory / "db"),
                  IndexDirectory=str(directory / "db"))
    return config


def _time(stamp: str) -> float:
    return dt.datetime.fromisoformat(stamp).timestamp()


def send_and_wait(node: OrthancProcess, series_dir: Path, study_uid: str) -> dict:
    """Send one study, wait for its SEG; the seconds of each phase and the job's stage timings."""
    node.storescu(series_dir, calling_aet="BENCH_PACS")
    sent = time.time()
    while True:
        jobs = node.get("/abscess-node/jobs", study=study_uid)
        done = [job for job in jobs if job["state"] in ("done", "failed", "skipped")]
        if done:
            break
        if time.time() - sent > 600:
            raise TimeoutError(f"no job finished for {study_uid} within 600 s:\n{node.log_tail()}")
        time.sleep(0.05)
    seg_seen = time.time()
    job = done[0]
    if job["state"] != "done" or not (job.get("result") or {}).get("seg"):
        raise RuntimeError(f"job {job['id']} ended {job['state']}: {job.get('error')}")
    return {"stable": _time(job["created"]) - sent, "queued": _time(job["started"]) - _time(job["created"]),
            "processing": _time(job["finished"]) - _time(job["started"]), "total": seg_seen - sent,
            "stages": job["timings"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="measured studies (after one warm-up)")
    args = parser.parse_args()

    directory = Path(tempfile.mkdtemp(prefix="bench-study-"))
    config = node_config(directory)
    stable_age = float(config.get("StableAge", 60))
    node = OrthancProcess(config, directory).start()
    runs = []
    try:
        for run in range(args.runs + 1):
            datasets, _ = demo_study(uid_seed=f"bench-study-{time.time_ns()}-{run}")
            series_dir = directory / f"study-{run}"
            write_series(datasets, series_dir)
            measured = send_and_wait(node, series_dir, str(datasets[0].StudyInstanceUID))
            label = "warm-up" if run == 0 else f"run {run}"
            print(f"{label}: {len(datasets)} slices, total {measured['total']:.2f} s (stable {measured['stable']:.2f}, "
                  f"queued {measured['queued']:.2f}, processing {measured['processing']:.2f}); stages "
                  f"{json.dumps(measured['stages'])}", flush=True)
            if run:
                runs.append(measured)
    finally:
        node.stop()
        shutil.rmtree(directory, ignore_errors=True)
    slices = len(datasets)
    budget = stable_age + slices / 10
    total = float(np.median([run["total"] for run in runs]))
    print(f"\nStableAge {stable_age:.0f} s, {slices} slices: budget StableAge + 1 s per 10 slices = {budget:.1f} s; "
          f"median study-to-SEG {total:.2f} s (of which {total - stable_age:.2f} s after StableAge)")
    print(f"study_to_seg_s={total:.2f} budget_s={budget:.1f} ratio={total / budget:.2f}")
    for stage in runs[0]["stages"]:
        print(f"stage_{stage}_s={np.median([run['stages'].get(stage, 0.0) for run in runs]):.3f}")


if __name__ == "__main__":
    main()

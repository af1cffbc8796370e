"""Worker process: claims jobs with a lease and runs the pipeline (``python -m dicom_node worker``).

Started and supervised by the Orthanc plugin, one process per ``WorkerCount`` (or started by
hand on another machine). It loads the network once, then loops:

* reap: running jobs whose lease lapsed (a killed or hung worker) go back to the queue, and
  their scratch folders are removed;
* claim a job with a lease, renew the lease every ``HeartbeatSeconds`` from a thread while the
  pipeline runs, and stop the job (writing nothing more) as soon as the lease is lost;
* when idle, send what is due in the forward queue (retries with back-off).

It dies with its parent: the kernel sends it SIGKILL when the process that started it exits
(``PR_SET_PDEATHSIG``), and it also checks its parent between jobs.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

from dicom_node.config import NodeConfig, WorkerSettings
from dicom_node.jobs import JobStore, Lease
from dicom_node.metrics import FORWARD_FAILURES, MetricsStore, record_attempt
from dicom_node.notifications import NotificationQueue, send_due_notifications
from dicom_node.orthanc_client import OrthancClient, OrthancError
from dicom_node.pipeline import LeaseKeeper, WorkerContext, process_job
from dicom_node.pseudonyms import Pseudonymizer

log = logging.getLogger("abscess_node.worker")
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent exits (no orphan outlives Orthanc)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def load_segmenter(config: NodeConfig) -> tuple[Any, str | None]:
    """Load the network once; on failure return the message every job will carry."""
    try:
        from models.segmenter import Segmenter

        segmenter = Segmenter.load(config.weights_path, device=config.device)
        info = segmenter.info
        log.info("weights %s v%s loaded (demo=%s, scan backend %s)", info.name, info.version, info.demo,
                 info.scan_backend)
        return segmenter, None
    except Exception as error:  # missing file, bad checkpoint, CUDA asked for but absent
        message = (f"the segmentation network could not be loaded from AbscessNode.WeightsPath="
                   f"{config.weights_path} with Device={config.device}: {type(error).__name__}: {error}")
        log.error(message)
        return None, message


@contextlib.contextmanager
def heartbeating(store: JobStore, lease: Lease, config: NodeConfig) -> Iterator[LeaseKeeper]:
    """Renew the lease from a thread while the block runs; the keeper says when it was lost."""
    keeper = LeaseKeeper(store, lease)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(config.heartbeat_seconds):
            try:
                if not store.heartbeat(lease, config.lease_seconds):
                    keeper.lost.set()
                    log.warning("job %s: lease lost; this worker stops working on it", lease.job_id)
                    return
            except Exception:  # a busy store: the next beat tries again, the lease has margin
                log.exception("job %s: heartbeat failed", lease.job_id)

    thread = threading.Thread(target=beat, name=f"heartbeat-{lease.job_id}", daemon=True)
    thread.start()
    try:
        yield keeper
    finally:
        stop.set()
        thread.join(timeout=5)


def remove_scratch(config: NodeConfig, job_ids: list[int]) -> None:
    """Delete the scratch folders of jobs whose worker died (patient data must not linger)."""
    for job_id in job_ids:
        shutil.rmtree(config.work_directory / f"job-{job_id}", ignore_errors=True)


def send_due_forwards(store: JobStore, client: OrthancClient, config: NodeConfig,
                      metrics: MetricsStore | None = None) -> int:
    """Try every forward whose back-off has passed (failures counted in ``metrics``); the number attempted."""
    attempted = 0
    while (forward := store.claim_forward(hold_seconds=config.forward_timeout_seconds + 30)) is not None:
        attempted += 1
        try:
            outcome = client.send_to_modality(forward["destination"], forward["resources"],
                                              timeout_seconds=config.forward_timeout_seconds)
            sent, error = outcome["state"] == "Success", outcome.get("error") or outcome["state"]
        except OrthancError as failure:
            sent, error = False, str(failure)
        state = store.forward_result(forward["id"], sent, error, config.forward_retries, config.forward_backoff_seconds)
        if not sent and metrics is not None:
            metrics.increment(FORWARD_FAILURES, destination=forward["destination"])
        log.info("forward of job %s to %s: %s (attempt %d)", forward["job_id"], forward["destination"], state,
                 forward["attempts"] + 1)
    return attempted


def record_metrics(metrics: MetricsStore, store: JobStore, job_id: int) -> None:
    """Record the seconds per stage (and latency, index size) of the attempt this worker just finished;
    a metrics failure never stops the worker."""
    try:
        record_attempt(metrics, store.get(job_id))
    except Exception:  # noqa: BLE001 - a busy store loses one observation, not the worker
        log.exception("job %s: metrics not recorded", job_id)


def remove_stale_scratch(store: JobStore, config: NodeConfig) -> None:
    """At start: scratch folders of jobs no worker is running (left by a killed worker) are removed."""
    running = {job["id"] for job in store.running_jobs()}
    for folder in config.work_directory.glob("job-*"):
        with contextlib.suppress(ValueError):
            if int(folder.name.removeprefix("job-")) not in running:
                shutil.rmtree(folder, ignore_errors=True)


def run_worker(settings: WorkerSettings, poll_seconds: float = 0.5, once: bool = False) -> None:
    """Claim and process jobs until the parent process goes away (or after one job with ``once``)."""
    die_with_parent()
    parent = os.getppid()
    config = settings.node
    store = JobStore(config.jobs_database)
    client = OrthancClient(settings.orthanc_url, settings.authorization)
    pseudonymizer = Pseudonymizer.from_file(config.pseudonym_secret_path)
    metrics = MetricsStore(store)
    notifications = NotificationQueue(store)
    segmenter, load_error = load_segmenter(config)
    remove_stale_scratch(store, config)
    log.info("worker %s ready (pid %d)", settings.name, os.getpid())
    while once or os.getppid() == parent:
        reaped = store.reap(config.max_attempts)
        for job in reaped:
            log.warning("job %s: worker %s lost its lease; job %s", job["id"], job["worker"], job["state"])
        remove_scratch(config, [job["id"] for job in reaped])
        claimed = store.claim(settings.name, config.lease_seconds)
        if claimed is None:
            sent = send_due_forwards(store, client, config, metrics) + send_due_notifications(notifications, config)
            if sent == 0:
                if once:
                    return
                time.sleep(poll_seconds)
            continue
        job, lease = claimed
        log.info("job %s: study %s claimed (attempt %d)", job["id"], job.get("study_uid") or job["orthanc_study_id"],
                 job["attempts"])
        if segmenter is None:  # the admin may have fixed WeightsPath's file since the last try
            segmenter, load_error = load_segmenter(config)
        if load_error:
            store.finish(lease, "failed", error=load_error)
        else:
            with heartbeating(store, lease, config) as keeper:
                state = process_job(job, WorkerContext(config, store, client, segmenter, pseudonymizer, keeper))
            if state is not None:
                record_metrics(metrics, store, job["id"])
            send_due_forwards(store, client, config, metrics)  # the first attempt of this job's forwards, at once
        send_due_notifications(notifications, config)  # this job's webhooks, at once
        if once:
            return
    log.info("worker %s: parent gone, exiting", settings.name)

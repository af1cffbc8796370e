"""Worker process: claims jobs from the job store and runs the pipeline (``python -m dicom_node worker``).

Started and supervised by the Orthanc plugin, one process per ``WorkerCount``. It loads the
network once, then loops: claim a job, process it, record the outcome. It exits when its parent
(Orthanc) is gone, so no orphan keeps running after the node stops.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from dicom_node.config import NodeConfig, WorkerSettings
from dicom_node.jobs import JobStore
from dicom_node.orthanc_client import OrthancClient
from dicom_node.pipeline import WorkerContext, process_job
from dicom_node.pseudonyms import Pseudonymizer

log = logging.getLogger("abscess_node.worker")


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


def run_worker(settings: WorkerSettings, poll_seconds: float = 0.5, once: bool = False) -> None:
    """Claim and process jobs until the parent process goes away (or after one job with ``once``)."""
    parent = os.getppid()
    config = settings.node
    store = JobStore(config.jobs_database)
    client = OrthancClient(settings.orthanc_url, settings.authorization)
    pseudonymizer = Pseudonymizer.from_file(config.pseudonym_secret_path)
    segmenter, load_error = load_segmenter(config)
    last_requeue = 0.0
    log.info("worker %s ready (pid %d)", settings.name, os.getpid())
    while once or os.getppid() == parent:
        if time.monotonic() - last_requeue > 60:
            for job_id in store.requeue_interrupted(config.job_timeout_seconds):
                log.warning("job %s outlived JobTimeoutSeconds; re-queued", job_id)
            last_requeue = time.monotonic()
        job = store.claim(settings.name)
        if job is None:
            if once:
                return
            time.sleep(poll_seconds)
            continue
        log.info("job %s: study %s claimed", job["id"], job.get("study_uid") or job["orthanc_study_id"])
        if segmenter is None:  # the admin may have fixed WeightsPath's file since the last try
            segmenter, load_error = load_segmenter(config)
        if load_error:
            store.finish(job["id"], "failed", error=load_error)
        else:
            process_job(job, WorkerContext(config, store, client, segmenter, pseudonymizer))
        if once:
            return
    log.info("worker %s: parent gone, exiting", settings.name)

"""Erasure: a study deleted from Orthanc leaves the case index within seconds.

The plugin records every study Orthanc deletes (its DELETED change) in the job store; the
similar-cases service, the one process that writes the index outside the workers, erases them
from the index (rows and vectors: the FAISS vectors become tombstones at once, compaction
drops them later) and marks them done. At start it also reconciles: an indexed study whose
Orthanc study no longer exists (deleted while the node was down) is erased too.
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

from dicom_node.config import NodeConfig
from dicom_node.jobs import JobStore
from dicom_node.metrics import MetricsStore, record_index_size
from dicom_node.similar.policy import AuditLog, Caller
from dicom_node.similar.query import open_index

log = logging.getLogger("abscess_node.erasure")
NODE = Caller("erasure", "abscess-node")


class StudyExists(Protocol):
    """Whether Orthanc still holds a study (by its Orthanc id)."""

    def __call__(self, orthanc_study_id: str) -> bool: ...


def erase_pending(config: NodeConfig, store: JobStore, audit: AuditLog) -> int:
    """Erase every study whose deletion the plugin recorded; the number of studies erased."""
    pending = store.pending_erasures()
    erased = 0
    if not pending:
        return 0
    with open_index(config.index_directory) as index:
        for erasure_id, orthanc_study_id in pending:
            for study_uid in index.study_uids_with(orthanc_study_id):
                index.delete_study(study_uid)
                audit.record(NODE, study_uid, [], "erased", "deleted from Orthanc")
                erased += 1
            store.erasure_done(erasure_id)
        if erased:
            record_index_size(MetricsStore(store), {"studies": len(index.study_uids()),
                                                    "slice": index.vector_count("slice"), "roi": index.vector_count("roi")})
    return erased


def reconcile(config: NodeConfig, store: JobStore, exists: StudyExists) -> int:
    """Record an erasure for every indexed study that Orthanc no longer holds; how many."""
    with open_index(config.index_directory) as index:
        known = index.orthanc_study_ids()
    missing = {orthanc_id for orthanc_id in known.values() if not exists(orthanc_id)}
    for orthanc_id in sorted(missing):
        store.request_erasure(orthanc_id)
    return len(missing)


def run_erasures(config: NodeConfig, audit: AuditLog, exists: StudyExists, stop: threading.Event,
                 period_seconds: float = 1.0) -> None:
    """The service's erasure loop: reconcile once, then erase what the plugin records (until ``stop``)."""
    store = JobStore(config.jobs_database)
    try:
        if reconcile(config, store, exists):
            log.warning("studies deleted from Orthanc while the node was down are erased from the index")
    except Exception:  # Orthanc not reachable yet: the DELETED changes still come through the store
        log.exception("reconciliation of the case index with Orthanc failed; retried at the next start")
    while not stop.wait(period_seconds):
        try:
            count = erase_pending(config, store, audit)
            if count:
                log.info("%d study(ies) deleted from Orthanc erased from the case index", count)
        except Exception:
            log.exception("erasing deleted studies from the case index failed; retrying")

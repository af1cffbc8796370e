"""The similar-cases SR an answer points at: the pipeline's, or one written on explicit request.

Reads never write. The query the pipeline already answered after processing (STUDY level,
default K and mode, no filters) points at the pipeline's "Similar cases" SR, as long as it
lists the same ranked studies. Any other query gets an SR only when the caller asks for one
(C-FIND private element Store Similar Cases Report = YES, or ``POST .../similar-report``); it
is written into the query study with UIDs derived from the query parameters and the answers,
so that asking again stores nothing new. An SR stored in a study may be read by anyone who
reads that study: it names other patients only by keyed pseudonyms unless
``SimilarCasesReport`` is ``identified``.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from dicom_node.config import NodeConfig
from dicom_node.identity import (
    DEVICE_NAME,
    NODE_NAME,
    SIMILAR_CASES_SERIES_NUMBER,
    dataset_bytes,
    derived_uid,
)
from dicom_node.jobs import JobStore
from dicom_node.orthanc_client import OrthancClient
from dicom_node.pseudonyms import Pseudonymizer
from dicom_node.reports.similar_cases import ReportedQuery, build_similar_cases_report
from dicom_node.similar.query import SimilarCase, SimilarQuery, query_index
from dicom_node.similar.request import ParsedRequest
from models.weights import AlgorithmInfo

log = logging.getLogger("abscess_node.similar_find")


UNKNOWN_ALGORITHM = AlgorithmInfo(name="abscess-node", version="unknown", demo=True,
                                  description="algorithm of the indexing run unknown")


class SimilarCasesReports:
    """Finds or writes the SR that holds a similar-case answer.

    Args:
        config: the node configuration (job store, default K, SimilarCasesReport).
        client: Orthanc REST client; without it no SR is looked up or written.
        pseudonymizer: the node's keyed pseudonyms (for SRs stored into a study).
    """

    def __init__(self, config: NodeConfig, client: OrthancClient | None, pseudonymizer: Pseudonymizer) -> None:
        self.config = config
        self.client = client
        self.pseudonymizer = pseudonymizer

    def report_for(self, request: ParsedRequest, query: SimilarQuery, cases: Sequence[SimilarCase],
                   requested_by: str, *, write: bool) -> tuple[str, str, str] | None:
        """(SR series UID, SR SOP Instance UID, query study UID) of the SR holding these answers.

        Args:
            cases: the answers as indexed (identified).
            requested_by: calling AE title or user (written into an on-demand SR).
            write: store an on-demand SR when no existing one holds these answers.

        Returns None when there is no such SR (and none was asked for), when no Orthanc is
        reachable, or when the SR cannot be written (logged).
        """
        if self.client is None:
            return None
        try:
            store = JobStore(self.config.jobs_database)
            jobs = store.list(study_uid=query.study_uid, state="done", limit=1)
            job_result = (jobs[0].get("result") or {}) if jobs else {}
            if self._default_request(request):
                reused = self._pipeline_report(store, query.study_uid, job_result, cases)
                if reused:
                    return (*reused, query.study_uid)
            if not write:
                return None
            return (*self._write_report(request, query, cases, requested_by, job_result), query.study_uid)
        except Exception:  # the answers are still useful without the SR
            log.exception("similar-cases SR for study %s could not be written", query.study_uid)
            return None

    def _default_request(self, request: ParsedRequest) -> bool:
        """Whether the query asks exactly what the pipeline's report answered."""
        return (request.level == "STUDY" and request.k == self.config.similar_cases_top_k
                and request.mode in (None, "study") and not request.filters and request.slice_range is None
                and not request.use_descriptors and not request.has_result_filters)

    def _pipeline_report(self, store: JobStore, study_uid: str, job_result: Mapping[str, Any],
                         cases: Sequence[SimilarCase]) -> tuple[str, str] | None:
        """The SR written after processing, when it still lists the same ranked studies."""
        listed = job_result.get("similar_studies")
        if not isinstance(listed, list) or [r.get("study_uid") for r in listed] != [c.study_uid for c in cases]:
            return None
        for output in store.outputs_of_study(study_uid):
            report = (output.get("objects") or {}).get("similar_cases")
            if isinstance(report, dict) and self.client.instance_exists(report["orthanc_id"]):
                return report["series_uid"], report["sop_instance_uid"]
        return None

    def _write_report(self, request: ParsedRequest, query: SimilarQuery, cases: Sequence[SimilarCase],
                      requested_by: str, job_result: Mapping[str, Any]) -> tuple[str, str]:
        identified = self.config.similar_cases_report == "identified"
        signature = json.dumps([request.parameters(), query.study_uid, identified,
                                [(case.study_uid, round(case.score, 6)) for case in cases]], sort_keys=True)
        series_uid = derived_uid("abscess-node on-demand similar cases", query.study_uid)
        sop_uid = derived_uid("abscess-node on-demand similar cases SR", signature)
        found = self.client.post_json("/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": sop_uid}})
        if found:
            return series_uid, sop_uid
        images = self._query_images(query.study_uid)
        algorithm = (AlgorithmInfo.from_dict(job_result["algorithm"]) if job_result.get("algorithm")
                     else UNKNOWN_ALGORITHM)
        described = "; ".join([*request.filters, *(f"{k}={v}" for k, v in (
            ("slice_range", "-".join(map(str, query.slice_range or ()))), ("StudyDate", "-".join(request.date_range or ())),
            ("StudyDescription", request.description_pattern or ""), ("PatientSex", request.patient_sex or "")) if v)])
        reported = ReportedQuery(mode=query.mode, k=request.k, filters=described[:1024] or None,
                                 requested_by=requested_by[:16] or None)
        stored_cases = list(cases) if identified else [self.pseudonymizer.case(case) for case in cases]
        report = build_similar_cases_report(
            images, stored_cases, reported, algorithm, series_number=SIMILAR_CASES_SERIES_NUMBER, instance_number=1,
            manufacturer=NODE_NAME, device_name=DEVICE_NAME, series_instance_uid=series_uid,
            sop_instance_uid=sop_uid, series_description="Similar cases on demand (abscess-node)")
        self.client.store(dataset_bytes(report))
        log.info("on-demand similar-cases SR %s stored in study %s", sop_uid, query.study_uid)
        return series_uid, sop_uid

    def _query_images(self, study_uid: str) -> list[Dataset]:
        """Headers of the indexed query series, in index slice order (the SR's query images)."""
        with query_index(self.config.index_directory) as index:
            record = index.get_study(study_uid)
            by_index = index.slice_instance_uids(study_uid)
        instances = self.client.get_json(f"/series/{record.orthanc_series_id}/instances")
        wanted = {uid: position for position, uid in by_index.items()}
        ids = [i["ID"] for i in instances if i.get("MainDicomTags", {}).get("SOPInstanceUID") in wanted]
        with tempfile.TemporaryDirectory(prefix="similar-sr-") as directory:
            headers = [pydicom.dcmread(path, stop_before_pixels=True)
                       for path in self.client.download_instances(ids, Path(directory))]
        return sorted(headers, key=lambda ds: wanted[ds.SOPInstanceUID])

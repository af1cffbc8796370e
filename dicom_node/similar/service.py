"""The similar-case query service: one handler behind every front end.

:meth:`SimilarCaseService.find` answers a similar-case C-FIND identifier like a pynetdicom
C-FIND handler: it yields ``(status, identifier)`` pairs, pending answers best first, and never
raises (every error becomes a failure status and a log line). The pynetdicom AE
(:mod:`dicom_node.similar.dicom_ae`), the relay the Orthanc plugin calls
(:mod:`dicom_node.similar.relay`) and the REST twin (:mod:`dicom_node.similar.rest`) all call it.
Audit lines carry UIDs and AE titles only.
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
import time
from collections.abc import Iterator
from typing import Any

from pydicom.dataset import Dataset

from dicom_node.config import NodeConfig
from dicom_node.jobs import open_job_store
from dicom_node.metrics import SIMILAR_QUERY_SECONDS, MetricsStore
from dicom_node.orthanc_client import OrthancClient, OrthancError
from dicom_node.pseudonyms import Pseudonymizer
from dicom_node.similar.on_demand import SimilarCasesReports
from dicom_node.similar.policy import AccessPolicy, AuditLog, Caller
from dicom_node.similar.query import SimilarCase, SimilarQuery, find_similar, open_index, query_index
from dicom_node.similar.request import (
    IDENTIFIER_DOES_NOT_MATCH,
    MODE,
    OUT_OF_RESOURCES,
    PENDING,
    PRIVATE_CREATOR,
    PRIVATE_GROUP,
    QUERY_OBJECT_NOT_INDEXED,
    QUERY_STUDY_UID,
    RANK,
    REFUSED_NOT_AUTHORISED,
    SCORE,
    SR_SERIES_INSTANCE_UID,
    SR_SOP_INSTANCE_UID,
    SUCCESS,
    UNABLE_TO_PROCESS,
    ParsedRequest,
    QueryError,
    parse_request,
    passes_standard_keys,
    status_dataset,
)
from index.vectors import limit_search_threads

log = logging.getLogger("abscess_node.similar_find")


@dataclasses.dataclass(frozen=True)
class Answer:
    """The answer to one similar-case query: the index query, the cases as shown, the SR holding them.

    ``indexed_cases`` are the same cases as indexed (real UIDs, in the same order): for the
    service's own look-ups (the gallery's thumbnails), never for the caller.
    """

    query: SimilarQuery
    cases: list[SimilarCase]
    report: tuple[str, str, str] | None
    indexed_cases: list[SimilarCase] = dataclasses.field(default_factory=list, repr=False)


class SimilarCaseService:
    """Answers similar-case queries from the case index (shared by every front end).

    Args:
        config: the node configuration (index, job store, K, allow-list, pseudonymisation).
        client: Orthanc REST client (series/instance look-ups, ModalitiesInStudy, storing the
            on-demand SR); without it SERIES/IMAGE look-ups use the index only and no SR is written.
        retrieve_aet: the AE title answers give as RetrieveAETitle (Orthanc's ``DicomAet``).
    """

    def __init__(self, config: NodeConfig, client: OrthancClient | None = None, retrieve_aet: str = "ORTHANC") -> None:
        self.config = config
        self.client = client
        self.retrieve_aet = retrieve_aet
        self.pseudonymizer = Pseudonymizer.from_file(config.pseudonym_secret_path)
        self.reports = SimilarCasesReports(config, client, self.pseudonymizer)
        self.policy = AccessPolicy(config)
        self.audit = AuditLog(config.log_directory)
        self.metrics = MetricsStore(open_job_store(config.jobs_database))
        limit_search_threads(config.similar_cases_threads)

    def answer(self, request: ParsedRequest, caller: Caller, *, store_report: bool = False) -> Answer:
        """The one way to similar cases: access policy, search, report, pseudonymisation, audit.

        Args:
            request: the parsed query.
            caller: who asks (refused unless the policy allows them; audited either way).
            store_report: write an on-demand SR of the answers into the query study (an explicit
                request; the default query reuses the pipeline's report, and nothing else writes).

        Raises:
            QueryError: refused (0x0124), not indexed (0xC001), bad query (0xA900), index
                unusable (0xA700), Orthanc look-up failed (0xC000).
        """
        started = time.perf_counter()
        try:
            if not self.policy.allows(caller):
                raise QueryError(REFUSED_NOT_AUTHORISED, self.policy.refusal(caller))
            query, cases = self.search(request)
            report = self.reports.report_for(request, query, cases, caller.name, write=store_report)
        except QueryError as error:
            self.audit.record(caller, request.unique_uid, [], "refused" if error.status == REFUSED_NOT_AUTHORISED
                              else f"failed 0x{error.status:04X}", error.comment)
            raise
        self.audit.record(caller, query.study_uid, [case.study_uid for case in cases], "answered",
                          f"{request.level} k={request.k} mode={query.mode}" + (" report" if report else ""))
        self._record_latency(caller, time.perf_counter() - started)
        shown = [self.pseudonymizer.case(case) for case in cases] if self.config.pseudonymize_similar_cases else cases
        return Answer(query, shown, report, indexed_cases=cases)

    def _record_latency(self, caller: Caller, seconds: float) -> None:
        try:
            self.metrics.observe(SIMILAR_QUERY_SECONDS, seconds, route=caller.route)
        except Exception:  # noqa: BLE001 - a busy job store loses one observation, not the answer
            log.warning("similar-case query latency not recorded", exc_info=True)

    # -- the C-FIND handler ---------------------------------------------------------------------
    def find(self, identifier: Dataset, calling_aet: str) -> Iterator[tuple[Dataset, Dataset | None]]:
        """Answer one C-FIND: pending identifiers best first, then success; or one failure.

        Never raises; every failure is a status Dataset with an ErrorComment.
        """
        calling_aet = (calling_aet or "").strip()
        try:
            answers = self._answers(identifier, calling_aet)
        except QueryError as error:
            log.warning("similar-cases C-FIND from %s: status 0x%04X (%s)", calling_aet[:16], error.status, error.comment)
            yield status_dataset(error.status, error.comment, error.offending), None
            return
        except Exception:  # the network layer must never see an exception
            log.exception("similar-cases C-FIND from %s failed", calling_aet)
            yield status_dataset(UNABLE_TO_PROCESS, "internal error; see the similar-cases service log"), None
            return
        for answer in answers:
            yield status_dataset(PENDING), answer
        yield status_dataset(SUCCESS), None

    def _answers(self, identifier: Dataset, calling_aet: str) -> list[Dataset]:
        caller = Caller("c-find", calling_aet)
        if not self.policy.allows(caller):  # refused before the identifier is even read
            self.audit.record(caller, "", [], "refused", self.policy.refusal(caller))
            raise QueryError(REFUSED_NOT_AUTHORISED, self.policy.refusal(caller))
        if not isinstance(identifier, Dataset):
            raise QueryError(IDENTIFIER_DOES_NOT_MATCH, "no identifier")
        request = parse_request(identifier, self.config.similar_cases_top_k)
        answer = self.answer(request, caller, store_report=request.store_report)
        return [self.identifier_for(case, request, answer.report) for case in answer.cases]

    # -- resolution and search ----------------------------------------------------------------------
    def resolve(self, request: ParsedRequest, index: Any) -> SimilarQuery:
        """Turn the identifier's query object into an index query.

        Raises:
            QueryError: 0xC001 when the study/slice/series is not in the index.
        """
        indexed = set(index.study_uids())
        mode, slice_range = request.mode, request.slice_range
        if request.level == "STUDY":
            study_uid = request.unique_uid
            if study_uid not in indexed:
                raise QueryError(QUERY_OBJECT_NOT_INDEXED, self._not_indexed_comment(study_uid))
        elif request.level == "IMAGE":
            study_uid, slice_index = self._find_slice(request, index, indexed)
            slice_range = (slice_index, slice_index)
        else:
            study_uid, default_mode = self._find_series(request, index, indexed)
            mode = mode or default_mode
        try:
            return SimilarQuery(study_uid, k=100 if request.has_result_filters else request.k, mode=mode or "study",
                                filters=request.filters, slice_range=slice_range, use_descriptors=request.use_descriptors)
        except ValueError as error:
            raise QueryError(IDENTIFIER_DOES_NOT_MATCH, str(error)) from None

    def _not_indexed_comment(self, study_uid: str) -> str:
        try:
            jobs = open_job_store(self.config.jobs_database).list(study_uid=study_uid, limit=1)
        except Exception:  # noqa: BLE001 - the job store only words the message
            jobs = []
        if jobs and jobs[0]["state"] in ("queued", "running"):
            return f"study not indexed yet: job {jobs[0]['id']} {jobs[0]['state']}; retry later"
        if jobs:
            return f"study not indexed: last job {jobs[0]['id']} {jobs[0]['state']}"
        return "study not indexed: not processed by this node"

    def _find_slice(self, request: ParsedRequest, index: Any, indexed: set[str]) -> tuple[str, int]:
        candidates = [request.study_uid_hint] if request.study_uid_hint in indexed else []
        if not candidates and self.client is not None:
            candidates = [uid for uid in [self._parent_study_uid(request.unique_uid, "Instance")] if uid in indexed]
        if not candidates:
            candidates = sorted(indexed)  # no hint: scan the index
        for study_uid in candidates:
            for slice_index, sop_uid in index.slice_instance_uids(study_uid).items():
                if sop_uid == request.unique_uid:
                    return study_uid, slice_index
        raise QueryError(QUERY_OBJECT_NOT_INDEXED, "SOPInstanceUID is not a slice of an indexed series")

    def _find_series(self, request: ParsedRequest, index: Any, indexed: set[str]) -> tuple[str, str]:
        for study_uid in ([request.study_uid_hint] if request.study_uid_hint in indexed else []):
            if index.get_study(study_uid).series_uid == request.unique_uid:
                return study_uid, "study"
        if self.client is not None:
            series = self._lookup(request.unique_uid, "Series")
            if series is not None:
                tags = series.get("MainDicomTags", {})
                study_uid = self._parent_study_uid(request.unique_uid, "Series")
                if study_uid in indexed:
                    if tags.get("Modality") == "SEG":
                        return study_uid, "roi"
                    if index.get_study(study_uid).series_uid == request.unique_uid:
                        return study_uid, "study"
                raise QueryError(QUERY_OBJECT_NOT_INDEXED, "series is neither our SEG nor an indexed CT series")
        for study_uid in sorted(indexed):
            if index.get_study(study_uid).series_uid == request.unique_uid:
                return study_uid, "study"
        raise QueryError(QUERY_OBJECT_NOT_INDEXED, "SeriesInstanceUID unknown to this node")

    def _lookup(self, uid: str, level: str) -> dict[str, Any] | None:
        """Orthanc's expanded resource (``Series`` or ``Instance``) holding this UID, if any."""
        key = "SeriesInstanceUID" if level == "Series" else "SOPInstanceUID"
        found = self.client.post_json("/tools/find", {"Level": level, "Query": {key: uid}, "Expand": True})
        return found[0] if found else None

    def _parent_study_uid(self, uid: str, level: str) -> str | None:
        resource = self._lookup(uid, level)
        if resource is None:
            return None
        study = self.client.get_json(f"/{'series' if level == 'Series' else 'instances'}/{resource['ID']}/study")
        return study.get("MainDicomTags", {}).get("StudyInstanceUID")

    def search(self, request: ParsedRequest) -> tuple[SimilarQuery, list[SimilarCase]]:
        """Resolve the query object, run the index search, apply the standard-key filters.

        Raises:
            QueryError: 0xC001 (not indexed), 0xA900 (bad filter), 0xA700 (index unusable).
        """
        try:
            with query_index(self.config.index_directory, self.config.index_database,
                             ef_search=self.config.index_ef_search) as index:
                query = self.resolve(request, index)
                try:
                    results = find_similar(index, query)
                except ValueError as error:  # bad filter / range
                    raise QueryError(IDENTIFIER_DOES_NOT_MATCH, str(error)) from None
        except QueryError:
            raise
        except OrthancError as error:
            log.warning("Orthanc look-up failed: %s", error)
            raise QueryError(UNABLE_TO_PROCESS, "Orthanc look-up failed; see the similar-cases service log") from None
        except sqlite3.DatabaseError as error:
            log.error("case index %s unreadable (%s): rebuilding it", self.config.index_directory, error)
            with open_index(self.config.index_directory, self.config.index_lock_timeout_seconds,
                            on_rebuild=open_job_store(self.config.jobs_database).requeue_for_reindex):
                pass  # moved aside, reopened empty, processed studies queued for re-indexing
            raise QueryError(OUT_OF_RESOURCES, "case index was unreadable and is being rebuilt; retry later") from None
        except (OSError, RuntimeError, sqlite3.Error) as error:
            log.exception("case index %s unusable", self.config.index_directory)
            raise QueryError(OUT_OF_RESOURCES, f"case index unavailable: {type(error).__name__}") from None
        if request.has_result_filters:
            kept = [case for case in results if passes_standard_keys(case.study, request)][:request.k]
            results = [dataclasses.replace(case, rank=rank) for rank, case in enumerate(kept, start=1)]
        return query, results

    # -- answers ---------------------------------------------------------------------------------
    def identifier_for(self, case: SimilarCase, request: ParsedRequest, report: tuple[str, str, str] | None) -> Dataset:
        """One pending identifier: the requested keys, the fixed study keys, rank/score/mode/SR UID."""
        answer = Dataset()
        answer.SpecificCharacterSet = "ISO_IR 192"
        answer.QueryRetrieveLevel = request.level
        study = case.study
        values: dict[str, Any] = {
            "StudyInstanceUID": study.study_uid, "PatientID": study.patient_id,
            "PatientName": study.patient_name, "StudyDate": study.study_date,
            "StudyDescription": study.study_description, "AccessionNumber": study.accession_number,
            "ModalitiesInStudy": self._modalities(case), "RetrieveAETitle": self.retrieve_aet,
        }
        if request.level in ("SERIES", "IMAGE"):
            values.update(SeriesInstanceUID=study.series_uid, Modality="CT")
        if request.level == "IMAGE":
            matched = case.best_slices[0].matched_sop_instance_uid if case.best_slices else ""
            values.update(SOPInstanceUID=matched, SOPClassUID=case.sop_class_uid if matched else "")
        for keyword in request.return_keywords:
            if keyword not in values and keyword not in ("QueryRetrieveLevel", "SpecificCharacterSet"):
                values[keyword] = ""
        for keyword, value in values.items():
            setattr(answer, keyword, value)
        block = answer.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
        block.add_new(RANK.offset, RANK.vr, str(case.rank))
        block.add_new(SCORE.offset, SCORE.vr, f"{case.score:.6f}"[:16])
        block.add_new(MODE.offset, MODE.vr, case.mode)
        if report:
            block.add_new(SR_SERIES_INSTANCE_UID.offset, SR_SERIES_INSTANCE_UID.vr, report[0])
            block.add_new(SR_SOP_INSTANCE_UID.offset, SR_SOP_INSTANCE_UID.vr, report[1])
            block.add_new(QUERY_STUDY_UID.offset, QUERY_STUDY_UID.vr, report[2])
        return answer

    def _modalities(self, case: SimilarCase) -> list[str] | str:
        if self.client is not None and case.study.orthanc_study_id:
            try:
                series = self.client.get_json(f"/studies/{case.study.orthanc_study_id}/series")
                return sorted({s.get("MainDicomTags", {}).get("Modality", "") for s in series} - {""}) or "CT"
            except Exception:  # noqa: BLE001 - the index record still knows CT
                log.warning("ModalitiesInStudy of %s: Orthanc look-up failed", case.study_uid)
        return "CT"

    # -- the similar-cases SR ------------------------------------------------------------------------

"""The REST twin of the similar-case C-FIND.

* ``GET /abscess-node/studies/{id}/similar`` answers (a read: it writes nothing);
* ``POST /abscess-node/studies/{id}/similar-report`` answers and stores the on-demand SR of
  those answers in the study (idempotent: the same query and answers give the same SR).

The query parameters are turned into the same identifier a C-FIND would carry, so every route
shares the parsing, the policy, the search and the audit of
:class:`~dicom_node.similar.service.SimilarCaseService`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from pydicom.dataset import Dataset

from dicom_node.similar.policy import Caller
from dicom_node.similar.request import (
    FILTERS,
    IDENTIFIER_DOES_NOT_MATCH,
    MODE,
    OUT_OF_RESOURCES,
    PRIVATE_CREATOR,
    PRIVATE_GROUP,
    QUERY_OBJECT_NOT_INDEXED,
    REFUSED_NOT_AUTHORISED,
    REQUESTED_K,
    SLICE_RANGE,
    STANDARD_FILTER_KEYWORDS,
    USE_DESCRIPTORS,
    ParsedRequest,
    QueryError,
    parse_request,
)
from dicom_node.similar.service import Answer, SimilarCaseService

log = logging.getLogger("abscess_node.similar_find")

HTTP_STATUS = {REFUSED_NOT_AUTHORISED: 403, QUERY_OBJECT_NOT_INDEXED: 404, IDENTIFIER_DOES_NOT_MATCH: 400,
               OUT_OF_RESOURCES: 503}
"""HTTP status of each failure status (any other: 500)."""


def identifier_from_params(study_uid: str, params: Mapping[str, str]) -> Dataset:
    """The STUDY-level C-FIND identifier equivalent to the REST query parameters."""
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_uid
    block = identifier.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    for name, element in (("k", REQUESTED_K), ("mode", MODE), ("descriptors", USE_DESCRIPTORS)):
        if params.get(name):
            block.add_new(element.offset, element.vr, params[name].upper() if name == "descriptors" else params[name])
    if params.get("filters"):
        block.add_new(FILTERS.offset, FILTERS.vr, [f.strip() for f in params["filters"].split(",") if f.strip()])
    if params.get("slices"):
        block.add_new(SLICE_RANGE.offset, SLICE_RANGE.vr, params["slices"].replace("-", "\\", 1).split("\\"))
    for keyword in STANDARD_FILTER_KEYWORDS:
        if params.get(keyword):
            setattr(identifier, keyword, params[keyword])
    return identifier


def answer_params(service: SimilarCaseService, study_uid: str, params: Mapping[str, str], user: str,
                  store_report: bool = False) -> tuple[ParsedRequest, Answer]:
    """The REST parameters parsed and answered through :meth:`SimilarCaseService.answer` (policy,
    search, report, pseudonymisation, audit), as the REST user ``user``.

    Raises:
        QueryError: refused, not indexed, bad parameter, index unusable (see :func:`error_answer`).
    """
    request = parse_request(identifier_from_params(study_uid, params), service.config.similar_cases_top_k)
    return request, service.answer(request, Caller("rest", user), store_report=store_report)


def error_answer(error: Exception) -> tuple[int, dict[str, Any]]:
    """The HTTP status and JSON body of a failed REST query (the details of an unexpected error are logged)."""
    if isinstance(error, QueryError):
        return HTTP_STATUS.get(error.status, 500), {"error": error.comment, "dicom_status": f"0x{error.status:04X}"}
    log.error("REST similar-cases query failed", exc_info=error)
    return 500, {"error": "internal error; see the similar-cases service log"}


def rest_query(service: SimilarCaseService, study_uid: str, params: Mapping[str, str], user: str,
               store_report: bool = False) -> tuple[int, Any]:
    """JSON answer of ``GET .../similar`` (or, with ``store_report``, of ``POST .../similar-report``).

    Args:
        service: the similar-case service.
        study_uid: StudyInstanceUID of the query study.
        params: ``k``, ``mode``, ``filters`` (comma-separated), ``slices`` (``first-last``),
            ``descriptors`` (``yes``/``no``), ``StudyDate``, ``StudyDescription``, ``PatientSex``.
        user: the HTTP user Orthanc authenticated ("" when anonymous).
        store_report: store the on-demand SR of the answers in the query study.

    Returns:
        (HTTP status, JSON-ready body): 200 with the ranked results, 400 for a bad parameter,
        403 for a caller the policy refuses, 404 for a study that is not indexed, 503 when the
        index is unusable.
    """
    try:
        request, answer = answer_params(service, study_uid, params, user, store_report)
    except Exception as error:  # noqa: BLE001 - every failure becomes an HTTP answer
        return error_answer(error)
    query, report = answer.query, answer.report
    return 200, {"query": {"study_uid": study_uid, "k": request.k, "mode": query.mode, "filters": list(query.filters),
                           "slice_range": list(query.slice_range) if query.slice_range else None},
                 "similar_cases_sr": ({"series_uid": report[0], "sop_instance_uid": report[1]} if report else None),
                 "results": [case.as_dict() for case in answer.cases]}

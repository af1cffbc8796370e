"""The node's REST routes as plain functions (the plugin only forwards Orthanc's callbacks here).

Routes (all under Orthanc's HTTP server, behind its authentication):

* ``GET  /abscess-node/jobs?state=&study=&limit=`` — most recent jobs first.
* ``GET  /abscess-node/jobs/{id}`` — one job: state, study, chosen series and why, timings per
  stage, result (SEG ids and URL), error message.
* ``POST /abscess-node/studies/{orthanc-id}/process`` — (re)run one study, even if unchanged
  (body ``{"Force": false}``: only if its content changed).
* ``GET  /abscess-node/jobs/counts`` — jobs per state now, and how many ever finished in each state.
* ``POST /abscess-node/jobs/{id}/retry`` (a failed job), ``.../cancel`` (a queued job),
  ``.../rerun`` (a finished job) — the dashboard's actions; they need ``Content-Type:
  application/json`` (no cross-site request can send it). Retry and re-run queue a new job for
  the study (forced: even if its content did not change); the old job keeps its history.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from dicom_node.http_security import is_json_request
from dicom_node.jobs import FINAL_STATES, STATES, JobStore, NotFoundError

Answer = tuple[int, dict[str, Any] | list[Any]]


def list_jobs(store: JobStore, query: Mapping[str, str]) -> Answer:
    """``GET /abscess-node/jobs``."""
    state = query.get("state")
    if state is not None and state not in STATES:
        return 400, {"error": f"state must be one of {', '.join(STATES)}"}
    try:
        limit = int(query.get("limit", "100"))
    except ValueError:
        return 400, {"error": "limit must be a whole number"}
    return 200, store.list(state=state, study_uid=query.get("study"), limit=max(1, min(limit, 1000)))


def get_job(store: JobStore, job_id: str) -> Answer:
    """``GET /abscess-node/jobs/{id}``."""
    try:
        return 200, store.get(int(job_id))
    except (NotFoundError, ValueError):
        return 404, {"error": f"no job {job_id}"}


def process_study(store: JobStore, orthanc_study_id: str, body: bytes,
                  lookup_study_uid: Callable[[str], str | None]) -> Answer:
    """``POST /abscess-node/studies/{id}/process`` with an optional JSON body ``{"Force": false}``.

    By default the study is re-processed even if its content did not change.

    Args:
        body: the request body (empty, or a JSON object).
        lookup_study_uid: returns the StudyInstanceUID of an Orthanc study id, None if unknown.
    """
    try:
        options = json.loads(body) if body and body.strip() else {}
        force = options.get("Force", True) if isinstance(options, dict) else None
    except ValueError:
        force = None
    if not isinstance(force, bool):
        return 400, {"error": 'the body must be empty or a JSON object like {"Force": false}'}
    study_uid = lookup_study_uid(orthanc_study_id)
    if study_uid is None:
        return 404, {"error": f"Orthanc has no study {orthanc_study_id}"}
    return 200, store.enqueue(orthanc_study_id, study_uid, reason="manual", force=force)


def job_counts(store: JobStore) -> Answer:
    """``GET /abscess-node/jobs/counts``."""
    return 200, {"jobs": store.counts(), "finished": store.finished_counts()}


def job_action(store: JobStore, job_id: str, action: str, headers: Mapping[str, str]) -> Answer:
    """``POST /abscess-node/jobs/{id}/{retry|cancel|rerun}``: the changed or the new job.

    Returns:
        200 with the job (cancel: the cancelled job; retry/re-run: the queued job of the study),
        404 for an unknown job, 409 when the job's state does not allow the action, 415 without
        ``Content-Type: application/json``.
    """
    if not is_json_request(headers):
        return 415, {"error": "send dashboard actions with Content-Type: application/json "
                              "(it keeps other web sites from triggering them)"}
    try:
        job = store.get(int(job_id))
    except (NotFoundError, ValueError):
        return 404, {"error": f"no job {job_id}"}
    state = job["state"]
    if action == "cancel":
        if store.cancel(job["id"]):
            return 200, store.get(job["id"])
        return 409, {"error": f"job {job_id} is {state}: only a queued job can be cancelled "
                              "(a running one finishes its attempt)"}
    if action == "retry" and state != "failed":
        return 409, {"error": f"job {job_id} is {state}: only a failed job is retried (re-run a finished one)"}
    if action == "rerun" and state not in FINAL_STATES:
        return 409, {"error": f"job {job_id} is {state}: re-run it once it has finished"}
    if action not in ("retry", "rerun"):
        return 404, {"error": f"no action {action}: retry, cancel or rerun"}
    return 200, store.enqueue(job["orthanc_study_id"], job["study_uid"],
                              reason="retry" if action == "retry" else "manual", force=True)


def encode(answer: Answer) -> tuple[int, bytes]:
    """Status code and JSON body bytes."""
    status, body = answer
    return status, json.dumps(body, indent=1).encode()

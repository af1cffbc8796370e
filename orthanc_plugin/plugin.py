"""The Orthanc side of abscess-node: configuration, change callback, REST routes, workers.

Everything here only hands work on: STABLE_STUDY -> a job in the job store; REST calls -> the
functions of :mod:`dicom_node.rest`; worker processes -> :class:`dicom_node.supervisor.WorkerSupervisor`.
Orthanc calls OnChange callbacks on one thread and every callback holds the one GIL of its
embedded interpreter (orthanc-python 4.0 has no AllowThreads), so each callback stays short.
"""

from __future__ import annotations

import json
from typing import Any

import orthanc

from dicom_node import rest
from dicom_node.config import ConfigError, NodeConfig
from dicom_node.jobs import JobStore
from dicom_node.supervisor import WorkerSupervisor

STATE: dict[str, Any] = {}


def _study_uid(orthanc_study_id: str) -> str | None:
    try:
        study = json.loads(orthanc.RestApiGet(f"/studies/{orthanc_study_id}"))
    except Exception:  # Orthanc raises OrthancException for an unknown resource
        return None
    return study.get("MainDicomTags", {}).get("StudyInstanceUID", "")


def on_change(change_type: int, level: int, resource_id: str) -> None:
    """Enqueue stable studies; start/stop the workers with Orthanc."""
    config: NodeConfig = STATE["config"]
    store: JobStore = STATE["store"]
    if change_type == orthanc.ChangeType.STABLE_STUDY and config.enabled:
        job = store.enqueue(resource_id, _study_uid(resource_id), reason="stable")
        orthanc.LogInfo(f"abscess-node: study {job['study_uid']} -> job {job['id']} ({job['state']})")
    elif change_type == orthanc.ChangeType.ORTHANC_STARTED:
        requeued = store.requeue_interrupted()
        if requeued:
            orthanc.LogWarning(f"abscess-node: re-queued jobs interrupted by the last shutdown: {requeued}")
        STATE["supervisor"].start()
    elif change_type == orthanc.ChangeType.ORTHANC_STOPPED:
        STATE["supervisor"].stop()


def _answer(output: Any, answer: rest.Answer) -> None:
    status, body = rest.encode(answer)
    if status == 200:
        output.AnswerBuffer(body, "application/json")
    else:
        output.SendHttpStatus(status, body.decode(), len(body))


def on_jobs(output: Any, uri: str, **request: Any) -> None:
    """GET /abscess-node/jobs and /abscess-node/jobs/{id}."""
    if request["method"] != "GET":
        output.SendMethodNotAllowed("GET")
        return
    groups = request.get("groups") or ()
    if groups and groups[0]:
        _answer(output, rest.get_job(STATE["store"], groups[0]))
    else:
        _answer(output, rest.list_jobs(STATE["store"], request.get("get") or {}))


def on_process(output: Any, uri: str, **request: Any) -> None:
    """POST /abscess-node/studies/{id}/process."""
    if request["method"] != "POST":
        output.SendMethodNotAllowed("POST")
        return
    _answer(output, rest.process_study(STATE["store"], request["groups"][0], request.get("body") or b"", _study_uid))


def register() -> None:
    """Read the configuration, then register callbacks. A bad ``AbscessNode`` section stops Orthanc."""
    full_config = json.loads(orthanc.GetConfiguration())
    try:
        config = NodeConfig.from_section(full_config.get("AbscessNode"))
    except ConfigError as error:
        orthanc.LogError(f"abscess-node: invalid configuration: {error}")
        raise SystemExit(f"abscess-node: invalid configuration: {error}") from None
    port = int(full_config.get("HttpPort", 8042))
    STATE["config"] = config
    STATE["store"] = JobStore(config.jobs_database)
    STATE["supervisor"] = WorkerSupervisor(
        config, f"http://127.0.0.1:{port}", orthanc.GenerateRestApiAuthorizationToken(), orthanc.LogWarning)
    orthanc.RegisterOnChangeCallback(on_change)
    orthanc.RegisterRestCallback("/abscess-node/jobs(?:/([0-9]+))?", on_jobs)
    orthanc.RegisterRestCallback("/abscess-node/studies/([0-9a-f-]+)/process", on_process)
    orthanc.LogWarning(f"abscess-node: enabled={config.enabled}, {config.worker_count} worker(s), "
                       f"weights {config.weights_path}, jobs in {config.jobs_database}")

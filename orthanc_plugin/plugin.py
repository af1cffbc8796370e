"""The Orthanc side of abscess-node: configuration, change callback, REST routes, C-FIND, workers.

Everything here only hands work on: STABLE_STUDY -> a job in the job store; REST calls -> the
functions of :mod:`dicom_node.job_routes`; child processes -> :class:`dicom_node.supervisor.ProcessSupervisor`;
C-FIND -> for the called AE title ``SimilarCasesAet``, the similar-cases service the supervisor
runs (through :mod:`dicom_node.similar.relay`), for any other called AE title
:mod:`dicom_node.ordinary_find` (Orthanc's own answers, rebuilt from its REST API).
Orthanc calls OnChange callbacks on one thread and every callback holds the one GIL of its
embedded interpreter (orthanc-python 4.0 has no AllowThreads), so each callback stays short.
"""

from __future__ import annotations

import base64
import json
import os
import threading
from pathlib import Path
from typing import Any

import orthanc

from dicom_node import job_routes, ordinary_find, ui
from dicom_node.config import ConfigError, NodeConfig
from dicom_node.intake import Intake
from dicom_node.http_security import authenticated_user, body_arguments, orthanc_security_problems, query_arguments
from dicom_node.jobs import JobStore, open_job_store
from dicom_node.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from dicom_node.metrics import NodeCollector, exposition
from dicom_node.similar.relay import RelayUnavailable
from dicom_node.supervisor import ProcessSupervisor

STATE: dict[str, Any] = {}


def _study_uid(orthanc_study_id: str) -> str | None:
    try:
        study = json.loads(orthanc.RestApiGet(f"/studies/{orthanc_study_id}"))
    except Exception:  # Orthanc raises OrthancException for an unknown resource
        return None
    return study.get("MainDicomTags", {}).get("StudyInstanceUID", "")


def on_change(change_type: int, level: int, resource_id: str) -> None:
    """Enqueue stable studies, record deleted ones for erasure, start/stop the child processes with Orthanc."""
    intake: Intake = STATE["intake"]
    if change_type == orthanc.ChangeType.STABLE_STUDY:
        job = intake.stable(resource_id, _study_uid(resource_id))
        if job:
            orthanc.LogInfo(f"abscess-node: study {job['study_uid']} -> job {job['id']} ({job['state']})")
    elif change_type == orthanc.ChangeType.DELETED and level == orthanc.ResourceType.STUDY:
        intake.deleted(resource_id)  # the similar-cases service erases it from the index
    elif change_type == orthanc.ChangeType.ORTHANC_STARTED:
        config: NodeConfig = STATE["config"]
        store: JobStore = STATE["store"]
        supervisor: ProcessSupervisor = STATE["supervisor"]
        for job in store.requeue_all_running("the node stopped while this attempt ran", config.max_attempts,
                                             worker_prefix=supervisor.worker_prefix):
            orthanc.LogWarning(f"abscess-node: job {job['id']} interrupted by the last shutdown -> {job['state']}")
        supervisor.start()
        threading.Thread(target=_start_intake, name="abscess-node-intake", daemon=True).start()
    elif change_type == orthanc.ChangeType.ORTHANC_STOPPED:
        STATE["intake_stop"].set()
        STATE["supervisor"].stop()


def _start_intake() -> None:
    """Replay the changes Orthanc logged while the node was down, then keep retrying missed events."""
    intake: Intake = STATE["intake"]
    try:
        replayed = intake.replay_changes()
        if replayed:
            orthanc.LogWarning(f"abscess-node: {replayed} study event(s) logged while the node was down were replayed")
    except Exception as error:
        orthanc.LogError(f"abscess-node: replaying Orthanc's change log failed: {error}")
    intake.run(STATE["intake_stop"])


def _answer(output: Any, answer: job_routes.Answer) -> None:
    status, body = job_routes.encode(answer)
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
        _answer(output, job_routes.get_job(STATE["store"], groups[0]))
    else:
        _answer(output, job_routes.list_jobs(STATE["store"], query_arguments(request.get("get"))))


def on_process(output: Any, uri: str, **request: Any) -> None:
    """POST /abscess-node/studies/{id}/process."""
    if request["method"] != "POST":
        output.SendMethodNotAllowed("POST")
        return
    _answer(output, job_routes.process_study(STATE["store"], request["groups"][0], request.get("body") or b"", _study_uid))


class SimilarQueryFailed(RuntimeError):
    """The similar-cases service answered a failure status. orthanc-python 4.0 cannot set a C-FIND
    status or ErrorComment, so raising is the only way to fail the C-FIND: Orthanc logs this
    message and answers 0xC000 (Unable to process)."""


def _similar_find(answers: Any, query: Any, issuer_aet: str) -> None:
    tags = [[query.GetFindQueryTagGroup(i), query.GetFindQueryTagElement(i), query.GetFindQueryValue(i)]
            for i in range(query.GetFindQuerySize())]
    supervisor: ProcessSupervisor = STATE["supervisor"]
    for response in supervisor.relay.find(tags, issuer_aet):
        if response.status in (0xFF00, 0xFF01) and response.dicom:
            answers.FindAddAnswer(response.dicom)
        elif response.status == 0xFE00:
            answers.FindMarkIncomplete()
        elif response.status != 0x0000:
            orthanc.LogWarning(f"abscess-node: similar-cases C-FIND from {issuer_aet}: "
                               f"status 0x{response.status:04X} {response.comment or ''}")
            raise SimilarQueryFailed(f"0x{response.status:04X} {response.comment or ''}")


def _rest_get(path: str) -> Any:
    """In-process REST GET: parsed JSON, or the text of a non-JSON answer (metadata)."""
    body = orthanc.RestApiGet(path)
    try:
        return json.loads(body)
    except ValueError:
        return body.decode(errors="replace")


def _ordinary_find(answers: Any, query: Any) -> None:
    tags = [(query.GetFindQueryTagGroup(i), query.GetFindQueryTagElement(i), query.GetFindQueryValue(i))
            for i in range(query.GetFindQuerySize())]
    settings = STATE["find_settings"]
    result = ordinary_find.ordinary_find(
        tags, _rest_get,
        lambda path, body: json.loads(orthanc.RestApiPost(path, json.dumps(body))), **settings)
    for answer in result.answers:
        answers.FindAddAnswer(orthanc.CreateDicom(json.dumps(answer), None, orthanc.CreateDicomFlags.NONE))
    if not result.complete:
        answers.FindMarkIncomplete()


def on_find(answers: Any, query: Any, issuer_aet: str, called_aet: str) -> None:
    """C-FIND SCP (replaces Orthanc's): dispatch on the called AE title.

    Orthanc has already applied its own rule (calling AE in DicomModalities, or DicomAlwaysAllowFind).
    An exception raised here makes Orthanc answer a C-FIND failure (0xC000) and log it.
    """
    if called_aet.strip() == STATE["config"].similar_cases_aet:
        _similar_find(answers, query, issuer_aet.strip())
    else:
        _ordinary_find(answers, query)


def on_similar(output: Any, uri: str, **request: Any) -> None:
    """GET /abscess-node/studies/{id}/similar (answers) and POST .../similar-report (answers + stored SR)."""
    store_report = uri.endswith("/similar-report")
    if request["method"] != ("POST" if store_report else "GET"):
        output.SendMethodNotAllowed("POST" if store_report else "GET")
        return
    study_uid = _study_uid(request["groups"][0])
    if not study_uid:
        _answer(output, (404, {"error": f"no study {request['groups'][0]} in Orthanc"}))
        return
    headers = request.get("headers") or {}
    try:  # Orthanc passes no query string on POST: the report route takes its query as a JSON body
        params = {**query_arguments(request.get("get")), **body_arguments(request.get("body"), headers)}
    except ValueError as error:
        _answer(output, (400, {"error": str(error)}))
        return
    user = authenticated_user(headers)
    supervisor: ProcessSupervisor = STATE["supervisor"]
    try:
        status, body = supervisor.relay.similar(study_uid, params, user, store_report=store_report)
    except (RelayUnavailable, OSError) as error:
        status, body = 503, {"error": str(error)}
    _answer(output, (status, body))


def _page(output: Any, content: bytes, media_type: str) -> None:
    for name, value in ui.PAGE_HEADERS.items():
        output.SetHttpHeader(name, value)
    output.AnswerBuffer(content, media_type)


def on_ui(output: Any, uri: str, **request: Any) -> None:
    """GET /abscess-node/ui/ (the queue dashboard), its other pages and their assets."""
    if request["method"] != "GET":
        output.SendMethodNotAllowed("GET")
        return
    name = (request.get("groups") or (None,))[0] or ""  # Orthanc hands /ui and /ui/ over alike
    found = ui.static_file(name)
    if found is None:
        _answer(output, (404, {"error": f"no page {name}"}))
    else:
        _page(output, *found)


def on_ohif(output: Any, uri: str, **request: Any) -> None:
    """GET /ohif/ (and /ohif: Orthanc hands both over alike) opens the viewer; ServeFolders answers
    /ohif/index.html and the viewer's files, not the bare folder."""
    if request["method"] != "GET":
        output.SendMethodNotAllowed("GET")
    elif STATE["viewer_index"] is None:
        _answer(output, (404, {"error": "the OHIF viewer is not laid out: run `make viewer`"}))
    else:
        output.AnswerBuffer(STATE["viewer_index"], "text/html")


def on_metrics(output: Any, uri: str, **request: Any) -> None:
    """GET /abscess-node/metrics: Prometheus text format (next to Orthanc's /tools/metrics-prometheus)."""
    if request["method"] != "GET":
        output.SendMethodNotAllowed("GET")
        return
    output.AnswerBuffer(exposition(STATE["collector"]), METRICS_CONTENT_TYPE)


def on_job_counts(output: Any, uri: str, **request: Any) -> None:
    """GET /abscess-node/jobs/counts."""
    if request["method"] != "GET":
        output.SendMethodNotAllowed("GET")
        return
    _answer(output, job_routes.job_counts(STATE["store"]))


def on_job_action(output: Any, uri: str, **request: Any) -> None:
    """POST /abscess-node/jobs/{id}/retry, .../cancel, .../rerun (the dashboard's actions)."""
    if request["method"] != "POST":
        output.SendMethodNotAllowed("POST")
        return
    job_id, action = request["groups"]
    headers = request.get("headers") or {}
    status, body = job_routes.job_action(STATE["store"], job_id, action, headers)
    if status == 200:
        orthanc.LogWarning(f"abscess-node: {authenticated_user(headers) or 'a REST client'} asked to {action} job "
                           f"{job_id} -> job {body['id']} {body['state']}")
    _answer(output, (status, body))


def on_gallery(output: Any, uri: str, **request: Any) -> None:
    """GET /abscess-node/studies/{id}/gallery: the similar cases of one study with their slice pairs."""
    if request["method"] != "GET":
        output.SendMethodNotAllowed("GET")
        return
    study_uid = _study_uid(request["groups"][0])
    if not study_uid:
        _answer(output, (404, {"error": f"no study {request['groups'][0]} in Orthanc"}))
        return
    user = authenticated_user(request.get("headers") or {})
    supervisor: ProcessSupervisor = STATE["supervisor"]
    try:
        _answer(output, supervisor.relay.gallery(study_uid, query_arguments(request.get("get")), user))
    except (RelayUnavailable, OSError) as error:
        _answer(output, (503, {"error": str(error)}))


def on_thumbnail(output: Any, uri: str, **request: Any) -> None:
    """GET /abscess-node/thumbnails/{reference}: one PNG of a gallery (opaque, per-answer reference)."""
    if request["method"] != "GET":
        output.SendMethodNotAllowed("GET")
        return
    user = authenticated_user(request.get("headers") or {})
    supervisor: ProcessSupervisor = STATE["supervisor"]
    try:
        status, body = supervisor.relay.thumbnail(request["groups"][0], user)
    except (RelayUnavailable, OSError) as error:
        status, body = 503, {"error": str(error)}
    if status == 200:
        output.SetHttpHeader("Cache-Control", "private, max-age=3600")
        output.AnswerBuffer(base64.b64decode(body["png"]), "image/png")
    else:
        _answer(output, (status, body))


def register() -> None:
    """Read the configuration, then register callbacks. A bad ``AbscessNode`` section stops Orthanc."""
    full_config = json.loads(orthanc.GetConfiguration())
    try:
        config = NodeConfig.from_section(full_config.get("AbscessNode"))
    except ConfigError as error:
        orthanc.LogError(f"abscess-node: invalid configuration: {error}")
        raise SystemExit(f"abscess-node: invalid configuration: {error}") from None
    problems = orthanc_security_problems(full_config)
    if problems:
        for problem in problems:
            orthanc.LogError(f"abscess-node: refusing to start: {problem}")
        raise SystemExit(f"abscess-node: refusing to start: {'; '.join(problems)}")
    port = int(full_config.get("HttpPort", 8042))
    STATE["config"] = config
    STATE["store"] = open_job_store(config.jobs_database)
    STATE["intake"] = Intake(STATE["store"], _rest_get, config.enabled, orthanc.LogError)
    STATE["intake_stop"] = threading.Event()
    retrieve_aet = str(full_config.get("DicomAet", "ORTHANC"))
    STATE["supervisor"] = ProcessSupervisor(
        config, f"http://127.0.0.1:{port}", orthanc.GenerateRestApiAuthorizationToken(), orthanc.LogWarning,
        retrieve_aet=retrieve_aet)
    STATE["find_settings"] = {
        "retrieve_aet": retrieve_aet, "case_sensitive_pn": bool(full_config.get("CaseSensitivePN", False)),
        "limit_results": int(full_config.get("LimitFindResults", 0)),
        "limit_instances": int(full_config.get("LimitFindInstances", 0))}
    STATE["collector"] = NodeCollector(STATE["store"], lambda: dict(STATE["supervisor"].restarts))
    STATE["viewer_index"] = ui.viewer_index(full_config, Path(os.getcwd()))
    orthanc.RegisterOnChangeCallback(on_change)
    orthanc.RegisterFindCallback(on_find)
    orthanc.RegisterRestCallback("/abscess-node/studies/([0-9a-f-]+)/similar(?:-report)?", on_similar)
    orthanc.RegisterRestCallback("/abscess-node/jobs(?:/([0-9]+))?", on_jobs)
    orthanc.RegisterRestCallback("/abscess-node/studies/([0-9a-f-]+)/process", on_process)
    orthanc.RegisterRestCallback("/abscess-node/jobs/counts", on_job_counts)
    orthanc.RegisterRestCallback("/abscess-node/jobs/([0-9]+)/(retry|cancel|rerun)", on_job_action)
    orthanc.RegisterRestCallback("/abscess-node/studies/([0-9a-f-]+)/gallery", on_gallery)
    orthanc.RegisterRestCallback("/abscess-node/thumbnails/([A-Za-z0-9_-]+)", on_thumbnail)
    orthanc.RegisterRestCallback("/abscess-node/metrics", on_metrics)
    orthanc.RegisterRestCallback("/abscess-node/ui(?:/([a-z0-9.-]*))?", on_ui)
    orthanc.RegisterRestCallback("/ohif/?", on_ohif)
    orthanc.LogWarning(f"abscess-node: enabled={config.enabled}, {config.worker_count} worker(s), "
                       f"weights {config.weights_path}, jobs in {config.jobs_database}")

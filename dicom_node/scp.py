"""The standalone similar-cases service: a pynetdicom AE (C-ECHO, C-FIND) and a local JSON endpoint.

``python -m dicom_node serve`` runs it. Both front ends call the one handler,
:class:`dicom_node.cfind.SimilarCaseService`:

* DICOM (``--port``): Verification and Study/Patient Root Query/Retrieve - FIND. Every C-FIND
  it receives is a similar-case query (sites whose Orthanc already has a C-FIND plugin point
  their viewers here instead of at Orthanc's port).
* HTTP on 127.0.0.1 (``--http-port``), for the Orthanc plugin, which must not import the heavy
  libraries: ``POST /find`` takes the C-FIND query as Orthanc hands it to the plugin (a list of
  ``[group, element, value]``) and the calling AE title, and answers the responses with each
  identifier encoded as DICOM (base64); ``GET /similar?study_uid=...`` is the REST twin. Every
  request must carry the bearer token the plugin's supervisor wrote into ``--token-file``.
"""

from __future__ import annotations

import base64
import hmac
import io
import json
import logging
import threading
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from dicom_node.cfind import (
    IDENTIFIER_DOES_NOT_MATCH,
    PRIVATE_CREATOR,
    PRIVATE_ELEMENTS,
    PRIVATE_GROUP,
    SimilarCaseService,
    status_dataset,
)

log = logging.getLogger("abscess_node.scp")
CANCEL = 0xFE00


def _c_find(service: SimilarCaseService, event: Event) -> Iterator[tuple[Any, Dataset | None]]:
    """pynetdicom EVT_C_FIND handler: the shared handler, plus decoding errors and C-CANCEL."""
    calling_aet = event.assoc.requestor.ae_title
    try:
        identifier = event.identifier
    except Exception:  # noqa: BLE001 - undecodable identifier
        log.warning("C-FIND from %s: undecodable identifier", calling_aet)
        yield status_dataset(IDENTIFIER_DOES_NOT_MATCH, "identifier could not be decoded"), None
        return
    for status, answer in service.find(identifier, calling_aet):
        if event.is_cancelled:
            yield CANCEL, None
            return
        yield status, answer


def build_ae(service: SimilarCaseService, ae_title: str) -> tuple[AE, list[tuple[Any, Any]]]:
    """The AE (only its own called AE title accepted) and its event handlers."""
    ae = AE(ae_title=ae_title)
    ae.require_called_aet = True
    ae.add_supported_context(Verification)
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_supported_context(PatientRootQueryRetrieveInformationModelFind)
    handlers = [(evt.EVT_C_ECHO, lambda event: 0x0000), (evt.EVT_C_FIND, lambda event: _c_find(service, event))]
    return ae, handlers


def identifier_from_tags(tags: Sequence[Sequence[Any]]) -> Dataset:
    """Rebuild a C-FIND identifier from ``[group, element, value]`` triples (the Orthanc plugin's view).

    Standard tags take their dictionary VR; elements of our private block take the VRs of
    :data:`dicom_node.cfind.PRIVATE_ELEMENTS`; other private or unknown tags are kept as LO text.
    """
    identifier = Dataset()
    creators: dict[int, str] = {}
    for group, element, value in tags:
        if group % 2 and 0x10 <= element <= 0xFF:
            creators[(group << 8) | element] = str(value).strip()
    offsets = {e.offset: e for e in PRIVATE_ELEMENTS}
    for group, element, value in tags:
        tag = Tag(int(group), int(element))
        value = "" if value is None else str(value)
        if tag.is_private:
            if 0x10 <= tag.element <= 0xFF:
                vr = "LO"
            elif (creators.get((tag.group << 8) | (tag.element >> 8)) == PRIVATE_CREATOR and tag.group == PRIVATE_GROUP
                  and (tag.element & 0xFF) in offsets):
                vr = offsets[tag.element & 0xFF].vr
            else:
                vr = "LO"
        else:
            try:
                vr = dictionary_VR(tag)
            except KeyError:
                vr = "LO"
        if vr == "SQ":
            identifier.add_new(tag, vr, [])
            continue
        values = value.split("\\") if "\\" in value else value
        identifier.add_new(tag, vr.split(" or ")[0], values)
    return identifier


def encode_identifier(identifier: Dataset) -> bytes:
    """A C-FIND answer as a DICOM stream Orthanc's ``FindAddAnswer`` accepts (explicit VR little endian)."""
    identifier.file_meta = pydicom.dataset.FileMetaDataset()
    identifier.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    identifier.file_meta.MediaStorageSOPClassUID = StudyRootQueryRetrieveInformationModelFind
    identifier.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    buffer = io.BytesIO()
    identifier.save_as(buffer, enforce_file_format=True)
    del identifier.file_meta
    return buffer.getvalue()


def find_responses(service: SimilarCaseService, tags: Sequence[Sequence[Any]], calling_aet: str) -> list[dict[str, Any]]:
    """The responses of one C-FIND as JSON: ``status``, ``comment`` and the base64 ``dicom`` answer."""
    try:
        identifier = identifier_from_tags(tags)
        responses = list(service.find(identifier, calling_aet))
    except Exception:  # a query we cannot even rebuild
        log.exception("C-FIND relayed by Orthanc from %s: bad query", calling_aet)
        responses = [(status_dataset(IDENTIFIER_DOES_NOT_MATCH, "query could not be decoded"), None)]
    return [{"status": int(status.Status), "comment": status.get("ErrorComment"),
             "dicom": base64.b64encode(encode_identifier(answer)).decode() if answer is not None else None}
            for status, answer in responses]


class _LocalHandler(BaseHTTPRequestHandler):
    server: LocalServer

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("local HTTP: " + format, *args)

    def _authorised(self) -> bool:
        expected = f"Bearer {self.server.token}"
        return hmac.compare_digest(self.headers.get("Authorization", ""), expected)

    def _send(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        if not self._authorised():
            self._send(401, {"error": "missing or wrong token"})
            return
        if urlsplit(self.path).path != "/find":
            self._send(404, {"error": "unknown path"})
            return
        try:
            request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
            tags, calling_aet = request["tags"], str(request["calling_aet"])
        except (ValueError, KeyError, TypeError):
            self._send(400, {"error": "expected JSON with tags and calling_aet"})
            return
        self._send(200, {"responses": find_responses(self.server.service, tags, calling_aet)})

    def do_GET(self) -> None:
        if not self._authorised():
            self._send(401, {"error": "missing or wrong token"})
            return
        url = urlsplit(self.path)
        if url.path == "/health":
            self._send(200, {"ok": True})
            return
        if url.path != "/similar":
            self._send(404, {"error": "unknown path"})
            return
        params = {name: values[-1] for name, values in parse_qs(url.query).items()}
        study_uid = params.pop("study_uid", "")
        if not study_uid:
            self._send(400, {"error": "study_uid is required"})
            return
        status, body = self.server.service.rest_query(study_uid, params, calling=params.pop("user", "REST"))
        self._send(status, body)


class LocalServer(ThreadingHTTPServer):
    """The JSON endpoint the Orthanc plugin calls (127.0.0.1 only, bearer token)."""

    daemon_threads = True

    def __init__(self, port: int, service: SimilarCaseService, token: str) -> None:
        super().__init__(("127.0.0.1", port), _LocalHandler)
        self.service = service
        self.token = token


def serve(service: SimilarCaseService, ae_title: str, port: int, http_port: int = 0, token: str = "",
          host: str = "0.0.0.0") -> None:
    """Run the DICOM AE (when ``port``) and the local JSON endpoint (when ``http_port``) until killed."""
    servers = []
    if http_port:
        if not token:
            raise ValueError("the local JSON endpoint needs a token (--token-file)")
        local = LocalServer(http_port, service, token)
        threading.Thread(target=local.serve_forever, name="similar-http", daemon=True).start()
        servers.append(f"http://127.0.0.1:{http_port}")
    if port:
        ae, handlers = build_ae(service, ae_title)
        log.warning("similar-cases AE %s listening on %s:%d%s", ae_title, host, port,
                    f" (+ {servers[0]})" if servers else "")
        ae.start_server((host, port), block=True, evt_handlers=handlers)
    elif servers:
        log.warning("similar-cases service listening on %s", servers[0])
        threading.Event().wait()
    else:
        raise ValueError("nothing to serve: give --port and/or --http-port")

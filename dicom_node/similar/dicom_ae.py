"""The similar-cases service process: a pynetdicom AE (C-ECHO, C-FIND) and the plugin's relay.

``python -m dicom_node serve`` runs it. Both front ends call the one handler,
:class:`dicom_node.similar.service.SimilarCaseService`:

* DICOM (``--port``): Verification and Study/Patient Root Query/Retrieve - FIND. Every C-FIND
  it receives is a similar-case query (sites whose Orthanc already has a C-FIND plugin point
  their viewers here instead of at Orthanc's port).
* the relay (:mod:`dicom_node.similar.relay`), for the Orthanc plugin, which must not import
  the heavy libraries: the C-FIND query as Orthanc hands it to the plugin (a list of
  ``[group, element, value]``), answered with each identifier encoded as DICOM; and the REST twin.
"""

from __future__ import annotations

import io
import logging
import ssl
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

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

from dicom_node.similar.erasure import run_erasures
from dicom_node.similar.gallery import Gallery
from dicom_node.similar.relay import FindResponse, RelayServer
from dicom_node.similar.request import (
    IDENTIFIER_DOES_NOT_MATCH,
    PRIVATE_CREATOR,
    PRIVATE_ELEMENTS,
    PRIVATE_GROUP,
    status_dataset,
)
from dicom_node.similar.rest import rest_query
from dicom_node.similar.service import SimilarCaseService

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
    :data:`dicom_node.similar.request.PRIVATE_ELEMENTS`; other private or unknown tags are kept as LO text.
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


def find_responses(service: SimilarCaseService, tags: Sequence[Sequence[Any]], calling_aet: str) -> list[FindResponse]:
    """The responses of one C-FIND relayed by the plugin, each identifier encoded as DICOM."""
    try:
        identifier = identifier_from_tags(tags)
        responses = list(service.find(identifier, calling_aet))
    except Exception:  # a query we cannot even rebuild
        log.exception("C-FIND relayed by Orthanc from %s: bad query", calling_aet)
        responses = [(status_dataset(IDENTIFIER_DOES_NOT_MATCH, "query could not be decoded"), None)]
    return [FindResponse(int(status.Status), status.get("ErrorComment"),
                         encode_identifier(answer) if answer is not None else None)
            for status, answer in responses]


def tls_context(certificate: Path, private_key: Path | None, trusted: Path | None) -> ssl.SSLContext:
    """The server side of DICOM TLS (PS3.15 B.1): this AE's certificate, and, when ``trusted`` is
    given, client certificates required and checked against it."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=str(certificate), keyfile=str(private_key) if private_key else None)
    if trusted is not None:
        context.load_verify_locations(cafile=str(trusted))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def serve(service: SimilarCaseService, ae_title: str, port: int, relay: tuple[Path, str] | None = None,
          host: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> None:
    """Run the DICOM AE (when ``port``; over TLS with ``tls``) and the relay (when ``relay`` =
    (address file, token)) until killed."""
    listening = []
    if relay is not None:  # started by the plugin: this process also erases what Orthanc deletes
        stop = threading.Event()
        exists = service.client.study_exists if service.client is not None else (lambda orthanc_id: True)
        threading.Thread(target=run_erasures, args=(service.config, service.audit, exists, stop),
                         name="erasures", daemon=True).start()
        address_file, token = relay
        gallery = Gallery(service)
        server = RelayServer(
            address_file, token, lambda tags, calling: find_responses(service, tags, calling),
            lambda study_uid, params, user, store: rest_query(service, study_uid, params, user, store_report=store),
            gallery.answer, gallery.thumbnail)
        threading.Thread(target=server.serve_forever, name="similar-relay", daemon=True).start()
        listening.append(f"relay on 127.0.0.1:{server.port}")
    if port:
        ae, handlers = build_ae(service, ae_title)
        log.warning("similar-cases AE %s listening on %s:%d%s%s", ae_title, host, port, " over TLS" if tls else "",
                    f" (+ {listening[0]})" if listening else "")
        ae.start_server((host, port), block=True, evt_handlers=handlers, ssl_context=tls)
    elif listening:
        log.warning("similar-cases service: %s", listening[0])
        threading.Event().wait()
    else:
        raise ValueError("nothing to serve: give --port and/or a relay")

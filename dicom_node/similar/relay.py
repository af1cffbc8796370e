"""The relay between the Orthanc plugin and the similar-cases service: JSON over 127.0.0.1.

Orthanc's embedded interpreter must stay light (no pydicom, FAISS or torch in it), so the
plugin hands every similar-case C-FIND and every ``/similar`` REST call to the service process
through this relay. The protocol is defined here once, for both ends (standard library only):

* ``POST /find`` with ``{"tags": [[group, element, value], ...], "calling_aet": str}`` (the
  C-FIND query as Orthanc hands it to the plugin) answers ``{"responses": [...]}``, one
  :class:`FindResponse` per DIMSE response (the identifier as DICOM, base64).
* ``GET /similar?study_uid=...&user=...&<REST parameters>`` answers the REST twin's status and
  body; ``POST /similar-report?...`` (same parameters) also stores the on-demand SR.
* ``GET /gallery?study_uid=...&user=...&<REST parameters>`` answers the similar-case gallery
  (:mod:`dicom_node.similar.gallery`): status and JSON body;
  ``GET /thumbnail?token=...&user=...`` one of its thumbnails as ``{"png": base64}``.
* ``GET /health`` answers ``{"ok": true}``.

Every request carries ``Authorization: Bearer <token>``; the token is a secret the supervisor
writes into a 0600 file. The server binds a port of its own choosing on 127.0.0.1 and writes it
into the address file (0600), which the client reads before each connection: no port is
chosen by one process and bound by another.
"""

from __future__ import annotations

import base64
import dataclasses
import hmac
import http.client
import json
import logging
import time
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from dicom_node.private_files import read_private_file, write_private_file

log = logging.getLogger("abscess_node.relay")

FIND_PATH = "/find"
SIMILAR_PATH = "/similar"
REPORT_PATH = "/similar-report"
GALLERY_PATH = "/gallery"
THUMBNAIL_PATH = "/thumbnail"
HEALTH_PATH = "/health"
MAX_REQUEST_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class FindResponse:
    """One DIMSE C-FIND response: status, optional ErrorComment, optional identifier (DICOM bytes)."""

    status: int
    comment: str | None = None
    dicom: bytes | None = None

    def to_json(self) -> dict[str, Any]:
        """The response as the relay sends it."""
        return {"status": self.status, "comment": self.comment,
                "dicom": base64.b64encode(self.dicom).decode() if self.dicom is not None else None}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> FindResponse:
        """Inverse of :meth:`to_json`."""
        dicom = value.get("dicom")
        return cls(int(value["status"]), value.get("comment"), base64.b64decode(dicom) if dicom else None)


class RelayUnavailable(RuntimeError):
    """The service did not answer (not started yet, restarting, or gone)."""


class RelayClient:
    """The plugin's end of the relay.

    Args:
        address_file: where the service writes its port.
        token: the bearer token.
        timeout: seconds to wait for one answer.
    """

    def __init__(self, address_file: Path, token: str, timeout: float = 120.0) -> None:
        self.address_file = Path(address_file)
        self.token = token
        self.timeout = timeout

    def find(self, tags: list[list[Any]], calling_aet: str, wait_seconds: float = 20.0) -> list[FindResponse]:
        """Relay one C-FIND; the responses in order."""
        status, body = self._request("POST", FIND_PATH, {"tags": tags, "calling_aet": calling_aet}, wait_seconds)
        if status != 200:
            raise RelayUnavailable(f"similar-cases service answered HTTP {status}")
        return [FindResponse.from_json(response) for response in body["responses"]]

    def similar(self, study_uid: str, params: dict[str, str], user: str, store_report: bool = False,
                wait_seconds: float = 20.0) -> tuple[int, Any]:
        """Relay one REST similar-case query (``store_report``: and store its SR): (HTTP status, JSON body)."""
        query = urllib.parse.urlencode({**params, "study_uid": study_uid, "user": user})
        if store_report:
            return self._request("POST", f"{REPORT_PATH}?{query}", {}, wait_seconds)
        return self._request("GET", f"{SIMILAR_PATH}?{query}", None, wait_seconds)

    def gallery(self, study_uid: str, params: dict[str, str], user: str, wait_seconds: float = 20.0) -> tuple[int, Any]:
        """Relay one gallery request: (HTTP status, JSON body)."""
        query = urllib.parse.urlencode({**params, "study_uid": study_uid, "user": user})
        return self._request("GET", f"{GALLERY_PATH}?{query}", None, wait_seconds)

    def thumbnail(self, token: str, user: str, wait_seconds: float = 20.0) -> tuple[int, Any]:
        """Relay one thumbnail request: (HTTP status, ``{"png": base64}`` or ``{"error": ...}``)."""
        query = urllib.parse.urlencode({"token": token, "user": user})
        return self._request("GET", f"{THUMBNAIL_PATH}?{query}", None, wait_seconds)

    def _request(self, method: str, path: str, body: dict[str, Any] | None, wait_seconds: float) -> tuple[int, Any]:
        """One request; retried while the service is (re)starting, up to ``wait_seconds``."""
        deadline = time.monotonic() + wait_seconds
        payload = json.dumps(body).encode() if body is not None else None
        while True:
            try:
                port = int(read_private_file(self.address_file))
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=self.timeout)
                try:
                    connection.request(method, path, body=payload, headers={
                        "Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
                    response = connection.getresponse()
                    return response.status, json.loads(response.read() or b"null")
                finally:
                    connection.close()
            except (FileNotFoundError, ValueError, ConnectionRefusedError, ConnectionResetError) as error:
                if time.monotonic() > deadline:
                    raise RelayUnavailable(f"similar-cases service unreachable ({type(error).__name__})") from None
                time.sleep(0.5)


FindHandler = Callable[[list[list[Any]], str], list[FindResponse]]
SimilarHandler = Callable[[str, dict[str, str], str, bool], tuple[int, Any]]
GalleryHandler = Callable[[str, dict[str, str], str], tuple[int, Any]]
ThumbnailHandler = Callable[[str, str], tuple[int, Any]]


class _Handler(BaseHTTPRequestHandler):
    server: RelayServer

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("relay: " + format, *args)

    def _authorised(self) -> bool:
        header = self.headers.get("Authorization", "")
        return hmac.compare_digest(header.encode("utf-8", "replace"), f"Bearer {self.server.token}".encode())

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
        url = urllib.parse.urlsplit(self.path)
        if url.path == REPORT_PATH:
            self._similar(url.query, store_report=True)
            return
        if url.path != FIND_PATH:
            self._send(404, {"error": "unknown path"})
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
            if not 0 <= length <= MAX_REQUEST_BYTES:
                raise ValueError(length)
            request = json.loads(self.rfile.read(length))
            tags, calling_aet = request["tags"], str(request["calling_aet"])
            if not isinstance(tags, list):
                raise TypeError("tags")
        except (ValueError, KeyError, TypeError):
            self._send(400, {"error": "expected JSON with tags and calling_aet"})
            return
        responses = self.server.find(tags, calling_aet)
        self._send(200, {"responses": [response.to_json() for response in responses]})

    def do_GET(self) -> None:
        if not self._authorised():
            self._send(401, {"error": "missing or wrong token"})
            return
        url = urllib.parse.urlsplit(self.path)
        params = {name: values[-1] for name, values in urllib.parse.parse_qs(url.query).items()}
        if url.path == HEALTH_PATH:
            self._send(200, {"ok": True})
        elif url.path == SIMILAR_PATH:
            self._similar(url.query, store_report=False)
        elif url.path == GALLERY_PATH and self.server.gallery is not None:
            study_uid, user = params.pop("study_uid", ""), params.pop("user", "")
            self._send(*(self.server.gallery(study_uid, params, user) if study_uid
                         else (400, {"error": "study_uid is required"})))
        elif url.path == THUMBNAIL_PATH and self.server.thumbnail is not None:
            self._send(*self.server.thumbnail(params.get("token", ""), params.get("user", "")))
        else:
            self._send(404, {"error": "unknown path"})

    def _similar(self, query: str, store_report: bool) -> None:
        params = {name: values[-1] for name, values in urllib.parse.parse_qs(query).items()}
        study_uid = params.pop("study_uid", "")
        user = params.pop("user", "")
        if not study_uid:
            self._send(400, {"error": "study_uid is required"})
            return
        status, body = self.server.similar(study_uid, params, user, store_report)
        self._send(status, body)


class RelayServer(ThreadingHTTPServer):
    """The service's end of the relay: 127.0.0.1, a port it chose itself, bearer token.

    Args:
        address_file: where the chosen port is written (0600).
        token: the bearer token every request must carry.
        find: answers a relayed C-FIND.
        similar: answers a relayed REST query.
        gallery: answers a relayed gallery request (None: not served).
        thumbnail: answers a relayed thumbnail request (None: not served).
    """

    daemon_threads = True

    def __init__(self, address_file: Path, token: str, find: FindHandler, similar: SimilarHandler,
                 gallery: GalleryHandler | None = None, thumbnail: ThumbnailHandler | None = None) -> None:
        if not token:
            raise ValueError("the relay needs a token")
        super().__init__(("127.0.0.1", 0), _Handler)
        self.token = token
        self.find = find
        self.similar = similar
        self.gallery = gallery
        self.thumbnail = thumbnail
        self.port = self.server_address[1]
        write_private_file(Path(address_file), str(self.port))

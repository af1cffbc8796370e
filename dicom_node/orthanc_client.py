"""A small client of Orthanc's REST API, used by the worker processes (which never import ``orthanc``)."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import requests


class OrthancError(RuntimeError):
    """Orthanc answered with an error or could not be reached."""


class OrthancClient:
    """REST calls the pipeline needs.

    Args:
        url: base URL, e.g. ``http://127.0.0.1:8042``.
        authorization: value of the ``Authorization`` header (a token the plugin generated, or
            HTTP basic credentials), or None when authentication is off.
        timeout: seconds per request.
    """

    def __init__(self, url: str, authorization: str | None = None, timeout: float = 120.0) -> None:
        self.url = url.rstrip("/")
        self.session = requests.Session()
        if authorization:
            self.session.headers["Authorization"] = authorization
        self.timeout = timeout

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        try:
            response = self.session.request(method, self.url + path, timeout=self.timeout, **kwargs)
        except requests.RequestException as error:
            raise OrthancError(f"{method} {path}: Orthanc unreachable ({type(error).__name__})") from None
        if response.status_code >= 400:
            raise OrthancError(f"{method} {path}: HTTP {response.status_code} {response.text[:300]}")
        return response

    def get_json(self, path: str, **params: Any) -> Any:
        """GET a JSON resource."""
        return self._request("GET", path, params=params or None).json()

    def post_json(self, path: str, body: Any) -> Any:
        """POST a JSON body, return the JSON answer."""
        return self._request("POST", path, json=body).json()

    def study(self, orthanc_study_id: str) -> dict[str, Any]:
        """``/studies/{id}`` (MainDicomTags, PatientMainDicomTags, Series ids)."""
        return self.get_json(f"/studies/{orthanc_study_id}")

    def series_of_study(self, orthanc_study_id: str) -> list[dict[str, Any]]:
        """Every series of a study with its MainDicomTags and instance ids."""
        return self.get_json(f"/studies/{orthanc_study_id}/series")

    def instance_tags(self, orthanc_instance_id: str) -> dict[str, Any]:
        """Simplified tags of one instance (no pixel data)."""
        return self.get_json(f"/instances/{orthanc_instance_id}/simplified-tags")

    def download_instances(self, orthanc_instance_ids: list[str], directory: Path) -> list[Path]:
        """Save each instance's DICOM file into ``directory``; returns the paths."""
        directory.mkdir(parents=True, exist_ok=True)
        paths = []
        for instance_id in orthanc_instance_ids:
            path = directory / f"{instance_id}.dcm"
            if not path.exists():
                response = self._request("GET", f"/instances/{instance_id}/file", stream=True)
                partial = path.with_suffix(".part")
                with open(partial, "wb") as handle:
                    for chunk in response.iter_content(1 << 20):
                        handle.write(chunk)
                partial.rename(path)
            paths.append(path)
        return paths

    def instance_bytes(self, orthanc_instance_id: str) -> bytes:
        """The DICOM file of one instance, in memory (a single slice or a SEG; series go to disk)."""
        return self._request("GET", f"/instances/{orthanc_instance_id}/file").content

    def store(self, dicom_bytes: bytes) -> dict[str, Any]:
        """POST a DICOM instance; returns Orthanc's answer (ID, ParentStudy, ...)."""
        return self._request("POST", "/instances", data=dicom_bytes,
                             headers={"Content-Type": "application/dicom"}).json()

    def _found(self, method: str, path: str) -> bool:
        """Run a request; False when Orthanc answers 404, other errors raise."""
        try:
            self._request(method, path)
        except OrthancError as error:
            if "HTTP 404" in str(error):
                return False
            raise
        return True

    def delete_instance(self, orthanc_instance_id: str) -> bool:
        """Delete an instance; False if it was already gone."""
        return self._found("DELETE", f"/instances/{orthanc_instance_id}")

    def study_exists(self, orthanc_study_id: str) -> bool:
        """Whether Orthanc still holds the study."""
        return self._found("GET", f"/studies/{orthanc_study_id}")

    def instance_exists(self, orthanc_instance_id: str) -> bool:
        """Whether Orthanc still holds the instance."""
        return self._found("GET", f"/instances/{orthanc_instance_id}")

    def send_to_modality(self, modality: str, resources: list[str], timeout_seconds: float = 300.0,
                         poll_seconds: float = 0.5) -> dict[str, Any]:
        """One C-STORE of ``resources`` to a configured modality through an Orthanc job (no retry here:
        the node's forward queue retries with back-off).

        Returns:
            ``{"modality", "job", "state", "error"}``; state is ``Success``, ``Failure`` or ``Timeout``
            (the Orthanc job is cancelled when it outlives ``timeout_seconds``).
        """
        job = self.post_json(f"/modalities/{modality}/store",
                             {"Resources": resources, "Asynchronous": True, "Synchronous": False})
        job_id = job["ID"]
        deadline = time.monotonic() + timeout_seconds
        while True:
            status = self.get_json(f"/jobs/{job_id}")
            if status["State"] in ("Success", "Failure"):
                error = status.get("ErrorDescription", "") if status["State"] == "Failure" else ""
                if status["State"] == "Failure" and status.get("ErrorDetails"):
                    error = f"{error}: {status['ErrorDetails']}"[:300]
                return {"modality": modality, "job": job_id, "state": status["State"], "error": error}
            if time.monotonic() > deadline:
                with contextlib.suppress(OrthancError):
                    self.post_json(f"/jobs/{job_id}/cancel", {})
                return {"modality": modality, "job": job_id, "state": "Timeout",
                        "error": f"no answer within ForwardTimeoutSeconds={timeout_seconds:.0f}"}
            time.sleep(poll_seconds)

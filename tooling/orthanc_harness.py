"""Run the real Orthanc binary with a configuration (the demo and the test fixture use this).

This only starts and stops the ``Orthanc`` executable and sends studies with dcmtk's
``storescu``, exactly as an administrator and a PACS would.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import requests

from dicom_node.config import CHECKOUT

PLUGIN_DIRECTORY = Path("/usr/share/orthanc/plugins")
ADMIN = "admin"
"""The HTTP user of the shipped orthanc.json (its password comes from ABSCESS_NODE_ADMIN_PASSWORD)."""


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def node_configuration(base: Path | None = None, **overrides: Any) -> dict[str, Any]:
    """The repository's ``orthanc.json`` with absolute paths, top-level ``overrides`` applied."""
    config = json.loads((base or CHECKOUT / "orthanc.json").read_text())
    config["PythonScript"] = str(CHECKOUT / "orthanc_plugin" / "entry.py")
    abscess = dict(config.get("AbscessNode", {}))
    abscess.update(overrides.pop("AbscessNode", {}))
    config.update(overrides)
    config["AbscessNode"] = abscess
    return config


def scratch_node_configuration(directory: Path, abscess: dict[str, Any] | None = None,
                               **overrides: Any) -> dict[str, Any]:
    """A node configuration whose every file lives under ``directory``, on free ports.

    ``StableAge`` is 1 s (tests do not wait 5 s for every study); ``abscess`` is merged into the
    ``AbscessNode`` section after the scratch paths, ``overrides`` into the top level.
    """
    directory = Path(directory)
    section = {"JobsDatabase": str(directory / "jobs.sqlite"), "IndexDirectory": str(directory / "index"),
               "WorkDirectory": str(directory / "work"), "LogDirectory": str(directory / "logs"),
               "PseudonymSecretPath": str(directory / "secrets" / "pseudonym.key"), **(abscess or {})}
    settings = {"HttpPort": free_port(), "DicomPort": free_port(), "StableAge": 1,
                "StorageDirectory": str(directory / "db"), "IndexDirectory": str(directory / "db"),
                "RegisteredUsers": {ADMIN: secrets.token_urlsafe(18)}, **overrides}
    return node_configuration(AbscessNode=section, **settings)


class OrthancProcess:
    """One Orthanc server process, and an HTTP session logged in as its admin.

    Args:
        config: the full Orthanc configuration (JSON-ready dict).
        directory: where the configuration file and the log are written.
        config_path: start Orthanc with this file instead of writing ``config`` into ``directory``.
        environment: extra environment variables of the Orthanc process (the shipped
            orthanc.json takes the admin's password from ABSCESS_NODE_ADMIN_PASSWORD).
        credentials: (user, password) of :attr:`http`; by default the admin of ``config``.
    """

    def __init__(self, config: dict[str, Any], directory: Path, config_path: Path | None = None,
                 environment: dict[str, str] | None = None, credentials: tuple[str, str] | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.directory = Path(directory)
        self.environment = dict(environment or {})
        self.process: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{config.get('HttpPort', 8042)}"
        self.dicom_port = int(config.get("DicomPort", 4242))
        self.aet = config.get("DicomAet", "ORTHANC")
        self.log_path = self.directory / "orthanc.log"
        if credentials is None and ADMIN in (config.get("RegisteredUsers") or {}):
            credentials = (ADMIN, config["RegisteredUsers"][ADMIN])
        self.credentials = credentials
        self.http = requests.Session()
        """Requests to this Orthanc, logged in as its admin."""
        self.http.auth = credentials

    def start(self, timeout: float = 60.0, detach: bool = False) -> "OrthancProcess":
        """Start Orthanc and wait until its REST API answers.

        Args:
            timeout: seconds to wait for the REST API.
            detach: run in its own session so it survives the calling process (the demo).

        Raises:
            RuntimeError: Orthanc exited or did not answer in time; the message ends with its log.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        config_path = self.config_path
        if config_path is None:
            config_path = self.directory / "orthanc.json"
            config_path.write_text(json.dumps(self.config, indent=1))
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(["Orthanc", str(config_path)], cwd=str(CHECKOUT), stdout=log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=detach, env={**os.environ, **self.environment})
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with code {self.process.returncode}:\n{self.log_tail()}")
            try:
                if self.http.get(self.url + "/system", timeout=2).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer on {self.url} within {timeout} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        """The end of Orthanc's log."""
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 20.0) -> None:
        """Stop Orthanc (and with it, its workers)."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def storescu(self, paths: list[Path] | Path, calling_aet: str = "PACS", called_aet: str | None = None,
                 propose: str = "") -> subprocess.CompletedProcess:
        """Send files (or a folder, recursively) with dcmtk's storescu, as a PACS would.

        Args:
            propose: extra storescu proposal option, e.g. ``-xv`` for JPEG 2000 lossless files.

        Raises:
            RuntimeError: storescu failed or reported a failed store (it may exit 0 even then).
        """
        items = [paths] if isinstance(paths, Path) else list(paths)
        command = ["storescu", "-aet", calling_aet, "-aec", called_aet or self.aet, "+sd", "+r", "-nh",
                   *([propose] if propose else []), "127.0.0.1", str(self.dicom_port), *map(str, items)]
        sent = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if sent.returncode != 0 or "Store Failed" in sent.stderr:
            raise RuntimeError(f"storescu failed ({sent.returncode}): {sent.stderr[-2000:]}")
        return sent

    def get(self, path: str, **params: Any) -> Any:
        """GET a JSON resource of this Orthanc."""
        response = self.http.get(self.url + path, params=params or None, timeout=60)
        response.raise_for_status()
        return response.json()

    def wait_for_job(self, study_uid: str, timeout: float = 300.0, after_id: int = 0,
                     accept: Callable[[dict[str, Any]], bool] = lambda job: True) -> dict[str, Any]:
        """Wait until the jobs of the study (with id > ``after_id``) have ended; return the latest.

        Jobs that found the content unchanged (triggered by our own SEG/SR arriving) are only
        returned when there is no other; with ``accept``, keep waiting until the latest job passes it.

        Raises:
            TimeoutError: no finished job in time (the message carries the jobs seen and the log).
        """
        deadline = time.monotonic() + timeout
        jobs: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            jobs = [j for j in self.get("/abscess-node/jobs", study=study_uid) if j["id"] > after_id]
            finished = [j for j in jobs if j["state"] in ("done", "failed", "skipped")]
            pending = [j for j in jobs if j["state"] in ("queued", "running")]
            if finished and not pending:
                # our own SEG/SR make the study stable again: those re-runs end "unchanged"
                meaningful = [j for j in finished if not (j.get("result") or {}).get("unchanged")]
                latest = max(meaningful or finished, key=lambda j: j["id"])
                if accept(latest):
                    return latest
            time.sleep(0.5)
        raise TimeoutError(f"no finished job for study {study_uid} after {timeout} s; jobs: {jobs}\n{self.log_tail()}")

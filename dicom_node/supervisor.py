"""Start, watch and stop the worker processes (used by the plugin; testable without Orthanc).

Workers run the venv's interpreter (``WorkerPython``), not Orthanc's embedded one: a crash, an
out-of-memory kill or a long inference never touches Orthanc. A worker that dies is restarted
with a growing back-off, and every restart is logged.

Next to the workers runs one similar-cases service (``python -m dicom_node serve``, see
:mod:`dicom_node.scp`): the plugin relays similar-case C-FINDs and the REST twin to its JSON
endpoint on 127.0.0.1 (:attr:`WorkerSupervisor.service_url`, bearer :attr:`service_token`).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from dicom_node.config import NodeConfig, WorkerSettings
from dicom_node.sample_data import REPO_ROOT

log = logging.getLogger("abscess_node.supervisor")
SERVICE = "similar-service"


def _free_local_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class WorkerSupervisor:
    """Keeps ``config.worker_count`` worker processes and the similar-cases service alive.

    Args:
        config: the node configuration.
        orthanc_url: REST base URL the workers use.
        authorization: the ``Authorization`` header value the workers send (or None).
        report: where log lines go (the plugin passes Orthanc's logger).
        retrieve_aet: RetrieveAETitle of the similar-case answers (Orthanc's ``DicomAet``).
    """

    def __init__(self, config: NodeConfig, orthanc_url: str, authorization: str | None,
                 report: Callable[[str], None] = log.warning, retrieve_aet: str = "ORTHANC") -> None:
        self.config = config
        self.retrieve_aet = retrieve_aet
        self.orthanc_url = orthanc_url
        self.authorization = authorization
        self.report = report
        self.processes: dict[str, subprocess.Popen] = {}
        self.restarts: dict[str, int] = {}
        self.next_start: dict[str, float] = {}
        self.service_port = _free_local_port()
        self.service_token = secrets.token_urlsafe(32)
        self.service_url = f"http://127.0.0.1:{self.service_port}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _spawn(self, name: str) -> None:
        settings_path = self.config.work_directory / f"{name}.settings.json"
        WorkerSettings(self.config, self.orthanc_url, self.authorization, name).write(settings_path)
        self.config.log_directory.mkdir(parents=True, exist_ok=True)
        log_file = open(self.config.log_directory / f"{name}.log", "ab")
        python = Path(self.config.worker_python)
        if name == SERVICE:
            token_path = self.config.work_directory / f"{name}.token"
            fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(self.service_token)
            arguments = ["serve", "--settings", str(settings_path), "--http-port", str(self.service_port),
                         "--token-file", str(token_path), "--retrieve-aet", self.retrieve_aet]
        else:
            arguments = ["worker", "--settings", str(settings_path)]
        self.processes[name] = subprocess.Popen(
            [str(python), "-m", "dicom_node", *arguments],
            cwd=str(REPO_ROOT), stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log_file.close()
        self.report(f"abscess-node: {name} started (pid {self.processes[name].pid})")

    def start(self) -> None:
        """Spawn the workers, the similar-cases service and a thread that restarts any that die."""
        if not Path(self.config.worker_python).exists():
            self.report(f"abscess-node: AbscessNode.WorkerPython={self.config.worker_python} does not exist; "
                        "run `make install` (no worker started, jobs stay queued)")
            return
        for slot in range(self.config.worker_count):
            self._spawn(f"worker-{slot}")
        self._spawn(SERVICE)
        self._thread = threading.Thread(target=self._watch, name="abscess-node-supervisor", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            for name, process in list(self.processes.items()):
                code = process.poll()
                if code is None:
                    continue
                now = time.monotonic()
                if name not in self.next_start:
                    self.restarts[name] = self.restarts.get(name, 0) + 1
                    delay = min(60.0, 2.0 ** min(self.restarts[name], 6))
                    self.next_start[name] = now + delay
                    self.report(f"abscess-node: {name} exited with code {code}; restarting in {delay:.0f} s "
                                f"(see {self.config.log_directory}/{name}.log)")
                elif now >= self.next_start[name] and not self._stop.is_set():
                    del self.next_start[name]
                    self._spawn(name)

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the workers (SIGTERM, then SIGKILL after ``timeout``)."""
        self._stop.set()
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + timeout
        for process in self.processes.values():
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
        self.processes.clear()

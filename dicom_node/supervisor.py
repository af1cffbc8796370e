"""Start, watch and stop the node's child processes (used by the plugin; testable without Orthanc).

The children run the venv's interpreter (``WorkerPython``), not Orthanc's embedded one: a crash,
an out-of-memory kill or a long inference never touches Orthanc. They are the workers
(``python -m dicom_node worker``, one per ``WorkerCount``) and one similar-cases service
(``python -m dicom_node serve``), which the plugin reaches through the relay
(:mod:`dicom_node.similar.relay`): :attr:`ProcessSupervisor.relay` is the plugin's client.
A child that dies is restarted with a growing back-off, and every restart is logged.
"""

from __future__ import annotations

import logging
import secrets
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from dicom_node.config import CHECKOUT, NodeConfig, WorkerSettings
from dicom_node.private_files import write_private_file
from dicom_node.similar.relay import RelayClient

log = logging.getLogger("abscess_node.supervisor")
SERVICE = "similar-service"


class ProcessSupervisor:
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
        self.relay_token = secrets.token_urlsafe(32)
        self.relay_address_file = config.work_directory / f"{SERVICE}.address"
        self.relay = RelayClient(self.relay_address_file, self.relay_token)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _spawn(self, name: str) -> None:
        settings_path = self.config.work_directory / f"{name}.settings.json"
        write_private_file(settings_path, WorkerSettings(self.config, self.orthanc_url, self.authorization, name).to_json())
        self.config.log_directory.mkdir(parents=True, exist_ok=True)
        log_file = open(self.config.log_directory / f"{name}.log", "ab")
        python = Path(self.config.worker_python)
        if name == SERVICE:
            token_path = self.config.work_directory / f"{name}.token"
            write_private_file(token_path, self.relay_token)
            self.relay_address_file.unlink(missing_ok=True)
            arguments = ["serve", "--settings", str(settings_path), "--relay-address-file",
                         str(self.relay_address_file), "--token-file", str(token_path),
                         "--retrieve-aet", self.retrieve_aet]
        else:
            arguments = ["worker", "--settings", str(settings_path)]
        self.processes[name] = subprocess.Popen(
            [str(python), "-m", "dicom_node", *arguments],
            cwd=str(CHECKOUT), stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
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

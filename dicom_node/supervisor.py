"""Start, watch and stop the worker processes (used by the plugin; testable without Orthanc).

Workers run the venv's interpreter (``WorkerPython``), not Orthanc's embedded one: a crash, an
out-of-memory kill or a long inference never touches Orthanc. A worker that dies is restarted
with a growing back-off, and every restart is logged.
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from dicom_node.config import NodeConfig, WorkerSettings
from dicom_node.sample_data import REPO_ROOT

log = logging.getLogger("abscess_node.supervisor")


class WorkerSupervisor:
    """Keeps ``config.worker_count`` worker processes alive.

    Args:
        config: the node configuration.
        orthanc_url: REST base URL the workers use.
        authorization: the ``Authorization`` header value the workers send (or None).
        report: where log lines go (the plugin passes Orthanc's logger).
    """

    def __init__(self, config: NodeConfig, orthanc_url: str, authorization: str | None,
                 report: Callable[[str], None] = log.warning) -> None:
        self.config = config
        self.orthanc_url = orthanc_url
        self.authorization = authorization
        self.report = report
        self.processes: dict[int, subprocess.Popen] = {}
        self.restarts: dict[int, int] = {}
        self.next_start: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _spawn(self, slot: int) -> None:
        name = f"worker-{slot}"
        settings_path = self.config.work_directory / f"{name}.settings.json"
        WorkerSettings(self.config, self.orthanc_url, self.authorization, name).write(settings_path)
        self.config.log_directory.mkdir(parents=True, exist_ok=True)
        log_file = open(self.config.log_directory / f"{name}.log", "ab")
        python = Path(self.config.worker_python)
        self.processes[slot] = subprocess.Popen(
            [str(python), "-m", "dicom_node", "worker", "--settings", str(settings_path)],
            cwd=str(REPO_ROOT), stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log_file.close()
        self.report(f"abscess-node: {name} started (pid {self.processes[slot].pid})")

    def start(self) -> None:
        """Spawn the workers and a thread that restarts any that die."""
        if not Path(self.config.worker_python).exists():
            self.report(f"abscess-node: AbscessNode.WorkerPython={self.config.worker_python} does not exist; "
                        "run `make install` (no worker started, jobs stay queued)")
            return
        for slot in range(self.config.worker_count):
            self._spawn(slot)
        self._thread = threading.Thread(target=self._watch, name="abscess-node-supervisor", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            for slot, process in list(self.processes.items()):
                code = process.poll()
                if code is None:
                    continue
                now = time.monotonic()
                if slot not in self.next_start:
                    self.restarts[slot] = self.restarts.get(slot, 0) + 1
                    delay = min(60.0, 2.0 ** min(self.restarts[slot], 6))
                    self.next_start[slot] = now + delay
                    self.report(f"abscess-node: worker-{slot} exited with code {code}; restarting in {delay:.0f} s "
                                f"(see {self.config.log_directory}/worker-{slot}.log)")
                elif now >= self.next_start[slot] and not self._stop.is_set():
                    del self.next_start[slot]
                    self._spawn(slot)

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

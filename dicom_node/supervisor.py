"""Start, watch and stop the node's child processes (used by the plugin; testable without Orthanc).

The children run the venv's interpreter (``WorkerPython``), not Orthanc's embedded one: a crash,
an out-of-memory kill or a long inference never touches Orthanc. They are the workers
(``python -m dicom_node worker``, one per ``WorkerCount``) and one similar-cases service
(``python -m dicom_node serve``), which the plugin reaches through the relay
(:mod:`dicom_node.similar.relay`): :attr:`ProcessSupervisor.relay` is the plugin's client.
A child that dies is restarted with a growing back-off, and every restart is logged; the job
a dead worker held goes back to the queue at once (counted as an attempt) and its scratch folder
is removed. The supervisor is also the watchdog: a worker whose job outlives
``JobTimeoutSeconds`` or whose stage outlives ``StageTimeoutSeconds`` is killed and its attempt
fails with that reason. Children log into ``<LogDirectory>/<name>.log`` (rotated by the child at
10 MB) and anything that escapes logging into ``<name>.stderr.log`` (rotated at each start).
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import secrets
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from dicom_node.config import CHECKOUT, NodeConfig, WorkerSettings
from dicom_node.jobs import JobStore
from dicom_node.private_files import write_private_file
from dicom_node.similar.relay import RelayClient

log = logging.getLogger("abscess_node.supervisor")
SERVICE = "similar-service"
LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 5
WATCHDOG_PERIOD_SECONDS = 2.0


def rotate(path: Path, max_bytes: int = LOG_MAX_BYTES, backups: int = LOG_BACKUPS) -> None:
    """``name.log`` -> ``name.log.1`` -> ... when it has grown past ``max_bytes`` (called before a child starts)."""
    if not path.exists() or path.stat().st_size < max_bytes:
        return
    for number in range(backups - 1, 0, -1):
        older = path.with_name(f"{path.name}.{number}")
        if older.exists():
            older.replace(path.with_name(f"{path.name}.{number + 1}"))
    path.replace(path.with_name(f"{path.name}.1"))


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
        self.store = JobStore(config.jobs_database)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_watchdog = 0.0

    def _spawn(self, name: str) -> None:
        settings_path = self.config.work_directory / f"{name}.settings.json"
        write_private_file(settings_path, WorkerSettings(self.config, self.orthanc_url, self.authorization, name).to_json())
        self.config.log_directory.mkdir(parents=True, exist_ok=True)
        log_path = self.config.log_directory / f"{name}.log"  # the child rotates it (--log-file)
        stderr_path = self.config.log_directory / f"{name}.stderr.log"  # what escapes logging: native crashes
        rotate(stderr_path)
        log_file = open(stderr_path, "ab")
        python = Path(self.config.worker_python)
        if name == SERVICE:
            token_path = self.config.work_directory / f"{name}.token"
            write_private_file(token_path, self.relay_token)
            self.relay_address_file.unlink(missing_ok=True)
            arguments = ["serve", "--settings", str(settings_path), "--log-file", str(log_path), "--relay-address-file",
                         str(self.relay_address_file), "--token-file", str(token_path),
                         "--retrieve-aet", self.retrieve_aet]
        else:
            arguments = ["worker", "--settings", str(settings_path), "--log-file", str(log_path)]
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
                                f"(see {self.config.log_directory}/{name}.log and {name}.stderr.log)")
                    self._release_jobs_of(name, f"worker {name} died (exit code {code})")
                elif now >= self.next_start[name] and not self._stop.is_set():
                    del self.next_start[name]
                    self._spawn(name)
            if time.monotonic() - self._last_watchdog >= WATCHDOG_PERIOD_SECONDS:
                self._last_watchdog = time.monotonic()
                try:
                    self.watchdog()
                except Exception as error:  # a busy store: next round
                    self.report(f"abscess-node: watchdog round failed: {error}")

    def watchdog(self, now: float | None = None) -> list[str]:
        """Kill the workers whose job or stage has run over its limit; the messages of what was done."""
        now = time.time() if now is None else now
        done = []
        for job in self.store.running_jobs():
            process = self.processes.get(job["worker"] or "")
            if process is None or process.poll() is not None:
                continue
            started = _epoch(job["started"])
            stage_age = now - (job["stage_started"] or now)
            if started is not None and now - started > self.config.job_timeout_seconds:
                reason = (f"attempt exceeded JobTimeoutSeconds={self.config.job_timeout_seconds} "
                          f"(in stage {job['stage']}); worker {job['worker']} killed")
            elif stage_age > self.config.stage_timeout_seconds:
                reason = (f"stage {job['stage']} exceeded StageTimeoutSeconds={self.config.stage_timeout_seconds}; "
                          f"worker {job['worker']} killed")
            else:
                continue
            process.kill()
            process.wait(10)
            self._release_jobs_of(job["worker"], reason)
            done.append(reason)
        return done

    def _release_jobs_of(self, name: str, reason: str) -> None:
        """The jobs a dead worker held go back to the queue (or fail, after MaxAttempts); scratch removed."""
        for job in self.store.running_jobs():
            if job["worker"] == name:
                outcome = self.store.fail_attempt(job["id"], reason, self.config.max_attempts)
                shutil.rmtree(self.config.work_directory / f"job-{job['id']}", ignore_errors=True)
                if outcome:
                    self.report(f"abscess-node: job {job['id']}: {reason}; job {outcome['state']}")

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


def _epoch(timestamp: str | None) -> float | None:
    """Seconds since the epoch of an ISO timestamp of the job store."""
    return dt.datetime.fromisoformat(timestamp).timestamp() if timestamp else None

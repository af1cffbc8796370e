"""Who may see other patients' cases, and the audit trail of every answer.

Similar-case answers reveal other patients, so one policy guards every route to them:

* C-FIND (through Orthanc or the standalone AE): the calling AE title must be listed in
  ``AllowedSimilarCasesAets``. AE titles are not authentication: the shipped configuration
  also has Orthanc check the AE's host (``DicomCheckModalityHost``) and DICOM TLS is available.
* REST (and every page built on it): the HTTP user Orthanc authenticated must be listed in
  ``AllowedSimilarCasesUsers``; anonymous callers never are.
* The relay between the plugin and the service is guarded by its bearer token; the plugin
  passes the caller it saw, and this policy decides.

Every answer and every refusal is one JSON line in ``<LogDirectory>/audit.jsonl`` (rotated):
time, route, caller, query study UID, result study UIDs, count, outcome. No names, no IDs.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import logging.handlers
import threading
from collections.abc import Sequence
from pathlib import Path

from dicom_node.config import NodeConfig

AUDIT_FILE = "audit.jsonl"
AUDIT_MAX_BYTES = 10 * 1024 * 1024
AUDIT_BACKUPS = 20


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who asks: a DICOM AE title (``route="c-find"``) or an authenticated HTTP user (``"rest"``).

    ``name`` is "" for an anonymous HTTP caller.
    """

    route: str
    name: str

    def __str__(self) -> str:
        return f"{self.route}:{self.name or '(anonymous)'}"


class AccessPolicy:
    """Decides whether a caller may receive similar-case answers.

    Args:
        config: the node configuration (the two allow-lists).
    """

    def __init__(self, config: NodeConfig) -> None:
        self.allowed_aets = set(config.allowed_similar_cases_aets)
        self.allowed_users = set(config.allowed_similar_cases_users)

    def allows(self, caller: Caller) -> bool:
        """True when the caller is on the allow-list of its route."""
        if not caller.name:
            return False
        if caller.route == "c-find":
            return caller.name in self.allowed_aets
        return caller.route == "rest" and caller.name in self.allowed_users

    def refusal(self, caller: Caller) -> str:
        """Why the caller is refused, in words (no value of the request)."""
        if caller.route == "c-find":
            return f"calling AE {caller.name[:16]} is not allowed similar cases"
        if not caller.name:
            return "similar cases need an authenticated user"
        return f"user {caller.name[:32]} is not allowed similar cases"


class AuditLog:
    """Append-only JSON lines, one per similar-case answer or refusal, rotated by size.

    Args:
        directory: the node's log directory.
    """

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / AUDIT_FILE
        self._handler = logging.handlers.RotatingFileHandler(
            self.path, maxBytes=AUDIT_MAX_BYTES, backupCount=AUDIT_BACKUPS, encoding="utf-8")
        self._handler.setFormatter(logging.Formatter("%(message)s"))
        self._lock = threading.Lock()

    def record(self, caller: Caller, query_study_uid: str, result_study_uids: Sequence[str], outcome: str,
               detail: str = "") -> None:
        """Write one line: time, route, caller, query study, results, count, outcome (and a reason)."""
        entry = {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
                 "route": caller.route, "caller": caller.name, "query_study_uid": query_study_uid,
                 "result_study_uids": list(result_study_uids), "count": len(result_study_uids), "outcome": outcome}
        if detail:
            entry["detail"] = detail
        record = logging.LogRecord("abscess_node.audit", logging.INFO, __file__, 0, json.dumps(entry), None, None)
        with self._lock:
            self._handler.emit(record)

    def close(self) -> None:
        """Flush and close the file."""
        self._handler.close()

"""What the plugin does with Orthanc's change events: no stable study is lost, none is queued twice.

Orthanc calls the plugin once per event and forgets it. If the job store cannot take the event
(locked past its bounded wait, disk full), :class:`Intake` keeps it and retries every few
seconds, loudly. Independently, Orthanc keeps a log of its changes (``/changes``, with a
sequence number): the intake remembers in the job store the last change it knows was handled,
and at every start replays what came after it, so an event lost while Orthanc or the plugin
was going down is queued when the node comes back. Replays are harmless: a queued study is
not queued twice, and a study already processed with the same content is recognised from
Orthanc's index and skipped without downloading it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from dicom_node.jobs import JobStore

log = logging.getLogger("abscess_node.intake")
CHANGE_SEQ = "orthanc_change_seq"
REPLAY_PAGE = 500


class Intake:
    """Turns Orthanc's STABLE_STUDY and DELETED events into jobs and erasures.

    Args:
        store: the job store.
        rest_get: GET on Orthanc's REST API returning parsed JSON (in-process in the plugin).
        enabled: whether stable studies are queued (``AbscessNode.Enabled``).
        report: where loud messages go (Orthanc's log in the plugin).
    """

    def __init__(self, store: JobStore, rest_get: Callable[[str], Any], enabled: bool = True,
                 report: Callable[[str], None] = log.error) -> None:
        self.store = store
        self.rest_get = rest_get
        self.enabled = enabled
        self.report = report
        self._missed_stable: dict[str, str | None] = {}
        self._missed_deleted: set[str] = set()
        self._lock = threading.Lock()

    def stable(self, orthanc_study_id: str, study_uid: str | None, reason: str = "stable") -> dict[str, Any] | None:
        """Queue a study that became stable; kept for a retry when the store cannot take it now."""
        if not self.enabled:
            return None
        try:
            return self.store.enqueue(orthanc_study_id, study_uid, reason=reason)
        except Exception as error:
            with self._lock:
                self._missed_stable[orthanc_study_id] = study_uid
            self.report(f"abscess-node: study {study_uid or orthanc_study_id} could not be queued ({error}); "
                        "retrying every few seconds")
            return None

    def deleted(self, orthanc_study_id: str) -> None:
        """Record a deleted study for erasure from the case index; kept for a retry on failure."""
        try:
            self.store.request_erasure(orthanc_study_id)
        except Exception as error:
            with self._lock:
                self._missed_deleted.add(orthanc_study_id)
            self.report(f"abscess-node: erasure of deleted study {orthanc_study_id} could not be recorded ({error}); "
                        "retrying every few seconds")

    def pending(self) -> int:
        """Events still waiting for the store."""
        with self._lock:
            return len(self._missed_stable) + len(self._missed_deleted)

    def retry_missed(self) -> int:
        """Hand the kept events to the store again; the number that went through."""
        with self._lock:
            stable, deleted = dict(self._missed_stable), set(self._missed_deleted)
            self._missed_stable.clear()
            self._missed_deleted.clear()
        for orthanc_study_id, study_uid in stable.items():
            self.stable(orthanc_study_id, study_uid, reason="stable (retried)")
        for orthanc_study_id in deleted:
            self.deleted(orthanc_study_id)
        return len(stable) + len(deleted) - self.pending()

    def replay_changes(self) -> int:
        """Queue what Orthanc logged after the last change known to be handled; how many events.

        A job store that has never seen Orthanc starts from Orthanc's latest change (an existing
        archive is filled in by ``python -m dicom_node backfill``, not implicitly).
        """
        since = self.store.get_meta(CHANGE_SEQ)
        if since is None:
            self.store.set_meta(CHANGE_SEQ, str(self.rest_get("/changes?last")["Last"]))
            return 0
        replayed = 0
        while True:
            page = self.rest_get(f"/changes?since={int(since)}&limit={REPLAY_PAGE}")
            for change in page.get("Changes", []):
                if change.get("ResourceType") != "Study":
                    continue
                if change.get("ChangeType") == "StableStudy":
                    self.stable(change["ID"], None, reason="replayed")
                    replayed += 1
                elif change.get("ChangeType") == "Deleted":
                    self.deleted(change["ID"])
                    replayed += 1
            since = page.get("Last", since)
            if page.get("Done", True) or not page.get("Changes"):
                break
        if self.pending() == 0:
            self.store.set_meta(CHANGE_SEQ, str(since))
        return replayed

    def checkpoint(self) -> None:
        """Remember Orthanc's latest change as handled, when no event is waiting for the store."""
        if self.pending() == 0:
            self.store.set_meta(CHANGE_SEQ, str(self.rest_get("/changes?last")["Last"]))

    def run(self, stop: threading.Event, retry_seconds: float = 2.0, checkpoint_seconds: float = 30.0) -> None:
        """The plugin's intake thread: retry kept events, checkpoint the change log, until ``stop``."""
        since_checkpoint = 0.0
        while not stop.wait(retry_seconds):
            since_checkpoint += retry_seconds
            try:
                self.retry_missed()
                if since_checkpoint >= checkpoint_seconds:
                    since_checkpoint = 0.0
                    self.checkpoint()
            except Exception as error:
                self.report(f"abscess-node: intake round failed ({error}); next round in {retry_seconds:.0f} s")

"""``python -m dicom_node backfill``: queue every matching study already in Orthanc.

A site that connects the node to an existing archive gets its case index filled: the studies
Orthanc already holds (optionally only those since a date, of a modality, at most N) are queued
with :data:`~dicom_node.jobs.PRIORITY_BACKFILL`, so a study arriving from the PACS is always
claimed first. The backfill also keeps the queue shallow (``--max-queued``): it adds a study
only while fewer jobs than that wait, so live studies never queue behind the archive, and it
shows its progress until its studies are processed.

Resumable: a study that already has a job (queued, processed live or by an earlier backfill) is
never queued again, so an interrupted backfill is continued by running the same command again.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from collections.abc import Iterator
from typing import Any, Protocol

from dicom_node.jobs import FINAL_STATES, PRIORITY_BACKFILL, JobStore
from dicom_node.orthanc_client import OrthancClient

PAGE = 200
"""Studies asked of Orthanc per request."""


class Progress(Protocol):
    """What the backfill reports to (a progress bar)."""

    def update(self, queued: int, finished: int, total: int) -> None:
        """``queued`` of ``total`` studies queued so far, ``finished`` of them processed."""


def parse_date(text: str) -> str:
    """``YYYY-MM-DD`` or ``YYYYMMDD`` as a DICOM date (``YYYYMMDD``).

    Raises:
        ValueError: not such a date (the message says which format is expected).
    """
    for pattern in ("%Y-%m-%d", "%Y%m%d"):
        try:
            return dt.datetime.strptime(text, pattern).strftime("%Y%m%d")
        except ValueError:
            continue
    raise ValueError(f"--since expects a date like 2024-01-31, got {text!r}")


def matching_studies(client: OrthancClient, since: str | None = None, modality: str | None = None,
                     page: int = PAGE) -> Iterator[tuple[str, str]]:
    """(Orthanc id, StudyInstanceUID) of every study Orthanc holds that matches, page by page.

    Args:
        since: a DICOM date: studies whose StudyDate is on or after it.
        modality: studies that hold a series of this modality (ModalitiesInStudy).
    """
    query: dict[str, str] = {}
    if since:
        query["StudyDate"] = f"{since}-"
    if modality:
        query["ModalitiesInStudy"] = modality.upper()
    offset = 0
    while True:
        found = client.post_json("/tools/find", {"Level": "Study", "Query": query, "Expand": True,
                                                 "Since": offset, "Limit": page})
        for study in found:
            yield study["ID"], study.get("MainDicomTags", {}).get("StudyInstanceUID", "")
        if len(found) < page:
            return
        offset += page


@dataclasses.dataclass
class BackfillResult:
    """What one backfill run did."""

    matching: int = 0
    already_known: int = 0
    queued: list[int] = dataclasses.field(default_factory=list)
    states: dict[str, int] = dataclasses.field(default_factory=dict)
    """How the jobs this run queued ended (those that had ended when it stopped)."""


def backfill(store: JobStore, client: OrthancClient, progress: Progress, *, since: str | None = None,
             modality: str | None = None, limit: int | None = None, max_queued: int = 4, wait: bool = True,
             poll_seconds: float = 1.0) -> BackfillResult:
    """Queue the matching studies that have no job yet, keeping the queue shallow; wait for them.

    Args:
        store: the job store.
        client: Orthanc's REST API.
        progress: told how far the run is.
        since, modality: which studies (see :func:`matching_studies`).
        limit: queue at most this many studies in this run.
        max_queued: add a study only while fewer jobs than this are queued (live ones included).
        wait: wait until the studies queued by this run are processed.
        poll_seconds: how often the queue is looked at while waiting.

    Returns:
        What was found, skipped, queued and how the queued jobs ended (when waited for).
    """
    result = BackfillResult()
    known = store.known_orthanc_studies()
    todo: list[tuple[str, str]] = []
    for orthanc_id, study_uid in matching_studies(client, since, modality):
        result.matching += 1
        if orthanc_id in known:
            result.already_known += 1
        elif limit is None or len(todo) < limit:
            todo.append((orthanc_id, study_uid))
    progress.update(0, 0, len(todo))
    pending: set[int] = set()  # queued by this run, not finished yet: few (the queue is kept shallow)

    def report() -> None:
        for job_id in list(pending):
            state = store.get(job_id)["state"]
            if state in FINAL_STATES:
                pending.discard(job_id)
                result.states[state] = result.states.get(state, 0) + 1
        progress.update(len(result.queued), len(result.queued) - len(pending), len(todo))

    for orthanc_id, study_uid in todo:
        while store.counts()["queued"] >= max_queued:
            report()
            time.sleep(poll_seconds)
        job_id = store.enqueue(orthanc_id, study_uid or None, reason="backfill", priority=PRIORITY_BACKFILL)["id"]
        result.queued.append(job_id)
        pending.add(job_id)
        report()
    while wait and pending:
        time.sleep(poll_seconds)
        report()
    return result


class RichProgress:
    """A progress bar on stderr (rich): studies processed of those queued by this run."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as Bar

        self.bar = Bar(TextColumn("backfill"), BarColumn(), MofNCompleteColumn(), TextColumn("processed"),
                       TextColumn("· {task.fields[queued]} queued"), TimeElapsedColumn(),
                       console=Console(stderr=True))
        self.task: Any = None

    def __enter__(self) -> RichProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.bar.stop()

    def update(self, queued: int, finished: int, total: int) -> None:
        """Show the numbers."""
        if self.task is None:
            self.task = self.bar.add_task("backfill", total=total, queued=queued)
        self.bar.update(self.task, completed=finished, total=total, queued=queued)

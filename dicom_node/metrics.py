"""The node's metrics in the Prometheus text format: ``GET /abscess-node/metrics``.

The node runs in several processes (the plugin inside Orthanc, the workers, the similar-cases
service), possibly on several machines. Rather than a scrape directory per machine, every
process records what it measures in the database they all reach, the job store:

* the plugin knows the queue (jobs per state, the oldest queued job) and the restarts of the
  child processes it supervises;
* ``job_events`` (:mod:`dicom_node.jobs`) counts every job that reached a final state, whichever
  process ended it;
* :class:`MetricsStore` keeps the counters, gauges and histogram buckets that the workers
  (seconds per stage, study-to-SEG latency, forwarding failures, index size) and the
  service (similar-case query latency, index size after erasures) record, in table
  ``metric_samples``: one row per (metric, labels, bucket), incremented in place.

:class:`NodeCollector` turns all of it into metric families at scrape time; the plugin serves
:func:`exposition`. Names follow ``abscess_node_<what>_<unit>``; labels are few and bounded
(state, stage, route, source, destination, process, space), never a UID.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from dicom_node.jobs import PRIORITY_BACKFILL, JobStore

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The Prometheus text exposition format."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS metric_samples (
    name TEXT NOT NULL, labels TEXT NOT NULL, bucket TEXT NOT NULL, value REAL NOT NULL,
    PRIMARY KEY (name, labels, bucket)
);
"""
_SUM, _COUNT, _INF = "sum", "count", "+Inf"
MAX_LABEL_LENGTH = 64


@dataclasses.dataclass(frozen=True)
class Recorded:
    """A metric that processes record in :class:`MetricsStore` (declared once, below).

    Attributes:
        name: exposition name (counters without their ``_total`` suffix, which the format adds).
        kind: ``counter``, ``gauge`` or ``histogram``.
        documentation: the HELP line.
        labels: label names, in order.
        buckets: upper bounds of a histogram's buckets, ascending (``+Inf`` is implied).
    """

    name: str
    kind: str
    documentation: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


STAGE_SECONDS = Recorded(
    "abscess_node_stage_seconds", "histogram", "Seconds spent in each pipeline stage, per finished attempt",
    ("stage",), (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 1800))
STUDY_TO_SEG_SECONDS = Recorded(
    "abscess_node_study_to_seg_seconds", "histogram",
    "Seconds from a study being queued (stable in Orthanc, or found by the backfill) to its SEG stored",
    ("source",), (5, 10, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 24 * 3600))
SIMILAR_QUERY_SECONDS = Recorded(
    "abscess_node_similar_query_seconds", "histogram", "Seconds to answer one similar-case query (policy, search, report)",
    ("route",), (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
FORWARD_FAILURES = Recorded(
    "abscess_node_forward_failures", "counter", "Failed attempts to forward a job's SEG/SR to a destination",
    ("destination",))
NOTIFICATION_FAILURES = Recorded(
    "abscess_node_notification_failures", "counter", "Failed attempts to deliver a webhook notification")
INDEX_STUDIES = Recorded(
    "abscess_node_index_studies", "gauge", "Studies in the case index (as of its last change)")
INDEX_VECTORS = Recorded(
    "abscess_node_index_vectors", "gauge", "Live embedding vectors in the case index (as of its last change)",
    ("space",))
RECORDED = (STAGE_SECONDS, STUDY_TO_SEG_SECONDS, SIMILAR_QUERY_SECONDS, FORWARD_FAILURES, NOTIFICATION_FAILURES,
            INDEX_STUDIES, INDEX_VECTORS)


def _labels_key(metric: Recorded, labels: Mapping[str, Any]) -> str:
    if set(labels) != set(metric.labels):
        raise ValueError(f"{metric.name} takes the labels {list(metric.labels)}, got {sorted(labels)}")
    return json.dumps([str(labels[name])[:MAX_LABEL_LENGTH] for name in metric.labels])


def _bucket_of(metric: Recorded, value: float) -> str:
    return next((repr(float(bound)) for bound in metric.buckets if value <= bound), _INF)


class MetricsStore:
    """Counters, gauges and histogram buckets in the job store's database (table ``metric_samples``).

    Args:
        store: the job store (its database is the one every process of the node reaches).
    """

    def __init__(self, store: JobStore) -> None:
        self.store = store
        store.db.executescript(_SCHEMA)

    def increment(self, metric: Recorded, amount: float = 1.0, **labels: Any) -> None:
        """Add ``amount`` to a counter."""
        if metric.kind != "counter" or amount < 0:
            raise ValueError(f"increment(): {metric.name} is a {metric.kind}; counters only go up")
        self._add(metric.name, _labels_key(metric, labels), [("", float(amount))])

    def set(self, metric: Recorded, value: float, **labels: Any) -> None:
        """Set a gauge."""
        if metric.kind != "gauge":
            raise ValueError(f"set(): {metric.name} is a {metric.kind}, not a gauge")
        self.store.db.execute(
            "insert into metric_samples (name, labels, bucket, value) values (?, ?, '', ?) "
            "on conflict (name, labels, bucket) do update set value = excluded.value",
            [metric.name, _labels_key(metric, labels), float(value)])

    def observe(self, metric: Recorded, value: float, **labels: Any) -> None:
        """Count one observation into a histogram (its bucket, sum and count, in one transaction)."""
        if metric.kind != "histogram":
            raise ValueError(f"observe(): {metric.name} is a {metric.kind}, not a histogram")
        if not math.isfinite(value):
            raise ValueError(f"observe(): {metric.name} got a non-finite value {value!r}")
        self._add(metric.name, _labels_key(metric, labels),
                  [(_bucket_of(metric, value), 1.0), (_SUM, float(value)), (_COUNT, 1.0)])

    def _add(self, name: str, labels: str, amounts: list[tuple[str, float]]) -> None:
        with self.store.transaction():
            self.store.db.executemany(
                "insert into metric_samples (name, labels, bucket, value) values (?, ?, ?, ?) "
                "on conflict (name, labels, bucket) do update set value = value + excluded.value",
                [(name, labels, bucket, amount) for bucket, amount in amounts])

    def samples(self, metric: Recorded) -> dict[tuple[str, ...], dict[str, float]]:
        """label values -> bucket -> value of one metric (``""`` is the bucket of counters and gauges)."""
        found: dict[tuple[str, ...], dict[str, float]] = {}
        for row in self.store.db.execute("select labels, bucket, value from metric_samples where name = ?", [metric.name]):
            found.setdefault(tuple(json.loads(row["labels"])), {})[row["bucket"]] = row["value"]
        return found


def record_attempt(metrics: MetricsStore, job: Mapping[str, Any]) -> None:
    """What a worker records after an attempt it finished: seconds per stage, and for a new SEG
    the study-to-SEG latency and the index size after indexing it."""
    for stage, seconds in (job.get("timings") or {}).items():
        metrics.observe(STAGE_SECONDS, float(seconds), stage=stage)
    result = job.get("result") or {}
    if job.get("state") != "done" or "seg" not in result:
        return
    created, finished = _epoch(job.get("created")), _epoch(job.get("finished"))
    if created is not None and finished is not None:
        source = "backfill" if (job.get("priority") or 0) >= PRIORITY_BACKFILL else "live"
        metrics.observe(STUDY_TO_SEG_SECONDS, max(0.0, finished - created), source=source)
    if result.get("index_size"):
        record_index_size(metrics, result["index_size"])


def record_index_size(metrics: MetricsStore, size: Mapping[str, int]) -> None:
    """Set the index gauges from ``{"studies": n, "slice": vectors, "roi": vectors}``."""
    metrics.set(INDEX_STUDIES, size["studies"])
    for space in ("slice", "roi"):
        if space in size:
            metrics.set(INDEX_VECTORS, size[space], space=space)


def _epoch(timestamp: str | None) -> float | None:
    return dt.datetime.fromisoformat(timestamp).timestamp() if timestamp else None


class NodeCollector:
    """A prometheus-client collector reading the job store at every scrape.

    Args:
        store: the job store.
        restarts: restarts per supervised child process since Orthanc started (the plugin's
            :attr:`dicom_node.supervisor.ProcessSupervisor.restarts`).
    """

    def __init__(self, store: JobStore, restarts: Callable[[], Mapping[str, int]] = dict) -> None:
        self.store = store
        self.metrics = MetricsStore(store)
        self.restarts = restarts

    def collect(self) -> Iterator[Metric]:
        """The metric families, read now."""
        jobs = GaugeMetricFamily("abscess_node_jobs", "Jobs in each state now (queue depth: state=queued)",
                                 labels=["state"])
        for state, count in self.store.counts().items():
            jobs.add_metric([state], count)
        yield jobs
        oldest = self.store.db.execute("select min(created) from jobs where state = 'queued'").fetchone()[0]
        yield GaugeMetricFamily("abscess_node_oldest_queued_seconds", "Age of the oldest queued job (0: none queued)",
                                value=max(0.0, dt.datetime.now(dt.timezone.utc).timestamp() - _epoch(oldest))
                                if oldest else 0.0)
        finished = CounterMetricFamily("abscess_node_jobs_finished", "Jobs that reached a final state", labels=["state"])
        for state, count in self.store.finished_counts().items():
            finished.add_metric([state], count)
        yield finished
        restarts = CounterMetricFamily("abscess_node_worker_restarts",
                                       "Restarts of a supervised child process (worker or similar-cases service) "
                                       "since Orthanc started", labels=["process"])
        for process, count in sorted(self.restarts().items()):
            restarts.add_metric([process], count)
        yield restarts
        for metric in RECORDED:
            yield self._family(metric)

    def _family(self, metric: Recorded) -> Metric:
        labels = list(metric.labels)
        samples = self.metrics.samples(metric)
        if metric.kind == "counter":
            family: Metric = CounterMetricFamily(metric.name, metric.documentation, labels=labels)
            for values, buckets in samples.items():
                family.add_metric(list(values), buckets.get("", 0.0))
        elif metric.kind == "gauge":
            family = GaugeMetricFamily(metric.name, metric.documentation, labels=labels)
            for values, buckets in samples.items():
                family.add_metric(list(values), buckets.get("", 0.0))
        else:
            family = HistogramMetricFamily(metric.name, metric.documentation, labels=labels)
            for values, buckets in samples.items():
                cumulative, running = [], 0.0
                for bound in [*(repr(float(b)) for b in metric.buckets), _INF]:
                    running += buckets.get(bound, 0.0)
                    cumulative.append((bound, running))
                family.add_metric(list(values), cumulative, sum_value=buckets.get(_SUM, 0.0))
        return family


def exposition(collector: NodeCollector) -> bytes:
    """The metrics in the Prometheus text format (what ``GET /abscess-node/metrics`` answers)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry)

"""The ``AbscessNode`` section of ``orthanc.json``, read and validated once.

The plugin parses Orthanc's configuration, hands the ``AbscessNode`` section to
:func:`NodeConfig.from_section` and passes the resulting object down (to the job store, the
workers, the query handlers). Nothing else reads configuration files or environment variables.

Every key, its type and its default are listed in :data:`KEYS` (the README table is generated
from the same facts). An unknown key or a bad value raises :class:`ConfigError` naming the key,
which stops Orthanc's start-up with that message.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from models.lesion_rules import PlausibilityRules


CHECKOUT = Path(__file__).resolve().parent.parent
"""The repository checkout the node runs from: relative paths of the configuration resolve against it."""
AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE VR: 16 chars, no backslash
DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:[0-9]{1,2})$")
DATABASE_URL_SCHEMES = ("postgresql://", "postgres://")


class ConfigError(ValueError):
    """A key of the ``AbscessNode`` section is unknown or has a bad value."""


@dataclasses.dataclass(frozen=True)
class SeriesRules:
    """Which series of a study is segmented (``SeriesRules`` key).

    Attributes:
        modalities: series whose Modality is not listed are skipped.
        min_slices: fewer instances than this -> skipped (a scout, a single slice).
        max_slices: more instances than this -> the job fails with a clear message.
        require_axial: skip series whose ImageOrientationPatient is not axial.
        axial_tolerance_degrees: how far the slice normal may tilt from the patient z axis.
        exclude_descriptions: case-insensitive substrings of SeriesDescription to skip.
        prefer: ``"most-slices"`` or ``"thinnest"`` to rank the eligible series.
        max_pixels_per_slice: Rows x Columns above this -> the job fails before any pixel is
            decoded (a small compressed file must not make the worker allocate gigabytes).
        require_neck_coverage: skip a series that shows no neck (models.anatomy: less than
            25 mm between the skull base and the thoracic inlet); when false it is segmented,
            with lesions only where neck soft tissue is.
    """

    modalities: tuple[str, ...] = ("CT",)
    min_slices: int = 10
    max_slices: int = 3000
    require_axial: bool = True
    axial_tolerance_degrees: float = 15.0
    exclude_descriptions: tuple[str, ...] = ("scout", "localizer", "topogram", "dose")
    prefer: str = "most-slices"
    max_pixels_per_slice: int = 1024 * 1024
    require_neck_coverage: bool = True


@dataclasses.dataclass(frozen=True)
class Webhook:
    """One entry of ``Notifications``: where to POST, and for which final job states.

    Attributes:
        url: an ``http://`` or ``https://`` URL.
        on: the job states that are sent (done, failed, skipped, cancelled).
    """

    url: str
    on: tuple[str, ...] = ("failed",)


WEBHOOK_STATES = ("done", "failed", "skipped", "cancelled")

SERIES_RULE_KEYS = {
    "Modalities": "modalities",
    "MinSlices": "min_slices",
    "MaxSlices": "max_slices",
    "RequireAxial": "require_axial",
    "AxialToleranceDegrees": "axial_tolerance_degrees",
    "ExcludeDescriptions": "exclude_descriptions",
    "Prefer": "prefer",
    "MaxPixelsPerSlice": "max_pixels_per_slice",
    "RequireNeckCoverage": "require_neck_coverage",
}
LESION_RULE_KEYS = {
    "CoreHuRange": "core_hu_range",
    "MinVolumeMl": "min_volume_ml",
    "MinSoftTissueFraction": "min_soft_tissue_fraction",
    "RimEnhancement": "rim_enhancement",
    "MinRimEnhancementHu": "min_rim_enhancement_hu",
}
"""JSON names of :class:`models.plausibility.PlausibilityRules` (the ``LesionRules`` key)."""


@dataclasses.dataclass(frozen=True)
class NodeConfig:
    """Validated settings of the node (see :data:`KEYS` for the JSON names and defaults)."""

    enabled: bool = True
    worker_count: int = 1
    device: str = "auto"
    weights_path: Path = CHECKOUT / "models" / "weights" / "vmunet-demo-v3.pt"
    index_directory: Path = CHECKOUT / "runtime" / "index"
    index_vector_encoding: str = "flat"
    index_ef_search: int = 32
    jobs_database: Path | str = CHECKOUT / "runtime" / "jobs.sqlite"
    index_database: str = ""
    orthanc_url: str = ""
    orthanc_user: str = "admin"
    orthanc_password_file: Path = CHECKOUT / "runtime" / "secrets" / "admin-password"
    work_directory: Path = CHECKOUT / "runtime" / "work"
    log_directory: Path = CHECKOUT / "runtime" / "logs"
    worker_python: Path = CHECKOUT / ".venv" / "bin" / "python"
    series_rules: SeriesRules = SeriesRules()
    forward_to: tuple[str, ...] = ()
    forward_retries: int = 6
    similar_cases_aet: str = "ABSCESS_SIMILAR"
    allowed_similar_cases_aets: tuple[str, ...] = ()
    allowed_similar_cases_users: tuple[str, ...] = ()
    similar_cases_top_k: int = 5
    similar_cases_threads: int = 1
    pseudonymize_similar_cases: bool = False
    similar_cases_report: str = "pseudonymized"
    forward_similar_cases_report: bool = False
    pseudonym_secret_path: Path = CHECKOUT / "runtime" / "secrets" / "pseudonym.key"
    segmentation_type: str = "BINARY"
    threshold: float = 0.5
    chunk_slices: int = 64
    inference_batch_size: int = 8
    job_timeout_seconds: int = 3600
    stage_timeout_seconds: int = 1800
    lease_seconds: int = 60
    heartbeat_seconds: int = 10
    max_attempts: int = 3
    forward_backoff_seconds: int = 30
    forward_timeout_seconds: int = 300
    index_lock_timeout_seconds: int = 120
    notifications: tuple[Webhook, ...] = ()
    notification_retries: int = 5
    notification_timeout_seconds: int = 10
    notification_backoff_seconds: int = 30
    lesion_rules: PlausibilityRules = PlausibilityRules()
    rejected_candidates_segment: bool = False

    @classmethod
    def from_section(cls, section: dict[str, Any] | None, base_directory: Path = CHECKOUT) -> "NodeConfig":
        """Build and validate the config from the JSON ``AbscessNode`` section.

        Args:
            section: the parsed section (``None`` or ``{}`` gives the defaults).
            base_directory: relative paths are resolved against it (the checkout).

        Raises:
            ConfigError: naming the offending key and what is expected.
        """
        section = dict(section or {})
        if not isinstance(section, dict):
            raise ConfigError("AbscessNode: expected a JSON object")
        values: dict[str, Any] = {}
        for json_key, raw in section.items():
            if json_key not in KEYS:
                raise ConfigError(
                    f"AbscessNode.{json_key}: unknown key (known keys: {', '.join(sorted(KEYS))})")
            key = KEYS[json_key]
            values[key.attribute] = key.parse(json_key, raw, base_directory)
        config = cls(**values)
        if config.heartbeat_seconds * 2 > config.lease_seconds:
            raise ConfigError(f"AbscessNode.HeartbeatSeconds ({config.heartbeat_seconds}) must be at most half of "
                              f"AbscessNode.LeaseSeconds ({config.lease_seconds}): a lease must survive a late heartbeat")
        return config

    def to_json(self) -> str:
        """Serialise for a worker process (inverse of :meth:`from_json`)."""
        section = {}
        for json_key, key in KEYS.items():
            value = getattr(self, key.attribute)
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, (SeriesRules, PlausibilityRules)):
                value = rules_section(value)
            elif isinstance(value, tuple):
                value = [{"Url": v.url, "On": list(v.on)} if isinstance(v, Webhook) else v for v in value]
            section[json_key] = value
        return json.dumps(section, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "NodeConfig":
        """Parse what :meth:`to_json` wrote."""
        return cls.from_section(json.loads(text))


@dataclasses.dataclass(frozen=True)
class Key:
    """One JSON key: its attribute, its expected kind and a short description for the README."""

    attribute: str
    kind: str
    description: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None

    def parse(self, json_key: str, raw: Any, base_directory: Path) -> Any:
        """Check ``raw`` against this key's kind and convert it."""
        where = f"AbscessNode.{json_key}"
        if self.kind == "bool":
            if not isinstance(raw, bool):
                raise ConfigError(f"{where}: expected true or false, got {raw!r}")
            return raw
        if self.kind in ("int", "float"):
            ok_types = (int,) if self.kind == "int" else (int, float)
            if isinstance(raw, bool) or not isinstance(raw, ok_types):
                raise ConfigError(f"{where}: expected a {'whole ' if self.kind == 'int' else ''}number, got {raw!r}")
            if (self.minimum is not None and raw < self.minimum) or (self.maximum is not None and raw > self.maximum):
                raise ConfigError(f"{where}: {raw!r} is outside [{self.minimum}, {self.maximum}]")
            return raw
        if self.kind == "choice":
            if not isinstance(raw, str) or raw.upper() not in {c.upper() for c in self.choices}:
                raise ConfigError(f"{where}: expected one of {', '.join(self.choices)}, got {raw!r}")
            return next(c for c in self.choices if c.upper() == raw.upper())
        if self.kind == "path":
            return _path(where, raw, base_directory)
        if self.kind == "path-or-url":
            if isinstance(raw, str) and raw.startswith(DATABASE_URL_SCHEMES):
                return _database_url(where, raw)
            return _path(where, raw, base_directory)
        if self.kind == "url":
            if not isinstance(raw, str) or (raw and not raw.startswith(self.choices)):
                raise ConfigError(f"{where}: expected a URL starting with {' or '.join(self.choices)} "
                                  f"(or \"\"), got {raw!r}")
            return _database_url(where, raw) if raw.startswith(DATABASE_URL_SCHEMES) else raw.rstrip("/")
        if self.kind == "device":
            if not isinstance(raw, str) or not DEVICE.match(raw.lower()):
                raise ConfigError(f"{where}: expected one of auto, cpu, cuda, cuda:N (one worker per GPU), got {raw!r}")
            return raw.lower()
        if self.kind == "name":
            if not isinstance(raw, str) or not raw:
                raise ConfigError(f"{where}: expected a non-empty string, got {raw!r}")
            return raw
        if self.kind == "aet":
            return _ae_title(where, raw)
        if self.kind == "aet-list":
            if not isinstance(raw, list):
                raise ConfigError(f"{where}: expected a list of AE titles, got {raw!r}")
            return tuple(_ae_title(f"{where}[{i}]", item) for i, item in enumerate(raw))
        if self.kind == "name-list":
            if not isinstance(raw, list) or not all(isinstance(item, str) and item for item in raw):
                raise ConfigError(f"{where}: expected a list of non-empty strings, got {raw!r}")
            return tuple(raw)
        if self.kind == "series-rules":
            return _series_rules(where, raw)
        if self.kind == "webhooks":
            if not isinstance(raw, list):
                raise ConfigError(f'{where}: expected a list like [{{"Url": "https://...", "On": ["failed"]}}], got {raw!r}')
            return tuple(_webhook(f"{where}[{i}]", item) for i, item in enumerate(raw))
        if self.kind == "lesion-rules":
            return _lesion_rules(where, raw)
        raise AssertionError(self.kind)


def _path(where: str, raw: Any, base_directory: Path) -> Path:
    if not isinstance(raw, str) or not raw:
        raise ConfigError(f"{where}: expected a path string, got {raw!r}")
    path = Path(raw).expanduser()
    return path if path.is_absolute() else (base_directory / path)


def _database_url(where: str, raw: str) -> str:
    """A PostgreSQL URL without a password in it (the password belongs in a 0600 passfile, not in the config)."""
    if re.match(r"^[a-z]+://[^/@:]*:[^/@]*@", raw):
        raise ConfigError(f"{where}: the URL carries a password; put it in a 0600 file named by the URL's passfile= "
                          "parameter (or ~/.pgpass) instead")
    if "/" not in raw.split("://", 1)[1]:
        raise ConfigError(f"{where}: {raw!r} names no database (postgresql://user@host:port/DATABASE)")
    return raw


def _ae_title(where: str, raw: Any) -> str:
    if not isinstance(raw, str) or not AE_TITLE.match(raw) or not raw.strip():
        raise ConfigError(f"{where}: {raw!r} is not a DICOM AE title (1-16 printable characters, no backslash)")
    return raw.strip()


def _webhook(where: str, raw: Any) -> Webhook:
    if not isinstance(raw, dict) or set(raw) - {"Url", "On"}:
        raise ConfigError(f'{where}: expected an object with "Url" and "On" only, got {raw!r}')
    url = raw.get("Url")
    if not isinstance(url, str) or not re.match(r"^https?://[^\s/]+", url):
        raise ConfigError(f"{where}.Url: expected an http:// or https:// URL, got {url!r}")
    on = raw.get("On", ["failed"])
    if not isinstance(on, list) or not on or not all(state in WEBHOOK_STATES for state in on):
        raise ConfigError(f"{where}.On: expected a non-empty list of {', '.join(WEBHOOK_STATES)}, got {on!r}")
    return Webhook(url, tuple(dict.fromkeys(on)))


def _rule_entries(where: str, raw: Any, known: Mapping[str, str]) -> Iterator[tuple[str, str, Any]]:
    """(JSON key, its name in messages, value) of a rules object, every key one of ``known``."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {raw!r}")
    for json_key, value in raw.items():
        if json_key not in known:
            raise ConfigError(f"{where}.{json_key}: unknown key (known: {', '.join(known)})")
        yield json_key, f"{where}.{json_key}", value


def _series_rules(where: str, raw: Any) -> SeriesRules:
    values: dict[str, Any] = {}
    for json_key, name, value in _rule_entries(where, raw, SERIES_RULE_KEYS):
        if json_key in ("Modalities", "ExcludeDescriptions"):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{name}: expected a list of strings, got {value!r}")
            value = tuple(v.upper() for v in value) if json_key == "Modalities" else tuple(value)
        elif json_key in ("MinSlices", "MaxSlices", "MaxPixelsPerSlice"):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: expected a whole number >= 1, got {value!r}")
        elif json_key in ("RequireAxial", "RequireNeckCoverage"):
            if not isinstance(value, bool):
                raise ConfigError(f"{name}: expected true or false, got {value!r}")
        elif json_key == "AxialToleranceDegrees":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 89:
                raise ConfigError(f"{name}: expected a number of degrees in [0, 89], got {value!r}")
        elif json_key == "Prefer":
            if value not in ("most-slices", "thinnest"):
                raise ConfigError(f"{name}: expected \"most-slices\" or \"thinnest\", got {value!r}")
        values[SERIES_RULE_KEYS[json_key]] = value
    rules = SeriesRules(**values)
    if rules.min_slices > rules.max_slices:
        raise ConfigError(f"{where}: MinSlices ({rules.min_slices}) is larger than MaxSlices ({rules.max_slices})")
    return rules


def _lesion_rules(where: str, raw: Any) -> PlausibilityRules:
    values: dict[str, Any] = {}
    for json_key, name, value in _rule_entries(where, raw, LESION_RULE_KEYS):
        if json_key == "CoreHuRange":
            if (not isinstance(value, list) or len(value) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                                                     for v in value) or value[0] >= value[1]):
                raise ConfigError(f"{name}: expected [low, high] in HU with low < high, got {value!r}")
            value = (float(value[0]), float(value[1]))
        elif json_key == "RimEnhancement":
            if not isinstance(value, bool):
                raise ConfigError(f"{name}: expected true or false, got {value!r}")
        else:
            upper = 1.0 if json_key == "MinSoftTissueFraction" else 1000.0
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= upper:
                raise ConfigError(f"{name}: expected a number in [0, {upper:g}], got {value!r}")
            value = float(value)
        values[LESION_RULE_KEYS[json_key]] = value
    return PlausibilityRules(**values)


def rules_section(rules: SeriesRules | PlausibilityRules) -> dict[str, Any]:
    """``SeriesRules`` or ``LesionRules`` as their JSON object (tuples as lists), the inverse of
    what :class:`NodeConfig` parses."""
    names = SERIES_RULE_KEYS if isinstance(rules, SeriesRules) else LESION_RULE_KEYS
    return {json_key: (list(value) if isinstance(value, tuple) else value)
            for json_key, value in ((json_key, getattr(rules, attribute)) for json_key, attribute in names.items())}


KEYS: dict[str, Key] = {
    "Enabled": Key("enabled", "bool", "Process studies that become stable. False keeps the REST routes and the C-FIND dispatch but enqueues nothing."),
    "WorkerCount": Key("worker_count", "int", "Worker processes started and supervised by the plugin.", minimum=0, maximum=32),
    "Device": Key("device", "device", "Where the network runs: auto (CUDA when available), cpu, cuda, or cuda:N (one worker process per GPU)."),
    "WeightsPath": Key("weights_path", "path", "VM-UNet checkpoint. The shipped default is the demo checkpoint (not for clinical use)."),
    "IndexDirectory": Key("index_directory", "path", "Where the case index (FAISS + SQLite) lives."),
    "IndexVectorEncoding": Key("index_vector_encoding", "choice", "How the FAISS HNSW graphs store vectors: flat (float32) or sq8 (8-bit scalar quantised: about a third of the memory per vector, recall in bench/index.py). A change converts the index at the next indexing job.", choices=("flat", "sq8")),
    "IndexEfSearch": Key("index_ef_search", "int", "HNSW efSearch of similar-case searches: how many candidates the graph walk keeps per query slice. Higher is closer to exact search and slower; 32 gave recall@10 0.997 at 1M vectors (bench/index.py) and the same top-5 answers as efSearch 512 on 40 of 40 queries at 10k and 100k (bench/query.py).", minimum=8, maximum=1024),
    "JobsDatabase": Key("jobs_database", "path-or-url", "The job store: a SQLite file (one machine), or a postgresql:// URL shared by several Orthancs and remote workers (docs/scale-out.md)."),
    "IndexDatabase": Key("index_database", "url", "Empty: the case index's rows live in IndexDirectory (SQLite). A postgresql:// URL: they live in PostgreSQL (the truth for every machine) and IndexDirectory holds this machine's FAISS cache, synced incrementally.", choices=DATABASE_URL_SCHEMES),
    "OrthancUrl": Key("orthanc_url", "url", "Remote workers (`python -m dicom_node worker --config FILE`): Orthanc's REST API (e.g. http://pacs-ingest:8042). Workers started by the plugin ignore it.", choices=("http://", "https://")),
    "OrthancUser": Key("orthanc_user", "name", "Remote workers: the HTTP user they log in to Orthanc as."),
    "OrthancPasswordFile": Key("orthanc_password_file", "path", "Remote workers: the file (0600) holding that user's password."),
    "WorkDirectory": Key("work_directory", "path", "Scratch space of the workers (downloaded instances, memory-mapped volumes)."),
    "LogDirectory": Key("log_directory", "path", "Worker log files (UIDs only, no patient data)."),
    "WorkerPython": Key("worker_python", "path", "Python interpreter of the project venv that runs the workers."),
    "SeriesRules": Key("series_rules", "series-rules", "Which series is segmented: Modalities, MinSlices, MaxSlices, RequireAxial, AxialToleranceDegrees, ExcludeDescriptions, Prefer, MaxPixelsPerSlice. `RequireNeckCoverage`: a series with less than 25 mm of neck between the skull base and the lung apices (found from HU, `models.anatomy`) ends as skipped with that reason; when false it is segmented (SEG with a frame for every slice) and lesions are kept only in neck soft tissue."),
    "LesionRules": Key("lesion_rules", "lesion-rules", "Plausibility rules every abscess candidate (a connected region of the network's mask) must pass, in this order; the first it fails rejects it, and the measurement SR and the job count the candidates each rule removed. `MinSoftTissueFraction`: at least this share of the candidate in the neck band's soft tissue (inside the body, 3 mm from the skin, not bone or air; the kept part is clipped to it). `MinVolumeMl`: smallest abscess (1 mL, a 12 mm sphere). `CoreHuRange`: mean HU of the core (2 mm inside its surface) must be fluid (AbscessHeNe: 0-45 HU, widened for noise and partial volume). `RimEnhancement`: on series with a Contrast/Bolus Agent, the 2 mm rim must be `MinRimEnhancementHu` brighter than the core."),
    "RejectedCandidatesSegment": Key("rejected_candidates_segment", "bool", "Also write the rejected candidates into the SEG as a second segment \"Abscess candidate (rejected)\" (QA)."),
    "ForwardTo": Key("forward_to", "name-list", "Orthanc modality names (DicomModalities) that every SEG/SR is sent to."),
    "ForwardRetries": Key("forward_retries", "int", "Attempts per destination before forwarding gives up (the job then says so); between attempts the node waits ForwardBackoffSeconds, doubling each time.", minimum=1, maximum=20),
    "ForwardBackoffSeconds": Key("forward_backoff_seconds", "int", "Wait before the second attempt to forward to a destination (doubled after each failure).", minimum=1, maximum=3600),
    "ForwardTimeoutSeconds": Key("forward_timeout_seconds", "int", "Longest wait for one forwarding attempt (Orthanc's C-STORE job) before it counts as failed.", minimum=5, maximum=7200),
    "SimilarCasesAet": Key("similar_cases_aet", "aet", "Called AE title that turns a C-FIND into a similar-case query."),
    "AllowedSimilarCasesAets": Key("allowed_similar_cases_aets", "aet-list", "Calling AE titles allowed to receive similar-case answers over C-FIND (empty: nobody). Orthanc also checks the AE's host (DicomCheckModalityHost)."),
    "AllowedSimilarCasesUsers": Key("allowed_similar_cases_users", "name-list", "Authenticated HTTP users allowed to receive similar-case answers over REST (empty: nobody; anonymous callers never)."),
    "SimilarCasesThreads": Key("similar_cases_threads", "int", "CPU threads one similar-case search uses (FAISS and BLAS) in the similar-cases service. One keeps queries fast and steady beside workers that hold the other cores; more help only on a machine with idle cores.", minimum=1, maximum=64),
    "SimilarCasesTopK": Key("similar_cases_top_k", "int", "Results in the similar-cases report written after each study.", minimum=1, maximum=100),
    "PseudonymizeSimilarCases": Key("pseudonymize_similar_cases", "bool", "Answer similar-case queries with keyed pseudonyms instead of other patients' names, IDs, accession numbers and UIDs."),
    "SimilarCasesReport": Key("similar_cases_report", "choice", "The similar-cases SR written into each processed study: pseudonymized (other patients only as keyed case pseudonyms), identified (their IDs and UIDs; only where every reader of the study may see them) or off.", choices=("pseudonymized", "identified", "off")),
    "ForwardSimilarCasesReport": Key("forward_similar_cases_report", "bool", "Also send the automatic similar-cases SR to ForwardTo (the SEG and the measurement SR are always sent)."),
    "PseudonymSecretPath": Key("pseudonym_secret_path", "path", "Per-node secret of the keyed pseudonyms (HMAC-SHA256); created 0600 by `make install` or at the first start. Keep it: new secret, new pseudonyms."),
    "SegmentationType": Key("segmentation_type", "choice", "DICOM SEG type: BINARY or FRACTIONAL (probabilities).", choices=("BINARY", "FRACTIONAL")),
    "Threshold": Key("threshold", "float", "Probability above which a pixel is abscess.", minimum=0.0, maximum=1.0),
    "ChunkSlices": Key("chunk_slices", "int", "Slices held in memory at once while segmenting (bounds memory on long series).", minimum=1, maximum=4096),
    "InferenceBatchSize": Key("inference_batch_size", "int", "Slices per network forward pass.", minimum=1, maximum=256),
    "JobTimeoutSeconds": Key("job_timeout_seconds", "int", "Longest attempt at one job: a worker over it is killed and the attempt fails (counted against MaxAttempts).", minimum=10),
    "StageTimeoutSeconds": Key("stage_timeout_seconds", "int", "Longest time in one pipeline stage (download, segment, store ...): a worker over it is killed and the attempt fails.", minimum=10),
    "LeaseSeconds": Key("lease_seconds", "int", "A claimed job whose worker has not renewed its lease for this long goes back to the queue (a killed or hung worker).", minimum=5, maximum=3600),
    "HeartbeatSeconds": Key("heartbeat_seconds", "int", "How often a worker renews the lease of its job (well below LeaseSeconds).", minimum=1, maximum=600),
    "MaxAttempts": Key("max_attempts", "int", "Attempts at one job (crashes, lapsed leases, transient errors) before it ends failed with every attempt's error; a re-run is then explicit.", minimum=1, maximum=20),
    "IndexLockTimeoutSeconds": Key("index_lock_timeout_seconds", "int", "Longest wait for the case index's write lock before the step fails with a clear error.", minimum=1, maximum=3600),
    "Notifications": Key("notifications", "webhooks", "Webhooks: a list of {\"Url\": \"https://...\", \"On\": [\"failed\", \"done\"]}; the workers POST a JSON payload (job id, state, UIDs, error; never a patient name or ID) when a job ends in a listed state (done, failed, skipped, cancelled)."),
    "NotificationRetries": Key("notification_retries", "int", "Attempts per webhook call before it is given up (logged and counted in the metrics).", minimum=1, maximum=20),
    "NotificationTimeoutSeconds": Key("notification_timeout_seconds", "int", "Longest wait for a webhook receiver to answer one call.", minimum=1, maximum=300),
    "NotificationBackoffSeconds": Key("notification_backoff_seconds", "int", "Wait before the second attempt of a failed webhook call (doubled after each failure).", minimum=1, maximum=3600),
}

@dataclasses.dataclass(frozen=True)
class WorkerSettings:
    """What the plugin hands a worker (written to a 0600 file, path passed on the command line)."""

    node: NodeConfig
    orthanc_url: str
    authorization: str | None
    name: str

    def to_json(self) -> str:
        """The settings file's content (it holds the REST credential: write it 0600)."""
        return json.dumps({"node": json.loads(self.node.to_json()), "orthanc_url": self.orthanc_url,
                           "authorization": self.authorization, "name": self.name})

    @classmethod
    def from_json(cls, text: str) -> "WorkerSettings":
        """Parse what :meth:`to_json` wrote."""
        raw = json.loads(text)
        return cls(node=NodeConfig.from_section(raw["node"]), orthanc_url=raw["orthanc_url"],
                   authorization=raw.get("authorization"), name=raw["name"])

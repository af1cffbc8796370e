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
from pathlib import Path
from typing import Any

from models.lesion_rules import PlausibilityRules


CHECKOUT = Path(__file__).resolve().parent.parent
"""The repository checkout the node runs from: relative paths of the configuration resolve against it."""
AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE VR: 16 chars, no backslash


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
    require_neck_coverage: bool = True


SERIES_RULE_KEYS = {
    "Modalities": "modalities",
    "MinSlices": "min_slices",
    "MaxSlices": "max_slices",
    "RequireAxial": "require_axial",
    "AxialToleranceDegrees": "axial_tolerance_degrees",
    "ExcludeDescriptions": "exclude_descriptions",
    "Prefer": "prefer",
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
    weights_path: Path = CHECKOUT / "models" / "weights" / "vmunet-demo-v1.pt"
    index_directory: Path = CHECKOUT / "runtime" / "index"
    jobs_database: Path = CHECKOUT / "runtime" / "jobs.sqlite"
    work_directory: Path = CHECKOUT / "runtime" / "work"
    log_directory: Path = CHECKOUT / "runtime" / "logs"
    worker_python: Path = CHECKOUT / ".venv" / "bin" / "python"
    series_rules: SeriesRules = SeriesRules()
    forward_to: tuple[str, ...] = ()
    forward_retries: int = 3
    similar_cases_aet: str = "ABSCESS_SIMILAR"
    allowed_similar_cases_aets: tuple[str, ...] = ()
    similar_cases_top_k: int = 5
    pseudonymize_similar_cases: bool = False
    segmentation_type: str = "BINARY"
    threshold: float = 0.5
    chunk_slices: int = 64
    inference_batch_size: int = 8
    job_timeout_seconds: int = 3600
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
        return cls(**values)

    def to_json(self) -> str:
        """Serialise for a worker process (inverse of :meth:`from_json`)."""
        section = {}
        for json_key, key in KEYS.items():
            value = getattr(self, key.attribute)
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, (SeriesRules, PlausibilityRules)):
                names = SERIES_RULE_KEYS if isinstance(value, SeriesRules) else LESION_RULE_KEYS
                value = {name: (list(v) if isinstance(v, tuple) else v) for name, v in
                         ((jk, getattr(value, attr)) for jk, attr in names.items())}
            elif isinstance(value, tuple):
                value = list(value)
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
            if not isinstance(raw, str) or not raw:
                raise ConfigError(f"{where}: expected a path string, got {raw!r}")
            path = Path(raw).expanduser()
            return path if path.is_absolute() else (base_directory / path)
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
        if self.kind == "lesion-rules":
            return _lesion_rules(where, raw)
        raise AssertionError(self.kind)


def _ae_title(where: str, raw: Any) -> str:
    if not isinstance(raw, str) or not AE_TITLE.match(raw) or not raw.strip():
        raise ConfigError(f"{where}: {raw!r} is not a DICOM AE title (1-16 printable characters, no backslash)")
    return raw.strip()


def _series_rules(where: str, raw: Any) -> SeriesRules:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {raw!r}")
    values: dict[str, Any] = {}
    for json_key, value in raw.items():
        if json_key not in SERIES_RULE_KEYS:
            raise ConfigError(f"{where}.{json_key}: unknown key (known: {', '.join(SERIES_RULE_KEYS)})")
        name = f"{where}.{json_key}"
        if json_key in ("Modalities", "ExcludeDescriptions"):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{name}: expected a list of strings, got {value!r}")
            value = tuple(v.upper() for v in value) if json_key == "Modalities" else tuple(value)
        elif json_key in ("MinSlices", "MaxSlices"):
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
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {raw!r}")
    values: dict[str, Any] = {}
    for json_key, value in raw.items():
        if json_key not in LESION_RULE_KEYS:
            raise ConfigError(f"{where}.{json_key}: unknown key (known: {', '.join(LESION_RULE_KEYS)})")
        name = f"{where}.{json_key}"
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


KEYS: dict[str, Key] = {
    "Enabled": Key("enabled", "bool", "Process studies that become stable. False keeps the REST routes and the C-FIND dispatch but enqueues nothing."),
    "WorkerCount": Key("worker_count", "int", "Worker processes started and supervised by the plugin.", minimum=0, maximum=32),
    "Device": Key("device", "choice", "Where the network runs: auto (CUDA when available), cpu, cuda.", choices=("auto", "cpu", "cuda")),
    "WeightsPath": Key("weights_path", "path", "VM-UNet checkpoint. The shipped default is the demo checkpoint (not for clinical use)."),
    "IndexDirectory": Key("index_directory", "path", "Where the case index (FAISS + SQLite) lives."),
    "JobsDatabase": Key("jobs_database", "path", "SQLite file of the job store (survives restarts)."),
    "WorkDirectory": Key("work_directory", "path", "Scratch space of the workers (downloaded instances, memory-mapped volumes)."),
    "LogDirectory": Key("log_directory", "path", "Worker log files (UIDs only, no patient data)."),
    "WorkerPython": Key("worker_python", "path", "Python interpreter of the project venv that runs the workers."),
    "SeriesRules": Key("series_rules", "series-rules", "Which series is segmented: Modalities, MinSlices, MaxSlices, RequireAxial, AxialToleranceDegrees, ExcludeDescriptions, Prefer, RequireNeckCoverage (skip a series without a neck, with that reason)."),
    "LesionRules": Key("lesion_rules", "lesion-rules", "Plausibility rules every abscess candidate must pass (the SR and the job count what each removed): CoreHuRange (fluid core), MinVolumeMl, MinSoftTissueFraction (in the neck band's soft tissue), RimEnhancement (contrast series only), MinRimEnhancementHu."),
    "RejectedCandidatesSegment": Key("rejected_candidates_segment", "bool", "Also write the rejected candidates into the SEG as a second segment \"Abscess candidate (rejected)\" (QA)."),
    "ForwardTo": Key("forward_to", "name-list", "Orthanc modality names (DicomModalities) that every SEG/SR is sent to."),
    "ForwardRetries": Key("forward_retries", "int", "Attempts per forward before the job records a forwarding error.", minimum=1, maximum=20),
    "SimilarCasesAet": Key("similar_cases_aet", "aet", "Called AE title that turns a C-FIND into a similar-case query."),
    "AllowedSimilarCasesAets": Key("allowed_similar_cases_aets", "aet-list", "Calling AE titles allowed to receive similar-case answers (empty: nobody)."),
    "SimilarCasesTopK": Key("similar_cases_top_k", "int", "Results in the similar-cases report written after each study.", minimum=1, maximum=100),
    "PseudonymizeSimilarCases": Key("pseudonymize_similar_cases", "bool", "Return pseudonyms instead of other patients' names and IDs."),
    "SegmentationType": Key("segmentation_type", "choice", "DICOM SEG type: BINARY or FRACTIONAL (probabilities).", choices=("BINARY", "FRACTIONAL")),
    "Threshold": Key("threshold", "float", "Probability above which a pixel is abscess.", minimum=0.0, maximum=1.0),
    "ChunkSlices": Key("chunk_slices", "int", "Slices held in memory at once while segmenting (bounds memory on long series).", minimum=1, maximum=4096),
    "InferenceBatchSize": Key("inference_batch_size", "int", "Slices per network forward pass.", minimum=1, maximum=256),
    "JobTimeoutSeconds": Key("job_timeout_seconds", "int", "A running job older than this is considered dead and re-queued.", minimum=60),
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

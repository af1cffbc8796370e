"""VM-UNet checkpoints: one ``torch.save`` dict per file.

Layout (format version 1)::

    {
        "format_version": 1,
        "config": {...},        # VMUNet keyword arguments (VMUNet.config)
        "state_dict": {...},    # model parameters and buffers
        "meta": {
            "name": str, "version": str, "demo": bool, "description": str,
            "preprocessing": {"window": "soft_tissue" | "multi_window",
                              "normalisation": "unit" | "reference",
                              "input_spacing_mm": float},  # pixel size of the network input
            "input_size": int,  # side of the square network input
            "training": {...},  # data, epochs, seed, ... (free form)
            "metrics": {...},   # e.g. {"dice": 0.41} (free form)
        },
    }
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from models.preprocessing import INPUT_NORMALISATIONS, WINDOW_MODES
from models.vmunet import VMUNet

__all__ = [
    "AlgorithmInfo",
    "CHECKPOINT_FORMAT_VERSION",
    "DEMO_DESCRIPTION",
    "Checkpoint",
    "CheckpointError",
    "load_checkpoint",
    "make_meta",
    "save_checkpoint",
]

CHECKPOINT_FORMAT_VERSION = 1
DEMO_DESCRIPTION = "demo weights, trained on synthetic lesions in real CT, not for clinical use"
_REQUIRED_META_KEYS = ("name", "version", "demo", "description", "preprocessing", "input_size")


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or lacks required entries."""


@dataclasses.dataclass(frozen=True)
class AlgorithmInfo:
    """What the objects the node writes say about the network that produced them.

    Attributes:
        name: Weights name (e.g. ``vmunet-demo``).
        version: Weights version.
        demo: True for demo weights (every SEG and SR then says "not for clinical use").
        description: Free text from the checkpoint.
        scan_backend: Selective-scan backend the network runs with (``numba``, ``cuda`` ...).
        input_size: Side of the square network input.
        window: HU window mode of the input.
        embedding_dim: Dimension of the slice/ROI embeddings.

    Raises:
        ValueError: ``name``/``version`` empty or ``demo`` not a bool.
    """

    name: str
    version: str
    demo: bool
    description: str = ""
    scan_backend: str = ""
    input_size: int = 0
    window: str = ""
    embedding_dim: int = 0

    def __post_init__(self) -> None:
        for key in ("name", "version"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key).strip():
                raise ValueError(f"AlgorithmInfo.{key} must be a non-empty string, got {getattr(self, key)!r}")
        if not isinstance(self.demo, bool):
            raise ValueError(f"AlgorithmInfo.demo must be true or false, got {self.demo!r}")
        if not isinstance(self.description, str):
            raise ValueError(f"AlgorithmInfo.description must be a string, got {self.description!r}")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (inverse of :meth:`from_dict`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> AlgorithmInfo:
        """Rebuild from :meth:`as_dict` (unknown keys are ignored)."""
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in record.items() if key in names})


class Checkpoint(NamedTuple):
    """A loaded checkpoint: the network (eval mode) and its metadata."""

    model: VMUNet
    meta: dict[str, Any]


def make_meta(
    name: str,
    version: str,
    demo: bool,
    description: str | None = None,
    window: str = "soft_tissue",
    input_size: int = 256,
    input_spacing_mm: float | None = None,
    normalisation: str = "unit",
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build and validate the ``meta`` dict of a checkpoint.

    Args:
        name: Model name, e.g. ``"vmunet-abscess-demo"``.
        version: Weights version, e.g. ``"0.1.0"``.
        demo: True for demo weights (not for clinical use).
        description: Free text; defaults to :data:`DEMO_DESCRIPTION` for demo weights.
        window: Window mode of :mod:`models.preprocessing` the weights were trained with.
        input_size: Side of the square network input.
        input_spacing_mm: Pixel spacing of the network input (slices are resampled to it);
            None keeps the default field of view of :mod:`models.preprocessing`.
        normalisation: Input scaling after windowing (:data:`models.preprocessing.INPUT_NORMALISATIONS`).
        training: Training information (data, epochs, seed, ...).
        metrics: Validation metrics.

    Returns:
        The meta dict.

    Raises:
        ValueError: Unknown window mode, non-positive input size or missing description.
    """
    if window not in WINDOW_MODES:
        raise ValueError(f"unknown window mode {window!r}; expected one of {sorted(WINDOW_MODES)}")
    if int(input_size) <= 0:
        raise ValueError(f"input_size must be positive, got {input_size}")
    if input_spacing_mm is not None and not float(input_spacing_mm) > 0:
        raise ValueError(f"input_spacing_mm must be positive, got {input_spacing_mm}")
    if normalisation not in INPUT_NORMALISATIONS:
        raise ValueError(f"unknown input normalisation {normalisation!r}; expected one of {INPUT_NORMALISATIONS}")
    preprocessing: dict[str, Any] = {"window": window, "normalisation": normalisation}
    if input_spacing_mm is not None:
        preprocessing["input_spacing_mm"] = float(input_spacing_mm)
    if description is None:
        if not demo:
            raise ValueError("a description is required for non-demo weights")
        description = DEMO_DESCRIPTION
    return {
        "name": str(name),
        "version": str(version),
        "demo": bool(demo),
        "description": str(description),
        "preprocessing": preprocessing,
        "input_size": int(input_size),
        "training": dict(training or {}),
        "metrics": dict(metrics or {}),
    }


def save_checkpoint(path: str | os.PathLike, model: VMUNet, meta: dict[str, Any]) -> None:
    """Save ``model`` and ``meta`` to ``path`` (written to a temporary file, then renamed).

    Args:
        path: Destination file.
        model: The network; its ``config`` rebuilds it.
        meta: Metadata, e.g. from :func:`make_meta`.

    Raises:
        CheckpointError: ``meta`` lacks a required key.
    """
    missing = [key for key in _REQUIRED_META_KEYS if key not in meta]
    if missing:
        raise CheckpointError(f"checkpoint meta lacks {missing}; build it with models.weights.make_meta")
    payload = {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "config": dict(model.config),
        "state_dict": {key: value.detach().cpu() for key, value in model.state_dict().items()},
        "meta": dict(meta),
    }
    path = os.fspath(path)
    temporary = f"{path}.tmp-{os.getpid()}"
    torch.save(payload, temporary)
    os.replace(temporary, path)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint written by :func:`save_checkpoint`.

    Args:
        path: Checkpoint file.
        map_location: Device for the parameters.

    Returns:
        The network in eval mode on ``map_location`` and its meta dict.

    Raises:
        CheckpointError: The file is missing, unreadable, of another format, or its
            state dict does not match its config.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise CheckpointError(f"checkpoint {path!r} cannot be read: {error}") from error
    if not isinstance(payload, dict) or payload.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path!r} is not a VM-UNet checkpoint of format version {CHECKPOINT_FORMAT_VERSION}"
        )
    for key in ("config", "state_dict", "meta"):
        if key not in payload:
            raise CheckpointError(f"checkpoint {path!r} lacks {key!r}")
    missing = [key for key in _REQUIRED_META_KEYS if key not in payload["meta"]]
    if missing:
        raise CheckpointError(f"checkpoint {path!r}: meta lacks {missing}")
    model = VMUNet(**payload["config"])
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint {path!r}: state dict does not match its config: {error}") from error
    return Checkpoint(model.to(map_location).eval(), payload["meta"])

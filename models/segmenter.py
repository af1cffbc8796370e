"""Slice-wise abscess segmentation with VM-UNet, plus slice and ROI embeddings.

The worker's entry point into :mod:`models`::

    segmenter = Segmenter.load(weights_path, device="auto")
    out = segmenter.run(slices_hu)          # float32 [n, H, W] in HU
    out.probabilities                       # float32 [n, H, W] in [0, 1]
    out.slice_embeddings                    # float32 [n, D], L2-normalised
    out.roi_embeddings                      # float32 [n, D], L2-normalised or all-zero rows

Embeddings come from the same forward pass as the masks: the deepest encoder features
of VM-UNet (Ruan et al. 2024; ``D = dims[-1]``, 768 for the default network, on a grid of
1/32 of the network input), average-pooled over the whole slice (slice embedding) or
over the predicted mask (ROI embedding).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.preprocessing import input_spacing_of, normalise_input, to_model_grid, to_source_grid, window_hu, windows_for_mode
from models.scan import choose_backend
from models.vmunet import VMUNet
from models.weights import AlgorithmInfo, load_checkpoint

__all__ = ["MASK_THRESHOLD", "Segmenter", "SegmenterOutput", "resolve_device", "roi_pool"]

MASK_THRESHOLD = 0.5


@dataclass(frozen=True)
class SegmenterOutput:
    """Result of :meth:`Segmenter.run` for ``n`` slices of ``H x W``.

    Attributes:
        probabilities: float32 [n, H, W] in [0, 1], abscess probability on the input grid.
        slice_embeddings: float32 [n, D], L2-normalised global average of the deepest
            encoder features.
        roi_embeddings: float32 [n, D], L2-normalised average of the deepest encoder
            features over the predicted mask (``probabilities > 0.5``); all-zero rows for
            slices without predicted mask.
    """

    probabilities: np.ndarray
    slice_embeddings: np.ndarray
    roi_embeddings: np.ndarray


def resolve_device(device: str | torch.device) -> torch.device:
    """Turn ``"auto"``, ``"cpu"`` or ``"cuda"`` into a device.

    Raises:
        ValueError: Unknown device, or ``"cuda"`` requested without a CUDA device.
    """
    if isinstance(device, torch.device):
        resolved = device
    elif device == "auto":
        resolved = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif device in ("cpu", "cuda") or str(device).startswith("cuda:"):
        resolved = torch.device(device)
    else:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is available; use device='auto' or 'cpu'")
    return resolved


def _l2_normalise(vectors: torch.Tensor) -> torch.Tensor:
    return F.normalize(vectors, p=2.0, dim=1, eps=1e-12)


def roi_pool(features: torch.Tensor, probabilities: torch.Tensor, threshold: float = MASK_THRESHOLD) -> torch.Tensor:
    """Average features over the predicted mask, brought down to the feature grid.

    A feature cell belongs to the ROI when at least half of its area is inside the mask
    (``probabilities > threshold``). When the mask is non-empty but no cell reaches half
    coverage (a lesion smaller than a cell), the cell(s) with the highest pooled
    probability are used.

    Args:
        features: [n, D, h, w] feature maps.
        probabilities: [n, H, W] probabilities on any grid covering the same field of view.
        threshold: Mask threshold.

    Returns:
        [n, D] L2-normalised ROI embeddings; zero rows where the mask is empty.
    """
    grid = features.shape[-2:]
    mask = (probabilities > threshold).float().unsqueeze(1)
    coverage = F.adaptive_avg_pool2d(mask, grid)[:, 0]  # [n, h, w], fraction of each cell in the mask
    pooled_probability = F.adaptive_avg_pool2d(probabilities.unsqueeze(1).float(), grid)[:, 0]
    has_mask = mask.flatten(1).amax(1) > 0
    cells = coverage >= 0.5
    vanished = has_mask & ~cells.flatten(1).any(1)
    if vanished.any():
        best = pooled_probability.flatten(1).amax(1)[:, None, None]
        cells[vanished] = (pooled_probability == best)[vanished]
    cells &= has_mask[:, None, None]
    weights = cells.float()
    sums = torch.einsum("ndhw,nhw->nd", features.float(), weights)
    counts = weights.flatten(1).sum(1, keepdim=True).clamp(min=1.0)
    return _l2_normalise(sums / counts)


class Segmenter:
    """VM-UNet inference on HU slices: probabilities and embeddings in one pass.

    Build it with :meth:`load` (from a checkpoint) or :meth:`from_model`.

    Args:
        model: The network.
        meta: Checkpoint metadata (see :func:`models.weights.make_meta`).
        device: Device the model runs on.
    """

    def __init__(self, model: VMUNet, meta: dict[str, Any], device: torch.device) -> None:
        if model.num_classes != 1:
            raise ValueError(
                f"the segmenter expects a one-class (abscess) network, got num_classes={model.num_classes}"
            )
        self.window = meta["preprocessing"]["window"]
        windows_for_mode(self.window)  # validates the mode
        self.input_size = int(meta["input_size"])
        if self.input_size % model.size_multiple:
            raise ValueError(
                f"input_size {self.input_size} must be a multiple of {model.size_multiple} for this network"
            )
        self.input_spacing_mm = input_spacing_of(meta)
        self.normalisation = meta["preprocessing"].get("normalisation", "unit")
        self.device = device
        self.model = model.to(device).eval()
        self.meta = dict(meta)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "auto") -> Segmenter:
        """Load a checkpoint written by :func:`models.weights.save_checkpoint`.

        Args:
            path: Checkpoint file.
            device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.

        Raises:
            models.weights.CheckpointError: Missing or invalid checkpoint.
            ValueError: Invalid device or meta.
        """
        resolved = resolve_device(device)
        checkpoint = load_checkpoint(path, map_location=resolved)
        return cls(checkpoint.model, checkpoint.meta, resolved)

    @classmethod
    def from_model(cls, model: VMUNet, meta: dict[str, Any], device: str | torch.device = "cpu") -> Segmenter:
        """Wrap an in-memory network (tests, training loops).

        Args:
            model: The network.
            meta: Metadata as from :func:`models.weights.make_meta`.
            device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        """
        return cls(model, meta, resolve_device(device))

    @property
    def info(self) -> AlgorithmInfo:
        """The weights' identity, the scan backend and the input/embedding sizes."""
        return AlgorithmInfo(
            name=self.meta["name"], version=self.meta["version"], demo=bool(self.meta["demo"]),
            description=self.meta["description"], scan_backend=choose_backend(self.device, needs_grad=False),
            input_size=self.input_size, window=self.window, embedding_dim=self.model.dims[-1])

    def run(self, slices_hu: np.ndarray, batch_size: int = 8,
            pixel_spacing_mm: tuple[float, float] | None = None) -> SegmenterOutput:
        """Segment HU slices and embed them.

        The slices are resampled to the network's input spacing and padded or cropped to its
        input size (:func:`models.preprocessing.to_model_grid`); the probabilities come back on
        the source grid by the exact inverse mapping.

        Args:
            slices_hu: float32 [n, H, W] in Hounsfield units (any H, W; n may be 0).
            batch_size: Slices per forward pass.
            pixel_spacing_mm: ``(row, column)`` spacing of the slices (DICOM PixelSpacing); None
                when unknown (square pixels assumed, the longer side filling the network input).

        Returns:
            Probabilities on the input grid and the slice/ROI embeddings.

        Raises:
            ValueError: ``slices_hu`` is not [n, H, W] or contains non-finite values.
        """
        slices_hu = np.asarray(slices_hu)
        if slices_hu.ndim != 3:
            raise ValueError(f"expected HU slices [n, H, W], got shape {slices_hu.shape}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not np.isfinite(slices_hu).all():
            raise ValueError("HU slices contain NaN or infinite values")
        count, height, width = slices_hu.shape
        embedding_dim = self.model.dims[-1]
        probabilities = np.empty((count, height, width), dtype=np.float32)
        slice_embeddings = np.zeros((count, embedding_dim), dtype=np.float32)
        roi_embeddings = np.zeros((count, embedding_dim), dtype=np.float32)
        if self.device.type == "cpu":
            torch.set_flush_denormal(True)
        with torch.inference_mode():
            for start in range(0, count, batch_size):
                stop = min(start + batch_size, count)
                images = window_hu(slices_hu[start:stop], self.window).to(self.device)
                model_images = to_model_grid(images, pixel_spacing_mm, self.input_size, self.input_spacing_mm)
                logits, features = self.model.forward_with_features(normalise_input(model_images, self.normalisation))
                model_probabilities = torch.sigmoid(logits.float())
                on_source = to_source_grid(model_probabilities, (height, width), pixel_spacing_mm, self.input_spacing_mm)
                probabilities[start:stop] = on_source[:, 0].clamp(0.0, 1.0).cpu().numpy()
                slice_embeddings[start:stop] = _l2_normalise(features.float().mean(dim=(2, 3))).cpu().numpy()
                roi_embeddings[start:stop] = roi_pool(features, model_probabilities[:, 0]).cpu().numpy()
        return SegmenterOutput(probabilities, slice_embeddings, roi_embeddings)

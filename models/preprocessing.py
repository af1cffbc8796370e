"""CT preprocessing for the segmentation network: HU windowing and resizing.

Two window modes map HU slices ``[n, H, W]`` to the network's three input channels,
each scaled to [0, 1] (values outside a window are clipped):

``"soft_tissue"``
    One soft-tissue window, level 50 HU / width 350 HU (-125 .. 225 HU), repeated in the
    three channels — the usual neck-CT reading window, in which abscesses are read.
``"multi_window"``
    Three windows, one per channel:
    soft tissue L50/W350 (-125 .. 225 HU); a narrow fluid/abscess window L40/W120
    (-20 .. 100 HU) that stretches the contrast between the fluid core (about 0-30 HU),
    the enhancing rim and muscle (about 40-80 HU); and a wide window L400/W1800
    (-500 .. 1300 HU) keeping air and bone landmarks.

Resizing uses bilinear interpolation (``align_corners=False``) to the network's square
input and back to the source grid, so the probabilities come back with exactly the
input's height and width.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "ABSCESS_WINDOW",
    "SOFT_TISSUE_WINDOW",
    "WIDE_WINDOW",
    "WINDOW_MODES",
    "HUWindow",
    "resize_to_model",
    "resize_to_source",
    "window_hu",
    "windows_for_mode",
]


class HUWindow(NamedTuple):
    """A display window in Hounsfield units."""

    level: float
    width: float

    @property
    def lower(self) -> float:
        return self.level - self.width / 2

    @property
    def upper(self) -> float:
        return self.level + self.width / 2


SOFT_TISSUE_WINDOW = HUWindow(level=50.0, width=350.0)
ABSCESS_WINDOW = HUWindow(level=40.0, width=120.0)
WIDE_WINDOW = HUWindow(level=400.0, width=1800.0)

WINDOW_MODES: dict[str, tuple[HUWindow, HUWindow, HUWindow]] = {
    "soft_tissue": (SOFT_TISSUE_WINDOW, SOFT_TISSUE_WINDOW, SOFT_TISSUE_WINDOW),
    "multi_window": (SOFT_TISSUE_WINDOW, ABSCESS_WINDOW, WIDE_WINDOW),
}


def windows_for_mode(mode: str) -> tuple[HUWindow, HUWindow, HUWindow]:
    """The three channel windows of a window mode.

    Args:
        mode: One of :data:`WINDOW_MODES` (``"soft_tissue"`` or ``"multi_window"``).

    Raises:
        ValueError: Unknown mode.
    """
    try:
        return WINDOW_MODES[mode]
    except KeyError:
        raise ValueError(f"unknown window mode {mode!r}; expected one of {sorted(WINDOW_MODES)}") from None


def window_hu(slices_hu: np.ndarray | torch.Tensor, mode: str = "soft_tissue") -> torch.Tensor:
    """Window HU slices into three channels scaled to [0, 1].

    Args:
        slices_hu: HU values [n, H, W] (any real dtype).
        mode: Window mode, see the module docstring.

    Returns:
        float32 tensor [n, 3, H, W] in [0, 1], on the device of ``slices_hu`` (CPU for numpy).

    Raises:
        ValueError: Wrong number of dimensions, or unknown mode.
    """
    windows = windows_for_mode(mode)
    slices = torch.as_tensor(slices_hu)
    if slices.ndim != 3:
        raise ValueError(f"expected HU slices [n, H, W], got shape {tuple(slices.shape)}")
    slices = slices.float()
    channels = [((slices - window.lower) / window.width).clamp_(0.0, 1.0) for window in windows]
    return torch.stack(channels, dim=1)


def resize_to_model(images: torch.Tensor, input_size: int) -> torch.Tensor:
    """Resize [n, c, H, W] images to the network's square input (bilinear).

    Args:
        images: Images [n, c, H, W].
        input_size: Side of the network input.

    Returns:
        [n, c, input_size, input_size] (the input itself when it already has that size).
    """
    if images.shape[-2:] == (input_size, input_size):
        return images
    return F.interpolate(images, size=(input_size, input_size), mode="bilinear", align_corners=False)


def resize_to_source(maps: torch.Tensor, source_shape: tuple[int, int]) -> torch.Tensor:
    """Resize [n, c, h, w] maps (e.g. probabilities) back to the source grid (bilinear).

    Args:
        maps: Maps on the network grid [n, c, h, w].
        source_shape: ``(H, W)`` of the source slices.

    Returns:
        [n, c, H, W] (the input itself when it already has that size).
    """
    source_shape = (int(source_shape[0]), int(source_shape[1]))
    if tuple(maps.shape[-2:]) == source_shape:
        return maps
    return F.interpolate(maps, size=source_shape, mode="bilinear", align_corners=False)

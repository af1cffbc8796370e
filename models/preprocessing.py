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

Geometry: slices reach the network's square input of ``input_size`` pixels of
``input_spacing_mm`` by **resampling to that common in-plane spacing** (bilinear, anti-aliased
when shrinking) about the image centre and **padding or cropping** to the input size; never by
stretching. A 512 x 384 matrix of 0.6 x 0.9 mm pixels keeps its shape in millimetres. The padding
is 0 in every channel, which is what air (-1024 HU) becomes in every window. Network outputs
come back by the inverse mapping, sampled at the exact centre of every source pixel, so a mask
lands on the source grid where the anatomy is (outside the network's field of view: 0).
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
    "DEFAULT_FIELD_OF_VIEW_MM",
    "INPUT_NORMALISATIONS",
    "normalise_input",
    "input_spacing_of",
    "to_model_grid",
    "to_source_grid",
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


DEFAULT_FIELD_OF_VIEW_MM = 240.0
"""Field of view assumed for checkpoints that do not state their input spacing (the demo v1 weights
were trained on 240 mm wide phantom slices)."""


INPUT_NORMALISATIONS = ("unit", "reference")
"""How the network input is scaled after windowing: ``unit`` keeps the windows' [0, 1];
``reference`` is the VM-UNet reference code's (``myNormalize``): every image standardised and
then min-max scaled to [0, 255] on its own (standardising before a min-max changes nothing, so
this is the per-image min-max)."""


def normalise_input(images: torch.Tensor, mode: str = "unit") -> torch.Tensor:
    """Scale network inputs [n, c, H, W] as the checkpoint was trained (see :data:`INPUT_NORMALISATIONS`)."""
    if mode == "unit":
        return images
    if mode != "reference":
        raise ValueError(f"unknown input normalisation {mode!r}; expected one of {INPUT_NORMALISATIONS}")
    flat = images.flatten(1)
    low, high = flat.amin(1)[:, None, None, None], flat.amax(1)[:, None, None, None]
    return (images - low) / (high - low).clamp(min=1e-6) * 255.0


def input_spacing_of(meta: dict) -> float:
    """Pixel spacing (mm) of a checkpoint's network input: ``meta["preprocessing"]["input_spacing_mm"]``,
    else :data:`DEFAULT_FIELD_OF_VIEW_MM` over the input size."""
    spacing = meta.get("preprocessing", {}).get("input_spacing_mm")
    return float(spacing) if spacing else DEFAULT_FIELD_OF_VIEW_MM / int(meta["input_size"])


def _sampling_positions(count_out: int, spacing_out: float, count_in: int, spacing_in: float) -> torch.Tensor:
    """Normalised (``align_corners=True``) input positions of the output pixel centres, both grids centred."""
    out_index = torch.arange(count_out, dtype=torch.float64) - (count_out - 1) / 2.0
    in_index = out_index * (spacing_out / spacing_in) + (count_in - 1) / 2.0
    return (in_index * (2.0 / max(count_in - 1, 1)) - 1.0).float()


def _resample(images: torch.Tensor, spacing_in: tuple[float, float], shape_out: tuple[int, int],
              spacing_out: tuple[float, float]) -> torch.Tensor:
    """Bilinear resampling of centred grids (zeros outside the input)."""
    rows = _sampling_positions(shape_out[0], spacing_out[0], images.shape[-2], spacing_in[0])
    columns = _sampling_positions(shape_out[1], spacing_out[1], images.shape[-1], spacing_in[1])
    grid_y, grid_x = torch.meshgrid(rows, columns, indexing="ij")
    grid = torch.stack((grid_x, grid_y), dim=-1).to(images.device)[None].expand(images.shape[0], -1, -1, -1)
    return F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode="zeros", align_corners=True)


def _source_spacing(shape: tuple[int, int], pixel_spacing_mm: tuple[float, float] | None, input_size: int,
                    input_spacing_mm: float) -> tuple[float, float]:
    if pixel_spacing_mm is None:  # unknown spacing (windowed PNGs): square pixels, the longer side fills the input
        side = input_size * input_spacing_mm / max(shape)
        return side, side
    dy, dx = (float(value) for value in pixel_spacing_mm)
    if not (dy > 0 and dx > 0):
        raise ValueError(f"pixel spacing must be positive, got {pixel_spacing_mm}")
    return dy, dx


def to_model_grid(images: torch.Tensor, pixel_spacing_mm: tuple[float, float] | None, input_size: int,
                  input_spacing_mm: float) -> torch.Tensor:
    """Bring [n, c, H, W] images onto the network's square input grid (see the module docstring).

    Args:
        images: Images [n, c, H, W] (windowed channels: 0 is air).
        pixel_spacing_mm: ``(row, column)`` spacing of the images; None when unknown (square
            pixels assumed, the longer side filling the input).
        input_size: Side of the network input (pixels).
        input_spacing_mm: Pixel spacing of the network input.

    Returns:
        [n, c, input_size, input_size].
    """
    spacing = _source_spacing(tuple(images.shape[-2:]), pixel_spacing_mm, input_size, input_spacing_mm)
    shrink = (int(round(images.shape[-2] * spacing[0] / input_spacing_mm)),
              int(round(images.shape[-1] * spacing[1] / input_spacing_mm)))
    if shrink[0] < 0.67 * images.shape[-2] or shrink[1] < 0.67 * images.shape[-1]:
        # anti-aliased shrink to about the target spacing first; the exact spacing follows from the sizes
        shrink = (max(shrink[0], 2), max(shrink[1], 2))
        spacing = (spacing[0] * images.shape[-2] / shrink[0], spacing[1] * images.shape[-1] / shrink[1])
        images = F.interpolate(images, size=shrink, mode="bilinear", antialias=True, align_corners=False)
    return _resample(images, spacing, (input_size, input_size), (input_spacing_mm, input_spacing_mm))


def to_source_grid(maps: torch.Tensor, source_shape: tuple[int, int], pixel_spacing_mm: tuple[float, float] | None,
                   input_spacing_mm: float) -> torch.Tensor:
    """Map network outputs [n, c, S, S] back onto the source grid (inverse of :func:`to_model_grid`).

    Every source pixel centre is sampled at its exact position on the network grid (bilinear);
    pixels outside the network's field of view get 0.

    Args:
        maps: Maps on the network grid [n, c, S, S] (e.g. probabilities).
        source_shape: ``(H, W)`` of the source slices.
        pixel_spacing_mm: as given to :func:`to_model_grid`.
        input_spacing_mm: as given to :func:`to_model_grid`.

    Returns:
        [n, c, H, W].
    """
    source_shape = (int(source_shape[0]), int(source_shape[1]))
    spacing = _source_spacing(source_shape, pixel_spacing_mm, maps.shape[-1], input_spacing_mm)
    return _resample(maps, (input_spacing_mm, input_spacing_mm), source_shape, spacing)

"""A PNG of a few CT slices with the abscess mask drawn over them (for the demo and for people)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def overlay_png(volume_hu: np.ndarray, mask: np.ndarray, path: Path, slices: int = 4,
                window: tuple[float, float] = (50.0, 400.0)) -> list[int]:
    """Write slices side by side: soft-tissue window, mask in translucent red with a solid outline.

    Args:
        volume_hu: [n, H, W] HU.
        mask: bool [n, H, W].
        path: the PNG to write.
        slices: how many slices: those with the largest mask area (evenly spaced ones if the mask is empty).
        window: (centre, width) in HU.

    Returns:
        The slice indices shown.
    """
    areas = mask.reshape(mask.shape[0], -1).sum(axis=1)
    if areas.max() > 0:
        chosen = sorted(int(i) for i in np.argsort(-areas, kind="stable")[:slices] if areas[i] > 0)
    else:
        chosen = [int(i) for i in np.linspace(0, mask.shape[0] - 1, slices).round()]
    centre, width = window
    tiles = []
    for index in chosen:
        grey = np.clip((volume_hu[index] - (centre - width / 2)) / width, 0, 1) * 255
        rgb = np.repeat(grey[..., None], 3, axis=2)
        inside = mask[index]
        rgb[inside] = 0.55 * rgb[inside] + 0.45 * np.array([255, 0, 0])
        edge = inside & ~_erode(inside)
        rgb[edge] = [255, 40, 40]
        tiles.append(rgb.astype(np.uint8))
    Image.fromarray(np.concatenate(tiles, axis=1)).save(path)
    return chosen


def _erode(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    return (padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])

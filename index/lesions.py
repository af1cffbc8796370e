"""Lesion descriptors measured from a binary abscess mask and the CT volume in HU.

Pure numpy/scipy: a mask and a volume in, one :class:`Lesion` per 3D connected component out.
The descriptors are the structured metadata the AbscessHeNe retrieval prototype asks for
(Dao et al., sec. III-D: lesion location, multiloculated status, size) and what the case index
filters on (``loculi>=2``, ``volume_ml>5``, ``space=parapharyngeal``).

Definitions (all documented constants are keyword arguments of :func:`measure_lesions`):

- **Lesion**: a 3D connected component of the mask with 26-connectivity. Components smaller
  than ``min_volume_ml`` (default :data:`MIN_VOLUME_ML` = 0.1 ml, i.e. a sphere of ~5.8 mm
  diameter) are treated as segmentation noise and dropped. Lesions are numbered 1..n by
  decreasing volume (ties: lowest first voxel in raster order).
- **Volume**: voxel count x dz x dy x dx, in millilitres (1 ml = 1000 mm^3).
- **Longest axial diameter**: the largest in-plane Feret (caliper) diameter over all slices of
  the lesion, measured between pixel centres with the in-plane spacing (dy, dx): the maximum
  distance between two mask pixels of the same slice. For a shape digitised by centre sampling
  this is the diameter of the continuous shape (a disk of radius 10 mm on a 1 mm grid measures
  20 mm); a one-pixel lesion measures 0 mm.
- **Core HU**: mean and (population) standard deviation of HU over the lesion minus a boundary
  shell: the voxels whose centre lies within ``core_shell_mm`` (default :data:`CORE_SHELL_MM`
  = 2 mm) of the lesion surface belong to the shell. The distance is the anisotropic Euclidean
  distance transform (mm) to the nearest outside voxel centre, minus half the smallest voxel
  spacing (the surface lies half a voxel beyond the boundary voxels' centres). This removes the enhancing rim and partial
  volume at the border. When the shell would swallow the whole lesion, the whole lesion is used.
- **Loculi**: the number of 26-connected components left after a binary opening of the lesion
  with an ellipsoid (a ball of radius ``loculus_opening_mm``, default
  :data:`LOCULUS_OPENING_MM` = 2 mm, in physical units): bridges and septal gaps thinner than
  about 2 x 2 mm are cut, so two collections joined by a thin channel count as 2. When the
  opening removes everything (a lesion thinner than the ball) the lesion counts as 1 loculus.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import pdist

SIDES = ("left", "right", "midline")
"""The patient's side of a lesion."""
MIN_VOLUME_ML = 0.1
"""Components below this volume (ml) are not reported as lesions."""
CORE_SHELL_MM = 2.0
"""Thickness (mm) of the boundary shell left out of the core HU statistics."""
LOCULUS_OPENING_MM = 2.0
"""Radius (mm) of the ball used for the binary opening that separates loculi."""

_CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)


@dataclass(frozen=True)
class Lesion:
    """Descriptors of one lesion (one 3D connected component of the mask).

    The constructor validates every value, so a ``Lesion`` can be handed to the case index,
    the measurement report and the similar-cases report without being checked again.

    Attributes:
        label: Lesion number, 1..n by decreasing volume.
        voxel_count: Number of mask voxels in the lesion.
        volume_ml: Volume in millilitres.
        longest_axial_diameter_mm: Largest in-plane Feret diameter over the lesion's slices (mm).
        core_mean_hu: Mean HU of the core (lesion minus the boundary shell); None if unknown.
        core_sd_hu: Standard deviation of HU over the core; None if unknown.
        loculi: Number of loculi (components after the binary opening, at least 1).
        first_slice: Index of the first slice (axis 0) that contains the lesion.
        last_slice: Index of the last slice that contains the lesion (inclusive).
        centroid_zyx: Centroid in voxel index coordinates (z, y, x).
        space: Deep neck space (e.g. "parapharyngeal") when known, else None.
        side: The patient's side the lesion lies on ("left", "right" or "midline") when known,
            else None.

    Raises:
        ValueError: A value is missing, of the wrong kind or impossible (the message names it).
    """

    label: int
    voxel_count: int
    volume_ml: float
    longest_axial_diameter_mm: float
    core_mean_hu: float | None
    core_sd_hu: float | None
    loculi: int
    first_slice: int
    last_slice: int
    centroid_zyx: tuple[float, float, float] = (0.0, 0.0, 0.0)
    space: str | None = None
    side: str | None = None

    def __post_init__(self) -> None:
        for name in ("label", "voxel_count", "loculi", "first_slice", "last_slice"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < (1 if name == "label" else 0):
                raise ValueError(f"Lesion.{name} must be a whole number >= {1 if name == 'label' else 0}, got {value!r}")
            object.__setattr__(self, name, int(value))
        for name in ("volume_ml", "longest_axial_diameter_mm", "core_mean_hu", "core_sd_hu"):
            value = getattr(self, name)
            if value is None and name.startswith("core_"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not math.isfinite(value):
                raise ValueError(f"Lesion.{name} must be a finite number, got {value!r}")
            if name != "core_mean_hu" and value < 0:
                raise ValueError(f"Lesion.{name} must be >= 0, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.first_slice > self.last_slice:
            raise ValueError(f"Lesion {self.label}: first_slice {self.first_slice} is after last_slice {self.last_slice}")
        if len(self.centroid_zyx) != 3:
            raise ValueError(f"Lesion.centroid_zyx must be (z, y, x), got {self.centroid_zyx!r}")
        object.__setattr__(self, "centroid_zyx", tuple(float(v) for v in self.centroid_zyx))
        if self.space is not None and (not isinstance(self.space, str) or not self.space.strip()):
            raise ValueError(f"Lesion.space must be a non-empty string or None, got {self.space!r}")
        if self.side is not None and self.side not in SIDES:
            raise ValueError(f"Lesion.side must be one of {SIDES} or None, got {self.side!r}")

    def as_dict(self) -> dict[str, Any]:
        """The descriptors as a plain JSON-serialisable dict (inverse of :meth:`from_dict`)."""
        record = asdict(self)
        record["centroid_zyx"] = list(self.centroid_zyx)
        return record

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Lesion:
        """Rebuild a lesion from :meth:`as_dict` (unknown keys are ignored)."""
        return cls(**{name: record[name] for name in _FIELDS if name in record})

    def located(self, space: str, side: str) -> Lesion:
        """The same lesion with its deep neck space and side."""
        return replace(self, space=space, side=side)

    def shifted(self, dz: int, dy: int, dx: int) -> Lesion:
        """The same lesion in a volume whose origin is (dz, dy, dx) voxels before this one's."""
        z, y, x = self.centroid_zyx
        return replace(self, first_slice=self.first_slice + dz, last_slice=self.last_slice + dz,
                       centroid_zyx=(z + dz, y + dy, x + dx))


_FIELDS = tuple(f.name for f in fields(Lesion))


def label_lesions(
    mask: np.ndarray,
    spacing_mm: tuple[float, float, float],
    min_volume_ml: float = MIN_VOLUME_ML,
) -> tuple[np.ndarray, int]:
    """Label the lesions of a mask with the numbering used by :func:`measure_lesions`.

    Args:
        mask: Boolean mask [n, H, W].
        spacing_mm: Voxel spacing (dz, dy, dx) in mm.
        min_volume_ml: Components below this volume are dropped (label 0).

    Returns:
        (labels, count): an int32 label map [n, H, W] with 0 for background and 1..count for the
        lesions ordered by decreasing volume, and the number of lesions.

    Raises:
        ValueError: If the mask is not 3D or the spacing is not three positive numbers.
    """
    mask = np.asarray(mask).astype(bool, copy=False)
    if mask.ndim != 3:
        raise ValueError(f"mask must be 3D [n, H, W], got shape {mask.shape}")
    dz, dy, dx = _check_spacing(spacing_mm)
    components, count = ndimage.label(mask, structure=_CONNECTIVITY_26)
    if count == 0:
        return np.zeros(mask.shape, dtype=np.int32), 0
    voxel_counts = np.bincount(components.ravel(), minlength=count + 1)[1:]
    voxel_ml = dz * dy * dx / 1000.0
    kept = [c for c in range(count) if voxel_counts[c] * voxel_ml >= min_volume_ml]
    # Stable sort keeps scipy's raster order (first voxel) for equal volumes.
    kept.sort(key=lambda c: -voxel_counts[c])
    relabel = np.zeros(count + 1, dtype=np.int32)
    for new_label, component in enumerate(kept, start=1):
        relabel[component + 1] = new_label
    return relabel[components], len(kept)


def measure_lesions(
    mask: np.ndarray,
    volume_hu: np.ndarray,
    spacing_mm: tuple[float, float, float],
    space: str | None = None,
    *,
    min_volume_ml: float = MIN_VOLUME_ML,
    core_shell_mm: float = CORE_SHELL_MM,
    loculus_opening_mm: float = LOCULUS_OPENING_MM,
) -> list[Lesion]:
    """Measure every lesion (26-connected component) of an abscess mask.

    See the module docstring for the exact definition of each descriptor.

    Args:
        mask: Boolean mask [n, H, W] (any dtype; non-zero is lesion).
        volume_hu: CT volume in HU, float [n, H, W], same grid as the mask.
        spacing_mm: Voxel spacing (dz, dy, dx) in mm: slice spacing, row spacing, column spacing.
        space: Deep neck space of the lesions when known (stored on every lesion), else None.
        min_volume_ml: Components below this volume (ml) are dropped.
        core_shell_mm: Thickness (mm) of the boundary shell excluded from the core HU statistics.
        loculus_opening_mm: Radius (mm) of the ball of the opening that separates loculi.

    Returns:
        The lesions, label 1 (largest) first; empty when the mask has no lesion.

    Raises:
        ValueError: If shapes differ, arrays are not 3D, or the spacing is invalid.
    """
    volume_hu = np.asarray(volume_hu)
    mask = np.asarray(mask)
    if volume_hu.shape != mask.shape:
        raise ValueError(
            f"mask shape {mask.shape} and volume_hu shape {volume_hu.shape} differ; "
            "they must be on the same [n, H, W] grid"
        )
    if core_shell_mm < 0 or loculus_opening_mm < 0:
        raise ValueError("core_shell_mm and loculus_opening_mm must be >= 0")
    labels, _ = label_lesions(mask, spacing_mm, min_volume_ml)
    spacing = _check_spacing(spacing_mm)
    voxel_ml = spacing[0] * spacing[1] * spacing[2] / 1000.0
    opening_ball = _ellipsoid(loculus_opening_mm, spacing)
    lesions = []
    for label, box in enumerate(ndimage.find_objects(labels), start=1):
        # Pad by one voxel so that the distance transform and the opening see the outside,
        # also where the lesion touches the edge of the field of view.
        lesion_mask = np.pad(labels[box] == label, 1)
        hu = np.pad(volume_hu[box].astype(np.float64), 1)
        core_hu = _core_values(lesion_mask, hu, spacing, core_shell_mm)
        z_index, y_index, x_index = np.nonzero(lesion_mask)
        offset = [s.start - 1 for s in box]
        lesions.append(
            Lesion(
                label=label,
                voxel_count=int(z_index.size),
                volume_ml=float(z_index.size * voxel_ml),
                longest_axial_diameter_mm=_longest_axial_diameter(lesion_mask, spacing[1:]),
                core_mean_hu=float(core_hu.mean()),
                core_sd_hu=float(core_hu.std()),
                loculi=_count_loculi(lesion_mask, opening_ball),
                first_slice=int(box[0].start),
                last_slice=int(box[0].stop - 1),
                centroid_zyx=(
                    float(z_index.mean() + offset[0]),
                    float(y_index.mean() + offset[1]),
                    float(x_index.mean() + offset[2]),
                ),
                space=space,
            )
        )
    return lesions


def _check_spacing(spacing_mm: tuple[float, float, float]) -> tuple[float, float, float]:
    values = tuple(float(v) for v in spacing_mm)
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing_mm must be three positive numbers (dz, dy, dx), got {spacing_mm!r}")
    return values  # type: ignore[return-value]


def _ellipsoid(radius_mm: float, spacing: tuple[float, float, float]) -> np.ndarray:
    """Voxels of a ball of ``radius_mm`` on the anisotropic grid (always includes the centre)."""
    half = [int(np.floor(radius_mm / s)) for s in spacing]
    grids = np.meshgrid(*[np.arange(-h, h + 1) * s for h, s in zip(half, spacing)], indexing="ij")
    return sum(g**2 for g in grids) <= radius_mm**2 + 1e-9


def _core_values(
    lesion_mask: np.ndarray, hu: np.ndarray, spacing: tuple[float, float, float], shell_mm: float
) -> np.ndarray:
    depth_mm = ndimage.distance_transform_edt(lesion_mask, sampling=spacing) - 0.5 * min(spacing)
    core = depth_mm > shell_mm
    return hu[core] if core.any() else hu[lesion_mask]


def _count_loculi(lesion_mask: np.ndarray, ball: np.ndarray) -> int:
    if ball.sum() <= 1:
        return 1
    opened = ndimage.binary_opening(lesion_mask, structure=ball)
    _, count = ndimage.label(opened, structure=_CONNECTIVITY_26)
    return max(int(count), 1)


def _longest_axial_diameter(lesion_mask: np.ndarray, in_plane_spacing: tuple[float, float]) -> float:
    longest = 0.0
    scale = np.asarray(in_plane_spacing)
    for slice_mask in lesion_mask:
        if not slice_mask.any():
            continue
        # Only boundary pixels can be Feret end points.
        boundary = slice_mask & ~ndimage.binary_erosion(slice_mask)
        points = np.argwhere(boundary) * scale
        longest = max(longest, _max_pairwise_distance(points))
    return float(longest)


def _max_pairwise_distance(points: np.ndarray) -> float:
    if len(points) < 2:
        return 0.0
    if len(points) > 3:
        try:
            points = points[ConvexHull(points).vertices]
        except QhullError:  # collinear pixels (a one-pixel-wide line): check all pairs
            pass
    return float(pdist(points).max())

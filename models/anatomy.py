"""Neck anatomy from Hounsfield units alone: body, bone, airway, spine, mandible, neck band.

The node segments abscesses in the **neck**: between the skull base and the thoracic inlet.
This module finds that band and the landmarks the deep neck spaces are defined by, from the HU
values of a CT series and nothing else (no network, no atlas), so that

* a series without a neck (a chest or abdomen CT, a head CT above the skull base) can be
  recognised and skipped (:attr:`NeckAnatomy.covers_neck`, :attr:`NeckAnatomy.reason`);
* lesion candidates outside the neck band's soft tissue are rejected
  (:meth:`NeckAnatomy.soft_tissue`);
* every lesion gets its deep neck space and side (:meth:`NeckAnatomy.locate`).

Orientation
-----------
Volumes are ``volume_hu[z, y, x]``. :class:`AxisDirections` says which way each index grows in
the patient: the canonical frame is DICOM's LPS (``z`` towards the head, ``y`` towards the
back, ``x`` towards the patient's left), which is how a standard axial series sorted along its
slice normal arrives. Other directions (feet-first, prone) are handled by flipping views.

Rules (physical units, so they hold for any pixel spacing)
---------------------------------------------------------
Per axial slice, on a grid of about :data:`ANALYSIS_SPACING_MM`:

* **Body**: the largest connected region above -400 HU, holes filled.
* **Bone**: body voxels above 300 HU. **Metal**: above 2,500 HU.
* **Cranial cavity**: the bone mask closed by a 6 mm disk; the largest hole it encloses that
  holds soft tissue (-100..100 HU); the slice is *cranial* when that hole exceeds
  :data:`CRANIAL_CAVITY_MM2` (posterior fossa and above; the atlas ring around the cord and the
  foramina stay far below it).
* **Lungs**: air (below -400 HU) inside the body in components of at least 1 cm2 whose centre
  lies more than 20 mm lateral of the midline; the slice is *thoracic* when they reach
  :data:`LUNG_MM2`.
* **Spine**: the bone component (opened by a 3-pixel cross on grids finer than 1 mm) nearest to
  a point 15 % of the body depth behind the body's centre (at least 50 mm2, within 40 mm). **Airway**: the air components (at least 10 mm2 each) in front of
  the spine, at most :data:`AIRWAY_REACH_MM` in front of it and within 20 mm of the body's
  midline, taken together.
* **Mandible**: a bone component in front of the airway (or of the spine when there is no
  airway) whose extent across the body is at least 40 mm.
* **Skull base**: the lowest slice of the topmost run of cranial slices (gaps of up to
  :data:`CRANIAL_GAP_MM` allowed: the temporal region between the posterior fossa and the vault
  is not closed by bone on every slice). **Thoracic inlet**: the highest thoracic slice below it.
* **Neck band**: the slices strictly between the two (or the ends of the scan) that have a body
  of at least 20 cm2. The series **covers the neck** when the band is at least
  :data:`MIN_NECK_BAND_MM` high and the airway and the spine are found on at least 60 % of its
  slices; a chest CT whose first slices catch the thoracic inlet (about 20 mm above the lung
  apices) does not. The landmarks are those of the nearest band slice with an airway or a spine.

Deep neck spaces (:data:`SPACES`) are points in a landmark frame of the lesion's slice (mm,
``lateral`` towards the lesion's side); :func:`space_centre` is the one definition that both
the classification here and the phantom generator of the tooling use:

=================  ==========================================================================
retropharyngeal    midline, halfway between the airway's back wall and the spine's front edge
parapharyngeal     airway centre + 18.5 mm lateral, 4 mm posterior
peritonsillar      airway centre + 12 mm lateral, 5 mm anterior
carotid            airway centre + 27 mm lateral, 10 mm posterior
submandibular      body midline + 31.5 mm lateral, 27.5 % of the body depth behind the skin
=================  ==========================================================================

A lesion whose centroid lies within :data:`RETROPHARYNGEAL_HALF_WIDTH_MM` of the midline and not
more than :data:`RETROPHARYNGEAL_FRONT_MM` in front of the airway's back wall is retropharyngeal
(the space is a thin midline slab behind the pharynx). Any other lesion takes the space (and,
for the paired spaces, the side) whose centre is nearest to its centroid, when that is within
:data:`MAX_SPACE_DISTANCE_MM`; otherwise ``other``. A retropharyngeal or other lesion is ``midline`` within :data:`MIDLINE_MM` of the midline (the
body's centre), else ``left`` or ``right`` (the patient's).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy import ndimage

__all__ = [
    "ANALYSIS_SPACING_MM",
    "AxisDirections",
    "LPS",
    "LesionLocation",
    "NeckAnatomy",
    "SIDES",
    "SPACES",
    "SliceLandmarks",
    "analyse_neck",
    "body_mask",
    "slice_landmarks",
    "space_centre",
]

ANALYSIS_SPACING_MM = 1.4
"""Slices are analysed on a grid of about this pixel size (stride sub-sampling)."""
BODY_HU = -400.0
BONE_HU = 300.0
METAL_HU = 2500.0
SOFT_TISSUE_HU = (-100.0, 120.0)
"""HU range of soft tissue (fat excluded below -100, enhancing vessels above 120)."""
CRANIAL_CAVITY_MM2 = 2000.0
"""A slice whose bone encloses more soft tissue than this (20 cm2) is inside the skull."""
CRANIAL_GAP_MM = 40.0
LUNG_MM2 = 1000.0
"""A slice with more lung air than this (10 cm2) is below the thoracic inlet."""
MIN_BODY_MM2 = 2000.0
MIN_NECK_BAND_MM = 25.0
"""A series covers the neck when its neck band is at least this high."""
BODY_MARGIN_MM = 3.0
"""Lesions are kept this far inside the skin (the outer body shell is not a deep neck space)."""
SPACES = ("parapharyngeal", "retropharyngeal", "peritonsillar", "submandibular", "carotid")
"""The deep neck spaces located by :meth:`NeckAnatomy.locate` (besides ``other``)."""
SIDES = ("left", "right", "midline")
AIRWAY_REACH_MM = 55.0
"""The airway lies at most this far in front of the spine (the trachea at the thoracic inlet
reaches 54 mm in front of the detected vertebra in neck_chest_ct)."""
MAX_SPACE_DISTANCE_MM = 20.0
RETROPHARYNGEAL_HALF_WIDTH_MM = 7.5
RETROPHARYNGEAL_FRONT_MM = 4.5
MIDLINE_MM = 7.0


class AxisDirections(NamedTuple):
    """Which way the volume's indices grow in the patient.

    Attributes:
        z_superior: slice index grows towards the head.
        y_posterior: row index grows towards the back.
        x_left: column index grows towards the patient's left.
    """

    z_superior: bool = True
    y_posterior: bool = True
    x_left: bool = True


LPS = AxisDirections()
"""The canonical frame (DICOM's LPS with slices sorted inferior to superior)."""


@dataclasses.dataclass(frozen=True)
class SliceLandmarks:
    """What one axial slice shows, in canonical (LPS) pixel coordinates of the source grid.

    Attributes:
        z: slice index (canonical order: 0 is the most inferior slice).
        kind: ``outside`` (no body), ``cranial``, ``thoracic`` or ``neck`` (anything else).
        body_mm2: body cross-section area.
        body_centre_yx: centre of the body (pixels).
        body_top_y / body_depth_px: anterior skin row and antero-posterior extent (pixels).
        spine_centre_yx / spine_front_y: the spine's centre and its anterior edge (pixels) or None.
        airway_centre_yx / airway_back_y: the airway's centre and posterior wall (pixels) or None.
        mandible: whether a mandible-like bone arch lies in front of the airway.
        cranial_mm2: soft tissue enclosed by bone (cranial cavity candidate).
        lung_mm2: lateral air inside the body.
        metal_mm2: area above 2,500 HU.
    """

    z: int
    kind: str
    body_mm2: float = 0.0
    body_centre_yx: tuple[float, float] = (0.0, 0.0)
    body_top_y: float = 0.0
    body_depth_px: float = 0.0
    spine_centre_yx: tuple[float, float] | None = None
    spine_front_y: float | None = None
    airway_centre_yx: tuple[float, float] | None = None
    airway_back_y: float | None = None
    mandible: bool = False
    cranial_mm2: float = 0.0
    lung_mm2: float = 0.0
    metal_mm2: float = 0.0

    @property
    def midline_x(self) -> float:
        """Column of the midline: the body's centre (the spine's centre drifts to a lateral mass at C1)."""
        return self.body_centre_yx[1]


@dataclasses.dataclass(frozen=True)
class LesionLocation:
    """Where a lesion lies: its deep neck space, side and distance to that space's centre."""

    space: str
    side: str
    distance_mm: float


def body_mask(slice_hu: np.ndarray) -> np.ndarray:
    """The body of one slice: the largest connected region above -400 HU, holes filled."""
    labels, count = ndimage.label(slice_hu > BODY_HU)
    if count == 0:
        return np.zeros(slice_hu.shape, bool)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    return ndimage.binary_fill_holes(labels == int(np.argmax(sizes)) + 1)


def _components(mask: np.ndarray) -> tuple[np.ndarray, int, np.ndarray, np.ndarray]:
    labels, count = ndimage.label(mask)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    centres = np.array(ndimage.center_of_mass(mask, labels, range(1, count + 1))).reshape(-1, 2)
    return labels, count, sizes, centres


def _disk(radius_px: float) -> np.ndarray:
    r = max(1, int(round(radius_px)))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return yy**2 + xx**2 <= r * r + 1e-9


def slice_landmarks(slice_hu: np.ndarray, spacing_yx: Sequence[float], z: int = 0) -> SliceLandmarks:
    """Landmarks of one axial slice given in canonical orientation (row 0 anterior, column 0 right).

    Args:
        slice_hu: ``[H, W]`` in HU.
        spacing_yx: row and column spacing (mm).
        z: the slice's index, stored in the result.

    Returns:
        The :class:`SliceLandmarks` (pixel coordinates of ``slice_hu``'s grid).
    """
    spacing = np.asarray(spacing_yx, float)
    pixel_mm2 = float(spacing[0] * spacing[1])
    body = body_mask(slice_hu)
    body_px = int(body.sum())
    if body_px * pixel_mm2 < MIN_BODY_MM2:
        return SliceLandmarks(z=z, kind="outside", body_mm2=body_px * pixel_mm2)
    ys, xs = np.nonzero(body)
    body_centre = np.array([ys.mean(), xs.mean()])
    body_top, body_depth = float(ys.min()), float(ys.max() - ys.min())
    bone = body & (slice_hu > BONE_HU)
    air = body & (slice_hu < BODY_HU)
    metal_mm2 = float((slice_hu > METAL_HU).sum() * pixel_mm2)

    # cranial cavity: soft tissue enclosed by (closed) bone
    disk = _disk(6.0 / spacing.mean())
    pad = disk.shape[0]
    closed = ndimage.binary_closing(np.pad(bone, pad), structure=disk)[pad:-pad, pad:-pad]
    enclosed = ndimage.binary_fill_holes(closed) & ~closed
    enclosed &= (slice_hu > SOFT_TISSUE_HU[0]) & (slice_hu < 100.0)
    cranial_mm2 = 0.0
    if enclosed.any():
        cranial_mm2 = float(np.bincount(ndimage.label(enclosed)[0].ravel())[1:].max() * pixel_mm2)

    # lungs: lateral air
    lung_mm2 = 0.0
    labels, count, sizes, centres = _components(air)
    for index in range(count):
        if sizes[index] * pixel_mm2 >= 100.0 and abs(centres[index][1] - body_centre[1]) * spacing[1] > 20.0:
            lung_mm2 += float(sizes[index] * pixel_mm2)

    # spine: the bone component nearest to a point behind the body's centre
    spine_centre = spine_front = None
    spine_guess = body_centre + np.array([0.15 * body_depth, 0.0])
    # an opening cuts bone bridges thinner than 2 pixels: only worth it (and harmless) on fine grids
    opened_bone = ndimage.binary_opening(bone) if spacing.min() < 1.0 else bone
    bone_labels, bone_count, bone_sizes, bone_centres = _components(opened_bone)
    candidates = [i for i in range(bone_count) if bone_sizes[i] * pixel_mm2 >= 50.0]
    spine_index = None
    if candidates:
        distances = [np.hypot(*((bone_centres[i] - spine_guess) * spacing)) for i in candidates]
        if min(distances) < 40.0:
            spine_index = candidates[int(np.argmin(distances))]
            sy, sx = np.nonzero(bone_labels == spine_index + 1)
            spine_centre = (float(sy.mean()), float(sx.mean()))
            near_midline = np.abs(sx - spine_centre[1]) * spacing[1] < 8.0
            spine_front = float(sy[near_midline].min() if near_midline.any() else sy.min())

    # airway: the air in front of the spine near the midline (pharynx, larynx or trachea; the
    # pieces of a pharynx split by the tongue or the epiglottis count together)
    airway_centre = airway_back = None
    reference_y = spine_front if spine_front is not None else float(body_centre[0])
    midline_x = float(body_centre[1])
    pieces = [index for index in range(count)
              if sizes[index] * pixel_mm2 >= 10.0 and centres[index][0] <= reference_y
              and abs(centres[index][1] - midline_x) * spacing[1] <= 20.0
              and (reference_y - centres[index][0]) * spacing[0] <= AIRWAY_REACH_MM]
    if pieces:
        airway = np.isin(labels, np.asarray(pieces) + 1)
        ay, ax = np.nonzero(airway)
        airway_centre, airway_back = (float(ay.mean()), float(ax.mean())), float(ay.max())

    # mandible: a bone arch in front of the airway (or of the spine)
    mandible = False
    front_limit = airway_centre[0] if airway_centre is not None else reference_y - 15.0 / spacing[0]
    for index in range(bone_count):
        if index == spine_index or bone_sizes[index] * pixel_mm2 < 80.0:
            continue
        by, bx = np.nonzero(bone_labels == index + 1)
        if by.mean() < front_limit - 10.0 / spacing[0] and (bx.max() - bx.min()) * spacing[1] >= 40.0:
            mandible = True
            break

    if cranial_mm2 >= CRANIAL_CAVITY_MM2:
        kind = "cranial"
    elif lung_mm2 >= LUNG_MM2:
        kind = "thoracic"
    else:
        kind = "neck"
    return SliceLandmarks(
        z=z, kind=kind, body_mm2=body_px * pixel_mm2, body_centre_yx=(float(body_centre[0]), float(body_centre[1])),
        body_top_y=body_top, body_depth_px=body_depth, spine_centre_yx=spine_centre, spine_front_y=spine_front,
        airway_centre_yx=airway_centre, airway_back_y=airway_back, mandible=mandible, cranial_mm2=cranial_mm2,
        lung_mm2=lung_mm2, metal_mm2=metal_mm2)


def _scaled(marks: SliceLandmarks, stride: int) -> SliceLandmarks:
    """Landmarks measured on a ``stride``-sub-sampled grid, in pixels of the full grid."""
    if stride == 1 or marks.kind == "outside":
        return marks

    def point(value: tuple[float, float] | None) -> tuple[float, float] | None:
        return None if value is None else (value[0] * stride, value[1] * stride)

    def number(value: float | None) -> float | None:
        return None if value is None else value * stride

    return dataclasses.replace(
        marks, body_centre_yx=point(marks.body_centre_yx), body_top_y=number(marks.body_top_y),
        body_depth_px=number(marks.body_depth_px), spine_centre_yx=point(marks.spine_centre_yx),
        spine_front_y=number(marks.spine_front_y), airway_centre_yx=point(marks.airway_centre_yx),
        airway_back_y=number(marks.airway_back_y))


def space_centre(space: str, side: int, marks: SliceLandmarks, spacing_yx: Sequence[float],
                 offsets: tuple[float, float] | None = None) -> np.ndarray | None:
    """Centre ``(y, x)`` in pixels of a deep neck space on one slice (table in the module docstring).

    Args:
        space: one of :data:`SPACES`.
        side: +1 for the patient's left, -1 for the right, 0 for the midline.
        marks: the slice's landmarks (canonical orientation).
        spacing_yx: row and column spacing (mm).
        offsets: ``(posterior_mm, lateral_mm)`` replacing the table's values (the phantom
            generator draws them around the table's); for ``submandibular`` the first value is
            the fraction of the body depth, for ``retropharyngeal`` the lateral value is used
            alone.

    Returns:
        The centre, or None when the landmarks it needs are missing on this slice.

    Raises:
        ValueError: unknown space.
    """
    mm = 1.0 / np.asarray(spacing_yx, float)
    if space == "retropharyngeal":
        if marks.airway_back_y is None or marks.spine_front_y is None:
            return None
        lateral = 0.0 if offsets is None else offsets[1]
        return np.array([0.5 * (marks.airway_back_y + marks.spine_front_y), marks.midline_x + lateral * mm[1]])
    if space == "submandibular":
        depth_fraction, lateral = (0.275, 31.5) if offsets is None else offsets
        return np.array([marks.body_top_y + depth_fraction * marks.body_depth_px,
                         marks.body_centre_yx[1] + side * lateral * mm[1]])
    table = {"parapharyngeal": (4.0, 18.5), "peritonsillar": (-5.0, 12.0), "carotid": (10.0, 27.0)}
    if space not in table:
        raise ValueError(f"unknown deep neck space {space!r}; expected one of {SPACES}")
    if marks.airway_centre_yx is None:
        return None
    posterior, lateral = table[space] if offsets is None else offsets
    airway = np.asarray(marks.airway_centre_yx)
    return airway + np.array([posterior * mm[0], side * lateral * mm[1]])


@dataclasses.dataclass
class NeckAnatomy:
    """The neck of one series: per-slice landmarks, the neck band and whether the series covers the neck.

    Build it with :func:`analyse_neck`. Slice indices and pixel coordinates in the public methods
    are those of the volume as given (not canonical).

    Attributes:
        shape: ``(slices, rows, columns)`` of the analysed volume.
        spacing_mm: ``(dz, dy, dx)``.
        directions: how the volume's axes lie in the patient.
        landmarks: one :class:`SliceLandmarks` per slice, canonical slice order.
        skull_base: canonical index of the lowest cranial slice, or None.
        thoracic_inlet: canonical index of the highest thoracic slice below the neck, or None.
        band: ``(first, last)`` canonical slice indices of the neck band (inclusive), or None.
        covers_neck: the series shows enough neck to segment.
        reason: why it does not (empty when it does).
    """

    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    directions: AxisDirections
    landmarks: list[SliceLandmarks]
    skull_base: int | None
    thoracic_inlet: int | None
    band: tuple[int, int] | None
    covers_neck: bool
    reason: str

    # ----------------------------------------------------------------- index conversions

    def canonical_z(self, z: int) -> int:
        """Canonical (inferior-to-superior) index of slice ``z`` of the given volume."""
        return int(z) if self.directions.z_superior else self.shape[0] - 1 - int(z)

    def _canonical_yx(self, y: float, x: float) -> tuple[float, float]:
        rows, columns = self.shape[1:]
        return (y if self.directions.y_posterior else rows - 1 - y,
                x if self.directions.x_left else columns - 1 - x)

    def _canonical_slice(self, slice_hu: np.ndarray) -> np.ndarray:
        view = slice_hu if self.directions.y_posterior else slice_hu[::-1]
        return view if self.directions.x_left else view[:, ::-1]

    # ----------------------------------------------------------------- queries

    def band_slices(self) -> list[int]:
        """Indices (of the volume as given) of the neck band's slices, ascending."""
        if self.band is None:
            return []
        return sorted(self.canonical_z(z) for z in range(self.band[0], self.band[1] + 1))

    def in_band(self, z: int) -> bool:
        """Whether slice ``z`` (volume as given) lies in the neck band."""
        if self.band is None:
            return False
        return self.band[0] <= self.canonical_z(z) <= self.band[1]

    def band_height_mm(self) -> float:
        """Height of the neck band (0 without one)."""
        return 0.0 if self.band is None else (self.band[1] - self.band[0] + 1) * self.spacing_mm[0]

    def soft_tissue(self, z: int, slice_hu: np.ndarray, band_only: bool = True) -> np.ndarray:
        """Where a lesion may lie on slice ``z``: body (3 mm inside the skin), not bone, not air.

        Args:
            z: slice index of the volume as given.
            slice_hu: that slice ``[H, W]`` in HU (same grid as the analysed volume).
            band_only: all False outside the neck band.

        Returns:
            bool ``[H, W]`` on the grid of ``slice_hu`` as given.
        """
        if band_only and not self.in_band(z):
            return np.zeros(slice_hu.shape, bool)
        body = body_mask(slice_hu)
        margin_px = max(1, int(round(BODY_MARGIN_MM / min(self.spacing_mm[1:]))))
        inner = ndimage.binary_erosion(body, iterations=margin_px)
        hard = ndimage.binary_dilation((slice_hu > BONE_HU) | (slice_hu < BODY_HU))
        return inner & ~hard

    def locate(self, centroid_zyx: Sequence[float]) -> LesionLocation:
        """Deep neck space and side of a lesion from its centroid (voxel indices of the volume as given).

        The landmarks of the nearest neck-band slice that has an airway (or spine) are used.
        """
        z = self.canonical_z(int(round(centroid_zyx[0])))
        y, x = self._canonical_yx(float(centroid_zyx[1]), float(centroid_zyx[2]))
        marks = self._nearest_marks(z)
        if marks is None:
            return LesionLocation("other", "midline", math.inf)
        spacing = np.asarray(self.spacing_mm[1:])
        lateral_mm = (x - marks.midline_x) * spacing[1]
        best_space, best_sign, best_distance = "other", 0, math.inf
        if (marks.airway_back_y is not None and abs(lateral_mm) <= RETROPHARYNGEAL_HALF_WIDTH_MM
                and (y - marks.airway_back_y) * spacing[0] >= -RETROPHARYNGEAL_FRONT_MM):
            centre = space_centre("retropharyngeal", 0, marks, spacing)
            distance = math.inf if centre is None else float(np.hypot(*((np.array([y, x]) - centre) * spacing)))
            side = "midline" if abs(lateral_mm) < MIDLINE_MM else ("left" if lateral_mm > 0 else "right")
            return LesionLocation("retropharyngeal", side, distance)
        for space in SPACES:
            for sign in ((0,) if space == "retropharyngeal" else (1, -1)):
                centre = space_centre(space, sign, marks, spacing)
                if centre is None:
                    continue
                distance = float(np.hypot(*((np.array([y, x]) - centre) * spacing)))
                if distance < best_distance:
                    best_space, best_sign, best_distance = space, sign, distance
        if best_distance > MAX_SPACE_DISTANCE_MM:
            best_space, best_sign = "other", 0
        if best_sign == 0:  # retropharyngeal or other: the side from the offset to the midline
            side = "midline" if abs(lateral_mm) < MIDLINE_MM else ("left" if lateral_mm > 0 else "right")
        else:
            side = "left" if best_sign > 0 else "right"
        return LesionLocation(best_space, side, best_distance)

    def _nearest_marks(self, z: int) -> SliceLandmarks | None:
        usable = [m for m in self.landmarks if m.kind == "neck" and (m.airway_centre_yx or m.spine_centre_yx)]
        if not usable:
            return None
        return min(usable, key=lambda m: abs(m.z - z))

    def summary(self) -> dict[str, object]:
        """JSON-ready description for the job record."""
        def index(z: int | None) -> int | None:
            return None if z is None else self.canonical_z(z)

        band = None if self.band is None else sorted((index(self.band[0]), index(self.band[1])))
        return {"covers_neck": self.covers_neck, "reason": self.reason, "neck_slices": band,
                "neck_band_mm": round(self.band_height_mm(), 1), "skull_base_slice": index(self.skull_base),
                "thoracic_inlet_slice": index(self.thoracic_inlet)}


def analyse_neck(volume_hu: np.ndarray, spacing_mm: Sequence[float], directions: AxisDirections = LPS) -> NeckAnatomy:
    """Find the landmarks and the neck band of a CT series (rules in the module docstring).

    Args:
        volume_hu: ``[z, y, x]`` in HU (an array or a memory map; read one slice at a time).
        spacing_mm: ``(dz, dy, dx)``.
        directions: how the axes lie in the patient (default: LPS, slices inferior to superior).

    Returns:
        The :class:`NeckAnatomy`.
    """
    n, rows, columns = volume_hu.shape
    spacing = tuple(float(v) for v in spacing_mm)
    stride = max(1, int(round(ANALYSIS_SPACING_MM / min(spacing[1:]))))
    anatomy = NeckAnatomy(shape=(n, rows, columns), spacing_mm=spacing, directions=directions, landmarks=[],
                          skull_base=None, thoracic_inlet=None, band=None, covers_neck=False, reason="")
    coarse_spacing = (spacing[1] * stride, spacing[2] * stride)
    for z in range(n):
        source_z = anatomy.canonical_z(z)  # canonical_z is its own inverse
        canonical = anatomy._canonical_slice(np.asarray(volume_hu[source_z], dtype=np.float32))
        marks = slice_landmarks(canonical[::stride, ::stride], coarse_spacing, z)
        anatomy.landmarks.append(_scaled(marks, stride))
    kinds = [m.kind for m in anatomy.landmarks]

    cranial = [z for z, kind in enumerate(kinds) if kind == "cranial"]
    if cranial:
        gap = max(1, int(round(CRANIAL_GAP_MM / spacing[0])))
        base = cranial[-1]
        for z in reversed(cranial[:-1]):
            if base - z > gap:
                break
            base = z
        anatomy.skull_base = base
    top = (anatomy.skull_base - 1) if anatomy.skull_base is not None else n - 1
    while top >= 0 and kinds[top] == "outside":
        top -= 1
    bottom = top
    while bottom - 1 >= 0 and kinds[bottom - 1] == "neck":
        bottom -= 1
    if top >= 0 and kinds[top] == "neck":
        if bottom - 1 >= 0 and kinds[bottom - 1] == "thoracic":
            anatomy.thoracic_inlet = bottom - 1
        anatomy.band = (bottom, top)
    anatomy.covers_neck, anatomy.reason = _coverage(anatomy)
    return anatomy


def _coverage(anatomy: NeckAnatomy) -> tuple[bool, str]:
    if anatomy.band is None:
        kinds = {m.kind for m in anatomy.landmarks}
        if kinds <= {"outside"}:
            return False, "no body found in the series (every slice is air)"
        if "neck" not in kinds:
            found = " and ".join(k for k in ("cranial", "thoracic") if k in kinds)
            return False, f"no neck in the series: only {found or 'non-neck'} slices (skull or lungs on every slice)"
        return False, "no neck band between the skull base and the thoracic inlet"
    height = anatomy.band_height_mm()
    band = anatomy.landmarks[anatomy.band[0]:anatomy.band[1] + 1]
    with_landmarks = sum(1 for m in band if m.airway_centre_yx is not None and m.spine_centre_yx is not None)
    if height < MIN_NECK_BAND_MM:
        return False, (f"no neck in the series: only {height:.0f} mm between "
                       f"{'the skull base' if anatomy.skull_base is not None else 'the top of the scan'} and "
                       f"{'the lung apices' if anatomy.thoracic_inlet is not None else 'the bottom of the scan'} "
                       f"(at least {MIN_NECK_BAND_MM:.0f} mm needed)")
    if with_landmarks < 0.6 * len(band):
        return False, (f"no neck in the series: airway and spine found on only {with_landmarks} of the "
                       f"{len(band)} candidate neck slices")
    return True, ""

"""Synthetic neck abscesses inserted into real head-and-neck CT, written in the AbscessHeNe layout.

No labelled abscess CT ships in any package registry, so tests, demos and the demo weights use
*phantoms*: a real CT (``ct_head``, ``neck_chest_ct`` or ``aorta_ct`` from :mod:`tooling.sample_data`) with a
synthetic abscess rendered into it. The lesion model follows the AbscessHeNe paper (Dao et al.,
"Toward Content-based Indexing and Retrieval of Head and Neck CT with Abscess Segmentation"):
a low-attenuation core of 0-45 HU, a well-defined enhancing rim, an irregular or
multiloculated shape, in one of the deep neck spaces. Because the lesion is inserted, the ground
truth (mask, space, volume, loculi, diameter) is exact.

Orientation
-----------
Every volume in this module is ``volume_hu[z, y, x]`` in the patient LPS frame used by DICOM:
``z`` grows towards the head (superior), ``y`` towards the back (posterior), ``x`` towards the
patient's left. An axial slice ``volume_hu[z]`` therefore displays the usual radiological way:
row 0 is anterior, column 0 is the patient's right. ``spacing_mm`` is ``(dz, dy, dx)``.
Host volumes are padded in-plane with air (-1024 HU) to a square matrix, like a scanner's
square reconstruction field of view.

Placement rules (the product's anatomy, :mod:`models.anatomy`, on the augmented host)
----------------------------------------------------------------------------------
* Neck slices: the host's neck band (:func:`models.anatomy.analyse_neck`: below the skull base,
  above the thoracic inlet), excluding slices with dental metal (more than 100 mm2 above
  2,500 HU) or lung (more than 1,500 mm2 of lateral air).
* Landmarks (body, spine, airway) per slice: :func:`models.anatomy.slice_landmarks`.
* Space centres: :func:`models.anatomy.space_centre` with its offsets drawn around the
  table's values (``s`` = +1 for left, -1 for right): retropharyngeal = midline +-3 mm,
  halfway between the airway's back wall and the spine's front edge; parapharyngeal = airway
  + s*(15-22) mm lateral, 0-8 mm posterior; peritonsillar = airway + s*(9-15) mm lateral, 2-8 mm
  anterior (upper neck); submandibular = body midline + s*(25-38) mm, 20-35 % of the body depth
  from the anterior skin (lower neck); carotid = airway + s*(22-32) mm lateral, 5-15 mm posterior.
* The centre is then moved (up to 12 mm, 4 mm in the thin retropharyngeal space) to the point
  with the most soft tissue (-100 to +120 HU) around it, and the lesion is clipped to soft tissue: never bone, air or the outer
  3 mm of the body.

CLI: ``python -m tooling.phantoms --out DIR --cases N --seed S``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import pdist

from models import anatomy

#: HU offset of the 16-bit PNGs: ``uint16 = HU + HU_OFFSET`` (0 is -1024 HU).
HU_OFFSET = 1024
#: Deep neck spaces this generator knows (those the product locates).
SPACES = anatomy.SPACES
#: CSV columns of ``abscesshene_train.csv`` / ``abscesshene_test.csv``, in order.
CSV_COLUMNS = (
    "image", "mask", "case_id", "slice_index", "has_lesion", "deep_neck_space", "side",
    "volume_ml", "loculi", "longest_axial_diameter_mm", "pixel_spacing_mm",
    "slice_thickness_mm", "host",
)


@dataclasses.dataclass(frozen=True)
class HostSpec:
    """A real CT that lesions are inserted into.

    Attributes:
        sample: name of the sample in :data:`tooling.sample_data.SAMPLES`.
        keep_band: ``(low, high)`` fractions of the slice range kept in the case volume.
        spaces: deep neck spaces plausible in this host's neck band.
        upper_spaces: spaces placed only in the upper half of the neck band.
        lower_spaces: spaces placed only in the lower half of the neck band.
    """

    sample: str
    keep_band: tuple[float, float]
    spaces: tuple[str, ...]
    upper_spaces: tuple[str, ...] = ()
    lower_spaces: tuple[str, ...] = ()


HOSTS: dict[str, HostSpec] = {
    "ct_head": HostSpec(
        "ct_head", keep_band=(0.0, 1.0), spaces=SPACES,
        upper_spaces=("peritonsillar",), lower_spaces=("submandibular",)),
    # the thoracic inlet (C6-T1): below the hyoid, where the parapharyngeal space has ended
    "neck_chest_ct": HostSpec("neck_chest_ct", keep_band=(0.75, 1.0), spaces=("retropharyngeal", "carotid")),
    "aorta_ct": HostSpec(
        "aorta_ct", keep_band=(0.7, 1.0), spaces=("retropharyngeal", "parapharyngeal", "carotid", "submandibular"),
        lower_spaces=("retropharyngeal",), upper_spaces=("submandibular",)),
}


@dataclasses.dataclass
class PhantomCase:
    """One synthetic patient: a real host CT with inserted abscesses.

    Attributes:
        volume_hu: float32 ``[z, y, x]`` in HU (LPS orientation, see module docstring).
        mask: bool ``[z, y, x]``, the abscess ground truth (core, septa and rim).
        labels: uint8 ``[z, y, x]``, 0 background, ``i + 1`` for the voxels of ``lesions[i]``.
        core_mask: bool ``[z, y, x]``, the low-attenuation core only (0-45 HU by construction).
        spacing_mm: ``(dz, dy, dx)`` in mm.
        lesions: one dict per lesion: ``space``, ``side``, ``volume_ml``, ``loculi``,
            ``longest_axial_diameter_mm``, ``center_zyx`` (voxel indices), ``shape``,
            ``core_hu``, ``rim_hu``, ``rim_mm``.
        case_id: identifier of the synthetic patient.
        host: name of the host CT.
        seed: the seed that reproduces this case.
        neck_slices: ``(first, last)`` slice indices (inclusive) of the neck band.
    """

    volume_hu: np.ndarray
    mask: np.ndarray
    labels: np.ndarray
    core_mask: np.ndarray
    spacing_mm: tuple[float, float, float]
    lesions: list[dict[str, Any]]
    case_id: str
    host: str
    seed: int
    neck_slices: tuple[int, int]


# --------------------------------------------------------------------------- host volumes


@functools.lru_cache(maxsize=2)
def _load_host_cached(name: str) -> tuple[np.ndarray, tuple[float, float, float]]:
    from tooling.sample_data import fetch

    spec = HOSTS[name]
    image = nib.load(fetch(spec.sample))
    current = nib.orientations.io_orientation(image.affine)
    target = nib.orientations.axcodes2ornt(("L", "P", "S"))
    transform = nib.orientations.ornt_transform(current, target)
    data_lps = nib.orientations.apply_orientation(np.asarray(image.dataobj, dtype=np.float32), transform)
    zooms = image.header.get_zooms()[:3]
    spacing_lps = [0.0, 0.0, 0.0]
    for input_axis, (output_axis, _) in enumerate(transform):
        spacing_lps[int(output_axis)] = float(zooms[input_axis])
    volume = np.ascontiguousarray(data_lps.transpose(2, 1, 0))  # [S, P, L] = [z, y, x]
    n_slices = volume.shape[0]
    keep = slice(int(round(spec.keep_band[0] * n_slices)), int(round(spec.keep_band[1] * n_slices)))
    volume = volume[keep]
    volume = np.maximum(volume, -1024.0)
    side = max(volume.shape[1:])
    pad_y, pad_x = side - volume.shape[1], side - volume.shape[2]
    volume = np.pad(volume, ((0, 0), (pad_y // 2, pad_y - pad_y // 2), (pad_x // 2, pad_x - pad_x // 2)),
                    constant_values=-1024.0)
    volume.setflags(write=False)
    return volume, (spacing_lps[2], spacing_lps[1], spacing_lps[0])


def load_host(name: str = "ct_head") -> tuple[np.ndarray, tuple[float, float, float]]:
    """Load a host CT as ``volume_hu[z, y, x]`` (LPS, square in-plane) and its spacing.

    Args:
        name: a key of :data:`HOSTS`.

    Returns:
        A writable float32 copy of the volume and ``(dz, dy, dx)`` in mm.

    Raises:
        KeyError: unknown host name.
        tooling.sample_data.SampleUnavailable: the registry could not deliver the CT.
    """
    if name not in HOSTS:
        raise KeyError(f"unknown phantom host {name!r}; choose one of {sorted(HOSTS)}")
    volume, spacing = _load_host_cached(name)
    return volume.copy(), spacing


def _augment_host(volume_hu: np.ndarray, spacing_mm: Sequence[float],
                  rng: np.random.Generator) -> np.ndarray:
    """Rotate (+-8 deg), scale (0.93-1.07), shift (+-5 mm) and maybe mirror every axial slice."""
    angle = math.radians(rng.uniform(-8.0, 8.0))
    scale = rng.uniform(0.93, 1.07)
    mirror = rng.random() < 0.5
    shift_mm = rng.uniform(-5.0, 5.0, size=2)
    cos, sin = math.cos(angle), math.sin(angle)
    # output (y, x) -> input (y, x): input = A @ (output - centre) + centre - shift
    inverse = np.array([[cos, -sin], [sin, cos]]) / scale
    if mirror:
        inverse = inverse @ np.diag([1.0, -1.0])
    centre = (np.array(volume_hu.shape[1:]) - 1) / 2.0
    shift_px = shift_mm / np.asarray(spacing_mm[1:])
    matrix = np.eye(3)
    matrix[1:, 1:] = inverse
    offset = np.zeros(3)
    offset[1:] = centre - inverse @ centre - shift_px
    augmented = ndimage.affine_transform(volume_hu, matrix, offset=offset, order=1, cval=-1024.0,
                                         mode="constant")
    return augmented.astype(np.float32)


# --------------------------------------------------------------------------- anatomy rules


def neck_slice_range(volume_hu: np.ndarray, spacing_mm: Sequence[float], host: str) -> tuple[int, int]:
    """Return the first and last slice (inclusive) where lesions may be placed in a host.

    The product's neck band (:func:`models.anatomy.analyse_neck`), without slices holding
    dental metal or lung (see the module docstring). The band is used even where it is too
    short for the product to call the series a neck CT (``neck_chest_ct`` starts at the thoracic
    inlet): phantoms there train the network on the lower neck.

    Args:
        volume_hu: ``[z, y, x]`` in HU (LPS).
        spacing_mm: ``(dz, dy, dx)``.
        host: a key of :data:`HOSTS` (named in the error).

    Raises:
        ValueError: no slice passes the rules.
    """
    neck = anatomy.analyse_neck(volume_hu, spacing_mm)
    good = [z for z in neck.band_slices()
            if neck.landmarks[z].metal_mm2 <= 100.0 and neck.landmarks[z].lung_mm2 <= 1500.0]
    if not good:
        raise ValueError(f"host {host!r}: no neck slice passes the anatomy rules ({neck.reason or 'no band'})")
    return min(good), max(good)


_OFFSET_RANGES = {
    "parapharyngeal": ((0.0, 8.0), (15.0, 22.0)),
    "peritonsillar": ((-8.0, -2.0), (9.0, 15.0)),
    "carotid": ((5.0, 15.0), (22.0, 32.0)),
    "submandibular": ((0.2, 0.35), (25.0, 38.0)),
    "retropharyngeal": ((0.0, 0.0), (-3.0, 3.0)),
}
"""Ranges the phantom offsets are drawn from (see :func:`models.anatomy.space_centre`)."""


def _space_centre(space: str, side: int, marks: anatomy.SliceLandmarks, spacing_yx: np.ndarray,
                  rng: np.random.Generator) -> np.ndarray:
    """Proposed lesion centre (y, x) in pixels for a deep neck space (rules in module docstring)."""
    if space not in _OFFSET_RANGES:
        raise ValueError(f"unknown deep neck space {space!r}; choose one of {SPACES}")
    (low_a, high_a), (low_b, high_b) = _OFFSET_RANGES[space]
    offsets = (rng.uniform(low_a, high_a), rng.uniform(low_b, high_b))
    centre = anatomy.space_centre(space, side or 1, marks, spacing_yx, offsets)
    if centre is None:
        raise ValueError(f"slice {marks.z} lacks the landmarks of the {space} space")
    return centre


def _snap_to_soft_tissue(slice_hu: np.ndarray, allowed: np.ndarray, proposal: np.ndarray,
                         spacing_yx: np.ndarray, radius_mm: float, reach_mm: float = 12.0) -> np.ndarray:
    """Move a proposed centre (<= ``reach_mm``) to where the most soft tissue surrounds it."""
    soft = ((slice_hu > -100.0) & (slice_hu < 120.0) & allowed).astype(np.float32)
    sigma = np.maximum(0.5 * radius_mm / spacing_yx, 1.0)
    density = ndimage.gaussian_filter(soft, sigma)
    yy, xx = np.indices(slice_hu.shape)
    distance_mm = np.hypot((yy - proposal[0]) * spacing_yx[0], (xx - proposal[1]) * spacing_yx[1])
    score = np.where((distance_mm <= reach_mm) & allowed, density - 0.01 * distance_mm, -np.inf)
    if not np.isfinite(score).any():
        return proposal
    return np.array(np.unravel_index(int(np.argmax(score)), score.shape), dtype=float)


# --------------------------------------------------------------------------- lesion rendering


def _smooth_noise(shape: Sequence[int], sigma_vox: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox)
    return field / max(float(field.std()), 1e-6)


def _longest_axial_diameter(mask: np.ndarray, spacing_yx: Sequence[float]) -> float:
    """Largest in-plane distance (mm) between two voxel centres of the lesion over all slices."""
    best = 0.0
    for z in np.nonzero(mask.any(axis=(1, 2)))[0]:
        points = np.argwhere(mask[z]) * np.asarray(spacing_yx)
        if len(points) < 2:
            continue
        if len(points) > 3:
            try:
                points = points[ConvexHull(points).vertices]
            except QhullError:
                pass
        best = max(best, float(pdist(points).max()))
    return best


def _insert_lesion(volume_hu: np.ndarray, labels: np.ndarray, core_mask: np.ndarray,
                   spacing_mm: np.ndarray, neck: tuple[int, int], host: str, space: str,
                   rng: np.random.Generator) -> dict[str, Any]:
    """Render one abscess into ``volume_hu`` in place; label it in ``labels``, mark ``core_mask``."""
    mask = labels > 0
    spec = HOSTS[host]
    side = int(rng.choice([-1, 1])) if space != "retropharyngeal" else 0
    shape_kind = "multiloculated" if rng.random() < 0.45 else "irregular"
    loculi = int(rng.integers(2, 5)) if shape_kind == "multiloculated" else 1
    radius_yx_mm = rng.uniform(7.0, 17.0, size=2)
    radius_z_mm = rng.uniform(6.0, 15.0)
    if loculi > 1:
        radius_yx_mm *= 0.75
        radius_z_mm *= 0.8

    first, last = neck
    middle = (first + last) // 2
    z_margin = int(math.ceil(0.5 * radius_z_mm / spacing_mm[0]))
    if space in spec.upper_spaces:
        z_low, z_high = middle, last
    elif space in spec.lower_spaces:
        z_low, z_high = first, middle
    else:
        z_low, z_high = first, last
    z_low, z_high = z_low + z_margin, max(z_high - z_margin, z_low + z_margin)
    z_centre = int(rng.integers(z_low, z_high + 1))
    z_centre = int(np.clip(z_centre, 0, volume_hu.shape[0] - 1))

    spacing_yx = spacing_mm[1:]
    slice_hu = volume_hu[z_centre]
    marks = anatomy.slice_landmarks(slice_hu, spacing_yx, z_centre)
    if marks.kind == "outside":
        raise ValueError(f"slice {z_centre} has no body")
    inner_body = ndimage.binary_erosion(anatomy.body_mask(slice_hu), iterations=max(1, int(round(3.0 / spacing_yx[0]))))
    allowed = inner_body & (slice_hu > -400.0) & (slice_hu < 300.0)
    proposal = _space_centre(space, side, marks, spacing_yx, rng)
    # the retropharyngeal space is a thin midline slab: its lesions may move only a little
    reach_mm = 4.0 if space == "retropharyngeal" else 12.0
    centre_yx = _snap_to_soft_tissue(slice_hu, allowed, proposal, spacing_yx, float(radius_yx_mm.mean()), reach_mm)
    centre = np.array([z_centre, *centre_yx])

    # Local crop around the lesion (voxels), big enough for all lobes plus margins.
    extent_mm = np.array([radius_z_mm, *radius_yx_mm]) * (1.9 if loculi > 1 else 1.5) + 8.0
    half = np.ceil(extent_mm / spacing_mm).astype(int)
    low = np.maximum(centre.astype(int) - half, 0)
    high = np.minimum(centre.astype(int) + half + 1, volume_hu.shape)
    crop = tuple(slice(a, b) for a, b in zip(low, high))
    host_crop = volume_hu[crop].copy()
    grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(low, high)], indexing="ij"), axis=-1)
    offset_mm = (grid - centre) * spacing_mm  # [z, y, x, 3]

    # Lobes: one (irregular) or 2-4 merged ellipsoids (multiloculated), noise-perturbed.
    noise_sigma = np.maximum(3.0 / spacing_mm, 0.5)
    lobe_distances = []
    for lobe in range(loculi):
        radii = np.array([radius_z_mm, *radius_yx_mm]) * (1.0 if lobe == 0 else rng.uniform(0.55, 0.85))
        lobe_centre = np.zeros(3)
        if lobe > 0:
            direction = rng.standard_normal(3) * np.array([0.5, 1.0, 1.0])
            direction /= np.linalg.norm(direction)
            lobe_centre = direction * np.array([radius_z_mm, *radius_yx_mm]) * rng.uniform(0.6, 0.9)
        normalised = np.linalg.norm((offset_mm - lobe_centre) / radii, axis=-1)
        amplitude = rng.uniform(0.12, 0.28)
        lobe_distances.append(normalised + amplitude * _smooth_noise(normalised.shape, noise_sigma, rng))
    lobe_distances = np.stack(lobe_distances)
    lesion = lobe_distances.min(axis=0) < 1.0

    # Soft tissue only: no bone, no air, not the outer 3 mm of the body.
    body_inner = np.zeros_like(lesion)
    for k, z in enumerate(range(low[0], high[0])):
        body_slice = anatomy.body_mask(volume_hu[z])[crop[1], crop[2]]
        body_inner[k] = ndimage.binary_erosion(body_slice, iterations=max(1, int(round(3.0 / spacing_yx[0]))))
    forbidden = ndimage.binary_dilation((host_crop > 300.0) | (host_crop < -400.0))
    lesion &= body_inner & ~forbidden & ~mask[crop]
    components, count = ndimage.label(lesion)
    if count == 0:
        raise ValueError("no room for the lesion")
    sizes = ndimage.sum_labels(np.ones_like(components), components, index=np.arange(1, count + 1))
    lesion = components == (int(np.argmax(sizes)) + 1)
    if lesion.sum() * np.prod(spacing_mm) < 300.0:  # under 0.3 mL: placement failed
        raise ValueError("lesion too small after clipping to soft tissue")
    lobe_label = np.argmin(lobe_distances, axis=0)
    surviving_loculi = sum(int((lesion & (lobe_label == k)).sum() * np.prod(spacing_mm) > 150.0)
                           for k in range(loculi))
    loculi = max(surviving_loculi, 1)

    # Mild mass effect: push the surrounding tissue outward by up to ~2 mm.
    push_mm = rng.uniform(0.0, 2.0)
    if push_mm > 0.2:
        distance = np.linalg.norm(offset_mm, axis=-1)
        reach = float(np.mean(radius_yx_mm))
        magnitude = push_mm * np.exp(-np.maximum(distance - reach, 0.0) / reach)
        unit = offset_mm / np.maximum(distance, 1e-3)[..., None]
        source = grid - (unit * magnitude[..., None]) / spacing_mm - low
        host_crop = ndimage.map_coordinates(host_crop, np.moveaxis(source, -1, 0), order=1, mode="nearest")

    # Intensities: heterogeneous 0-45 HU core, enhancing rim and septa, stranding outside.
    core_hu = rng.uniform(8.0, 35.0)
    rim_hu = rng.uniform(80.0, 150.0)
    rim_mm = rng.uniform(1.5, 3.5)
    inside_mm = ndimage.distance_transform_edt(lesion, sampling=spacing_mm)
    outside_mm = ndimage.distance_transform_edt(~lesion, sampling=spacing_mm)
    texture = _smooth_noise(lesion.shape, np.maximum(1.0 / spacing_mm, 0.5), rng)
    core = np.clip(core_hu + 6.0 * texture, 0.0, 45.0)
    rim = rim_hu + 10.0 * _smooth_noise(lesion.shape, np.maximum(1.5 / spacing_mm, 0.5), rng)
    to_core = np.clip((inside_mm - rim_mm) / 1.0, 0.0, 1.0)
    lesion_hu = rim * (1.0 - to_core) + core * to_core
    septum = np.zeros_like(lesion)
    if loculi > 1:
        boundary = ndimage.maximum_filter(lobe_label, size=(1, 3, 3)) != ndimage.minimum_filter(lobe_label, size=(1, 3, 3))
        septum = boundary & lesion & (inside_mm > rim_mm)
        lesion_hu = np.where(septum, rim_hu - rng.uniform(10.0, 40.0), lesion_hu)
    fat = (host_crop > -150.0) & (host_crop < -30.0) & ~lesion
    stranding = rng.uniform(20.0, 60.0) * np.exp(-outside_mm / 2.0) * fat
    host_crop = host_crop + stranding

    alpha = ndimage.gaussian_filter(lesion.astype(np.float32), np.maximum(0.6 / spacing_mm, 0.3))
    alpha = np.where(lesion, np.maximum(alpha, 0.5), np.minimum(alpha, 0.49))
    noise = ndimage.gaussian_filter(rng.standard_normal(lesion.shape).astype(np.float32), 0.6)
    noise *= rng.uniform(5.0, 9.0) / max(float(noise.std()), 1e-6)
    lesion_hu = lesion_hu + noise
    pure_core = lesion & (inside_mm >= rim_mm + 1.5) & ~ndimage.binary_dilation(septum)
    pure_core &= alpha > 0.999
    lesion_hu = np.where(pure_core, np.clip(lesion_hu, 0.0, 45.0), lesion_hu)
    blended = alpha * lesion_hu + (1.0 - alpha) * host_crop
    blended = np.where(pure_core, lesion_hu, blended)

    volume_hu[crop] = blended.astype(np.float32)
    labels[crop][lesion] = int(labels.max()) + 1
    core_mask[crop] |= pure_core
    full_mask = np.zeros(mask.shape, bool)
    full_mask[crop] = lesion
    centre_of_mass = ndimage.center_of_mass(full_mask)
    return {
        "space": space,
        "side": {-1: "right", 0: "midline", 1: "left"}[side],
        "volume_ml": round(float(lesion.sum() * np.prod(spacing_mm) / 1000.0), 3),
        "loculi": int(loculi),
        "longest_axial_diameter_mm": round(_longest_axial_diameter(full_mask, spacing_yx), 2),
        "center_zyx": [round(float(c), 2) for c in centre_of_mass],
        "shape": "multiloculated" if loculi > 1 else "irregular",
        "core_hu": round(float(core_hu), 1),
        "rim_hu": round(float(rim_hu), 1),
        "rim_mm": round(float(rim_mm), 2),
    }


def make_case(seed: int, host: str = "ct_head", n_lesions: int = 1,
              spaces: Sequence[str] | None = None, augment: bool = True,
              case_id: str | None = None) -> PhantomCase:
    """Make one synthetic patient: an augmented real host CT with ``n_lesions`` abscesses.

    The result depends only on the arguments (``seed`` drives every random choice).

    Args:
        seed: random seed of this case.
        host: a key of :data:`HOSTS` (``"ct_head"`` or ``"neck_chest_ct"``).
        n_lesions: number of abscesses (0 gives a lesion-free control case).
        spaces: deep neck spaces to draw from (default: all spaces plausible in the host).
        augment: apply the random in-plane rotation/scale/shift/mirror to the host.
        case_id: identifier to store (default ``phantom-<host>-<seed>``).

    Returns:
        The :class:`PhantomCase`.

    Raises:
        ValueError: an unknown space, or no placement found after 20 attempts per lesion.
    """
    spec = HOSTS[host]
    choices = tuple(spaces) if spaces is not None else spec.spaces
    unknown = sorted(set(choices) - set(SPACES))
    if unknown:
        raise ValueError(f"unknown deep neck space(s) {unknown}; choose from {SPACES}")
    rng = np.random.default_rng(seed)
    volume_hu, spacing = load_host(host)
    spacing_mm = np.asarray(spacing, dtype=float)
    if augment:
        volume_hu = _augment_host(volume_hu, spacing, rng)
    neck = neck_slice_range(volume_hu, spacing, host)
    labels = np.zeros(volume_hu.shape, np.uint8)
    core_mask = np.zeros(volume_hu.shape, bool)
    lesions = []
    for _ in range(n_lesions):
        for _attempt in range(20):
            space = str(rng.choice(choices))
            try:
                lesions.append(_insert_lesion(volume_hu, labels, core_mask, spacing_mm, neck, host,
                                              space, rng))
                break
            except ValueError:
                continue
        else:
            raise ValueError(f"case seed {seed}: could not place a lesion in host {host!r}")
    return PhantomCase(volume_hu=volume_hu, mask=labels > 0, labels=labels, core_mask=core_mask,
                       spacing_mm=tuple(float(s) for s in spacing_mm), lesions=lesions,
                       case_id=case_id or f"phantom-{host}-{seed}", host=host, seed=seed,
                       neck_slices=neck)


# --------------------------------------------------------------------------- dataset writing


def hu_to_png16(slice_hu: np.ndarray) -> np.ndarray:
    """Encode HU as uint16 with ``value = HU + HU_OFFSET`` (clipped to the uint16 range)."""
    return np.clip(np.rint(slice_hu + HU_OFFSET), 0, 65535).astype(np.uint16)


def png16_to_hu(values: np.ndarray) -> np.ndarray:
    """Decode :func:`hu_to_png16` values back to float32 HU."""
    return values.astype(np.float32) - HU_OFFSET


def _resize_slice(slice_values: np.ndarray, size: int, order: int) -> np.ndarray:
    if slice_values.shape == (size, size):
        return slice_values
    factors = (size / slice_values.shape[0], size / slice_values.shape[1])
    return ndimage.zoom(slice_values, factors, order=order, mode="nearest", grid_mode=True)


def _slice_lesions(case: PhantomCase, z: int) -> list[dict[str, Any]]:
    """Lesions of ``case`` present in slice ``z``."""
    return [case.lesions[label - 1] for label in np.unique(case.labels[z]) if label > 0]


def write_dataset(out_dir: Path | str, cases: int, seed: int, hosts: Sequence[str] = ("ct_head",),
                  test_fraction: float = 0.2, slice_margin: int = 3, size: int | None = None,
                  outside_slices: int = 0, progress: bool = True) -> dict[str, Any]:
    """Write a phantom dataset in the AbscessHeNe layout.

    Layout: ``train_images/ train_masks/ test_images/ test_masks/`` (PNG, the host's square
    matrix, or ``size`` x ``size``),
    ``abscesshene_train.csv``, ``abscesshene_test.csv`` (columns :data:`CSV_COLUMNS`) and
    ``dataset.json``. Images are 16-bit PNGs holding ``HU + 1024`` (see :func:`png16_to_hu`);
    masks are 8-bit PNGs, 0 (background) or 255 (abscess). Whole cases go to the test split
    (the last ``round(cases * test_fraction)`` cases, at least one when ``cases >= 2``).
    Slices written per case: the neck band plus ``slice_margin`` slices either side, so some
    slices have no lesion, and ``outside_slices`` drawn from the rest of the host (skull base,
    chest), abscess-free, so that the network learns what lies outside the neck.

    Args:
        out_dir: output directory (created).
        cases: number of synthetic patients.
        seed: dataset seed; case ``i`` uses seed ``seed * 1000 + i``.
        hosts: host CTs, used in turn.
        test_fraction: fraction of cases held out.
        slice_margin: slices written beyond the neck band on each side.
        size: PNG side in pixels; None keeps the host's grid (no resampling).
        outside_slices: abscess-free slices per case from outside the neck band.
        progress: show a tqdm progress bar.

    Returns:
        The content written to ``dataset.json``.
    """
    from tqdm import tqdm

    out = Path(out_dir)
    for folder in ("train_images", "train_masks", "test_images", "test_masks"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    n_test = min(max(int(round(cases * test_fraction)), 1 if cases >= 2 else 0), cases)
    rows: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    case_records = []
    spacings = set()
    for index in tqdm(range(cases), desc="phantom cases", disable=not progress):
        host = hosts[index % len(hosts)]
        case_seed = seed * 1000 + index
        case = make_case(case_seed, host=host, case_id=f"case{index:03d}")
        split = "test" if index >= cases - n_test else "train"
        first, last = case.neck_slices
        z_range = range(max(first - slice_margin, 0), min(last + slice_margin, case.volume_hu.shape[0] - 1) + 1)
        others = sorted(set(range(case.volume_hu.shape[0])) - set(z_range))
        chosen = np.random.default_rng(case_seed).choice(others, size=min(outside_slices, len(others)), replace=False)
        side = size or case.volume_hu.shape[1]
        pixel_spacing = round(case.spacing_mm[1] * case.volume_hu.shape[1] / side, 5)
        spacings.add(pixel_spacing)
        for z in sorted([*z_range, *(int(z) for z in chosen)]):
            name = f"{case.case_id}_{z:03d}.png"
            image = hu_to_png16(_resize_slice(case.volume_hu[z], side, order=1))
            mask = _resize_slice(case.mask[z].astype(np.float32), side, order=1) >= 0.5
            Image.fromarray(image).save(out / f"{split}_images" / name)
            Image.fromarray((mask * 255).astype(np.uint8)).save(out / f"{split}_masks" / name)
            present = _slice_lesions(case, z)
            rows[split].append({
                "image": name, "mask": name, "case_id": case.case_id, "slice_index": z,
                "has_lesion": int(bool(mask.any())),
                "deep_neck_space": ";".join(lesion["space"] for lesion in present),
                "side": ";".join(lesion["side"] for lesion in present),
                "volume_ml": ";".join(str(lesion["volume_ml"]) for lesion in present),
                "loculi": ";".join(str(lesion["loculi"]) for lesion in present),
                "longest_axial_diameter_mm": ";".join(str(lesion["longest_axial_diameter_mm"]) for lesion in present),
                "pixel_spacing_mm": pixel_spacing,
                "slice_thickness_mm": case.spacing_mm[0],
                "host": host,
            })
        case_records.append({"case_id": case.case_id, "split": split, "seed": case_seed, "host": host,
                             "slices": [z_range.start, z_range.stop - 1], "lesions": case.lesions})
    for split, split_rows in rows.items():
        with open(out / f"abscesshene_{split}.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            writer.writerows(split_rows)
    description = {
        "name": "AbscessHeNe-phantom",
        "description": ("synthetic neck abscesses inserted into real head-and-neck CT "
                        "(tooling.phantoms); for tests and demo weights, not for clinical use"),
        "synthetic": True,
        "layout": "AbscessHeNe",
        "image_size": [size, size] if size else "host grid (see pixel_spacing_mm per slice)",
        "image_encoding": {"format": "png", "bit_depth": 16, "unit": "HU", "hu_offset": HU_OFFSET,
                           "decode": "HU = value - hu_offset"},
        "mask_encoding": {"format": "png", "bit_depth": 8, "background": 0, "abscess": 255},
        "orientation": "axial, row 0 anterior, column 0 patient right (LPS)",
        "pixel_spacing_mm": spacings.pop() if len(spacings) == 1 else None,
        "csv_columns": list(CSV_COLUMNS),
        "numTraining": len(rows["train"]),
        "numTest": len(rows["test"]),
        "training": [{"image": f"train_images/{r['image']}", "label": f"train_masks/{r['mask']}"}
                     for r in rows["train"]],
        "test": [{"image": f"test_images/{r['image']}", "label": f"test_masks/{r['mask']}"}
                 for r in rows["test"]],
        "cases": case_records,
        "generator": {"module": "tooling.phantoms", "seed": seed, "cases": cases, "hosts": list(hosts)},
    }
    (out / "dataset.json").write_text(json.dumps(description, indent=1))
    return description


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m tooling.phantoms --out DIR --cases N --seed S``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--cases", type=int, default=10, help="number of synthetic patients")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed")
    parser.add_argument("--hosts", nargs="+", default=["ct_head"], choices=sorted(HOSTS),
                        help="host CTs used in turn")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="fraction of cases held out")
    parser.add_argument("--size", type=int, help="PNG side in pixels (default: the host's grid)")
    parser.add_argument("--outside-slices", type=int, default=0,
                        help="abscess-free slices per case from outside the neck band")
    args = parser.parse_args(argv)
    description = write_dataset(args.out, args.cases, args.seed, hosts=args.hosts,
                                test_fraction=args.test_fraction, size=args.size,
                                outside_slices=args.outside_slices)
    print(f"wrote {description['numTraining']} training and {description['numTest']} test slices "
          f"from {args.cases} cases to {args.out}")


if __name__ == "__main__":
    main()

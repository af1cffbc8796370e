"""The retrieval-evaluation cohort: model outputs and ground truth for :mod:`tooling.retrieval_eval`.

This module is the model-running half of the retrieval evaluation. It builds two sets of
studies, runs the :class:`~models.segmenter.Segmenter` on them and writes everything the
index side needs into one ``.npz`` file; :mod:`tooling.retrieval_eval` reads that file with plain
numpy and never runs a model (package boundary: ``index`` must not run models).

Abscess studies ("phantom" studies)
    ``cases`` synthetic patients from :func:`tooling.phantoms.make_case`: real head-and-neck CT
    (``ct_head``, ``neck_chest_ct`` and ``aorta_ct`` in turn) with 1 or 2 inserted abscesses (2 with
    probability 1/3) of known deep neck space, volume and loculi. Case ``i`` uses seed
    ``PHANTOM_SEED_BASE + 1000 * seed + i`` (far from the seeds of the demo training set).
    In-plane, volumes larger than ``max_size`` pixels are resampled down to ``max_size``
    (the network sees ``input_size`` anyway); every slice of the case volume is kept.

Organ studies
    ``organ_copies`` augmented copies of each organ-labelled real CT of DATA.md:
    ``neck_chest_ct`` (TotalSegmentator-v2 structures: thyroid, trachea, oesophagus, carotids,
    vertebrae, ...; the scan reaches from the lower neck to the upper abdomen) and ``abdomen_ct`` (its TotalSegmentator mask lies on the top 30 slices:
    only those slices are used). A copy is a random in-plane rotation (+-10 deg), scale
    (0.9-1.1) and shift (+-8 mm) of the volume and its labels, and a random contiguous
    crop of 70-100 % of the slices (copy 0 keeps all slices), so copies differ in coverage.
    Fine TotalSegmentator labels are merged into coarse organs (:func:`coarse_organ`,
    e.g. all lung lobes -> ``lung``, both carotids -> ``common_carotid_artery``), as in the
    coarse classes of Khun Jush et al. (Table 1).

Embeddings
    ``slice`` and ``roi`` embeddings are :meth:`Segmenter.run`'s (ROI = pooled over the
    predicted mask; what the node indexes). For queries with a user-given region the file
    also holds *region-pooled* embeddings (:func:`region_embeddings`): the same deepest
    encoder features pooled over a given mask with :func:`models.segmenter.roi_pool`, the
    "ROI embedding selector" of Lee & Kim: over the ground-truth lesion mask (abscess ROI
    queries) and over each organ's mask (organ ROI queries).

File layout (``np.savez_compressed``; ``<i>`` is the study's position, ``<j>`` a lesion label)::

    manifest                       0-d str: JSON (settings, segmenter info, studies; see build_cohort)
    phantom_<i>_slice              float32 [n, D]   slice embeddings
    phantom_<i>_roi                float32 [n, D]   ROI embeddings (zero rows: no kept lesion on the slice)
    phantom_<i>_pred_mask          bool [n, H, W]   predicted abscess mask as the node keeps it (probability
                                                    > 0.5, then the plausibility rules of models.plausibility);
                                                    its lesions' spaces and sides (models.anatomy) are in the
                                                    manifest record's ``predicted_locations``
    phantom_<i>_pred_hu            int16 [m]        HU of the predicted-mask voxels (C order)
    phantom_<i>_gt_labels          uint8 [n, H, W]  0 background, j = voxels of lesion j
    phantom_<i>_lesion_<j>_roi     float32 [s, D]   lesion-mask-pooled embeddings of its slices
    phantom_<i>_lesion_<j>_slices  int64 [s]        those slices
    organ_<i>_slice                float32 [n, D]
    organ_<i>_roi_<organ>          float32 [s, D]   organ-mask-pooled embeddings
    organ_<i>_roi_<organ>_slices   int64 [s]

CLI: ``python -m tooling.cohort --weights PATH --out cohort.npz [--cases N] [--seed S]``.
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from dicom_node.config import NodeConfig
from index.lesions import measure_lesions
from models.anatomy import analyse_neck
from models.plausibility import filter_candidates
from tooling.phantoms import HOSTS, make_case
from models.preprocessing import to_model_grid, window_hu
from models.segmenter import MASK_THRESHOLD, Segmenter, roi_pool

__all__ = [
    "COHORT_FORMAT_VERSION",
    "LOCULI_CLASSES",
    "ORGAN_SOURCES",
    "PHANTOM_SEED_BASE",
    "SIZE_CLASSES_ML",
    "build_cohort",
    "coarse_organ",
    "loculi_class",
    "main",
    "region_embeddings",
    "size_class",
    "tiny_random_segmenter",
]

COHORT_FORMAT_VERSION = 1
PHANTOM_SEED_BASE = 500_000
"""Phantom seeds start here (the demo training set uses seeds ``1000 * seed + i``)."""
SIZE_CLASSES_ML = (3.0, 6.0)
"""Volume thresholds (ml) of the size classes: small < 3 <= medium < 6 <= large (about the
tertiles of the phantom generator's lesion volumes)."""
LOCULI_CLASSES = ("unilocular", "multiloculated")
ORGAN_SOURCES: dict[str, dict[str, Any]] = {
    "neck_chest": {"ct": "neck_chest_ct", "labels": "neck_chest_labels", "label_slice_offset": 0},
    # DATA.md: example_seg.nii.gz lies on the top-30-slice grid of example_ct.nii.gz (z + 82).
    "abdomen": {"ct": "abdomen_ct", "labels": "abdomen_labels", "label_slice_offset": 82},
}
"""Organ-labelled real CT (tooling.sample_data names) and where their labels lie."""
MIN_ORGAN_PIXELS = 12
"""A slice shows an organ when at least this many of its pixels carry the organ's label."""
_COARSE_PREFIXES = (
    ("lung_", "lung"),
    ("vertebrae_", "vertebrae"),
    ("rib_", "rib"),
    ("kidney_cyst", None),
    ("kidney_", "kidney"),
    ("common_carotid_artery", "common_carotid_artery"),
    ("subclavian_artery", "subclavian_artery"),
    ("brachiocephalic_vein", "brachiocephalic_vein"),
    ("adrenal_gland", "adrenal_gland"),
    ("autochthon", "autochthon"),
    ("iliopsoas", "iliopsoas"),
    ("clavicula", "clavicula"),
    ("scapula", "scapula"),
    ("humerus", "humerus"),
)


def size_class(volume_ml: float) -> str:
    """Size class of a lesion volume: ``small``, ``medium`` or ``large`` (:data:`SIZE_CLASSES_ML`)."""
    low, high = SIZE_CLASSES_ML
    return "small" if volume_ml < low else "medium" if volume_ml < high else "large"


def loculi_class(loculi: int) -> str:
    """``unilocular`` (1 loculus) or ``multiloculated`` (2 or more)."""
    return LOCULI_CLASSES[int(loculi) >= 2]


def coarse_organ(structure: str) -> str | None:
    """Coarse organ class of a TotalSegmentator-v2 structure name (None: not evaluated).

    Left/right and numbered parts are merged (``lung_upper_lobe_left`` -> ``lung``,
    ``vertebrae_C5`` -> ``vertebrae``, ``rib_left_3`` -> ``rib``); other names stay as they are.
    """
    for prefix, coarse in _COARSE_PREFIXES:
        if structure.startswith(prefix):
            return coarse
    return structure


def tiny_random_segmenter(seed: int = 0, input_size: int = 64) -> Segmenter:
    """A randomly initialised tiny VM-UNet (tests and development only: meaningless numbers).

    Args:
        seed: torch seed of the initialisation.
        input_size: network input side.
    """
    from models.vmunet import VMUNet
    from models.weights import make_meta

    torch.manual_seed(seed)
    model = VMUNet(dims=16, depths=[1, 1], depths_decoder=[1, 1], d_state=4)
    meta = make_meta(
        "vmunet-tiny-random", "0", demo=True, description="random initialisation (no training)", input_size=input_size
    )
    return Segmenter.from_model(model, meta, device="cpu")


def region_embeddings(
    segmenter: Segmenter, slices_hu: np.ndarray, regions: Mapping[str, np.ndarray],
    pixel_spacing_mm: tuple[float, float] | None, batch_size: int = 8,
) -> dict[str, np.ndarray]:
    """Deepest-encoder features pooled over given masks (one forward pass for all masks).

    The same features and pooling as the ROI embeddings of :meth:`Segmenter.run`, but over a
    mask the caller gives (a drawn lesion, an organ) instead of the predicted one.

    Args:
        segmenter: The segmenter.
        slices_hu: float32 [n, H, W] in HU.
        regions: name -> bool [n, H, W] mask on the same grid.
        pixel_spacing_mm: ``(row, column)`` spacing of the slices (as for :meth:`Segmenter.run`).
        batch_size: Slices per forward pass.

    Returns:
        name -> float32 [n, D] L2-normalised embeddings (zero rows where the mask is empty).
    """
    slices_hu = np.asarray(slices_hu, dtype=np.float32)
    count = slices_hu.shape[0]
    dim = segmenter.model.dims[-1]
    out = {name: np.zeros((count, dim), dtype=np.float32) for name in regions}
    if not regions:
        return out
    with torch.inference_mode():
        for start in range(0, count, batch_size):
            stop = min(start + batch_size, count)
            wanted = {name: mask[start:stop] for name, mask in regions.items() if mask[start:stop].any()}
            if not wanted:
                continue
            images = window_hu(slices_hu[start:stop], segmenter.window).to(segmenter.device)
            grid = (segmenter.input_size, segmenter.input_spacing_mm)
            _, features = segmenter.model.forward_with_features(to_model_grid(images, pixel_spacing_mm, *grid))
            for name, mask in wanted.items():
                weights = torch.from_numpy(mask.astype(np.float32)).to(segmenter.device)[:, None]
                # any network pixel the mask touches counts (a thin lesion must not vanish on a coarser grid)
                on_grid = to_model_grid(weights, pixel_spacing_mm, *grid)[:, 0]
                out[name][start:stop] = roi_pool(features, on_grid, threshold=0.0).cpu().numpy()
    return out


# ----------------------------------------------------------------------------------- phantoms


def _downsample(volume: np.ndarray, factor: float, order: int) -> np.ndarray:
    """Resample every axial slice by ``factor`` (< 1 shrinks)."""
    if factor == 1.0:
        return volume
    return ndimage.zoom(volume, (1.0, factor, factor), order=order, mode="nearest", grid_mode=True)


def _lesion_labels(case: Any) -> np.ndarray:
    """uint8 volume: j = voxels of ``case.lesions[j - 1]`` (nearest lesion centre when not given)."""
    labels = getattr(case, "labels", None)
    if labels is not None:
        return np.asarray(labels, dtype=np.uint8)
    labels = np.zeros(case.mask.shape, dtype=np.uint8)
    points = np.argwhere(case.mask)
    if len(points) == 0 or not case.lesions:
        return labels
    centres = np.asarray([lesion["center_zyx"] for lesion in case.lesions], dtype=float)
    spacing = np.asarray(case.spacing_mm, dtype=float)
    distances = np.linalg.norm((points[:, None, :] - centres[None]) * spacing, axis=2)
    labels[tuple(points.T)] = distances.argmin(axis=1) + 1
    return labels


def _phantom_study(
    segmenter: Segmenter, index: int, case_seed: int, host: str, n_lesions: int, max_size: int
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    case = make_case(case_seed, host=host, n_lesions=n_lesions, case_id=f"phantom-{index:03d}")
    volume = case.volume_hu
    labels = _lesion_labels(case)
    spacing = list(case.spacing_mm)
    factor = min(1.0, max_size / volume.shape[1])
    if factor < 1.0:
        volume = _downsample(volume, factor, order=1).astype(np.float32)
        # Labels: resample each lesion's mask (linear, >= 0.5) so thin parts survive like the image.
        resampled = np.zeros(volume.shape, dtype=np.uint8)
        for label in range(1, len(case.lesions) + 1):
            part = _downsample((labels == label).astype(np.float32), factor, order=1) >= 0.5
            resampled[part] = label
        labels = resampled
        spacing = [
            spacing[0],
            spacing[1] * case.volume_hu.shape[1] / volume.shape[1],
            spacing[2] * case.volume_hu.shape[2] / volume.shape[2],
        ]
    output = segmenter.run(volume, pixel_spacing_mm=(spacing[1], spacing[2]))
    # what the node keeps and indexes: the plausible lesions, located in their deep neck space
    anatomy = analyse_neck(volume, spacing)
    predicted = filter_candidates(output.probabilities > MASK_THRESHOLD, volume, spacing, anatomy).kept
    locations = [anatomy.locate(lesion.centroid_zyx) for lesion in measure_lesions(predicted, volume, spacing)]
    lesion_masks = {str(label): labels == label for label in range(1, len(case.lesions) + 1)}
    pooled = region_embeddings(segmenter, volume, lesion_masks, (spacing[1], spacing[2]))
    study_uid = f"2.25.{PHANTOM_SEED_BASE}{index:05d}{case_seed % 100000:05d}"
    arrays = {
        f"phantom_{index}_slice": output.slice_embeddings,
        f"phantom_{index}_roi": np.where(predicted.any(axis=(1, 2))[:, None], output.roi_embeddings, 0.0).astype(np.float32),
        f"phantom_{index}_pred_mask": predicted,
        f"phantom_{index}_pred_hu": np.rint(volume[predicted]).astype(np.int16),
        f"phantom_{index}_gt_labels": labels,
    }
    lesions = []
    for label, lesion in enumerate(case.lesions, start=1):
        slices = np.flatnonzero(lesion_masks[str(label)].any(axis=(1, 2)))
        arrays[f"phantom_{index}_lesion_{label}_roi"] = pooled[str(label)][slices]
        arrays[f"phantom_{index}_lesion_{label}_slices"] = slices.astype(np.int64)
        lesions.append(
            {
                "label": label,
                "space": lesion["space"],
                "side": lesion.get("side"),
                "volume_ml": float(lesion["volume_ml"]),
                "loculi": int(lesion["loculi"]),
                "longest_axial_diameter_mm": float(lesion["longest_axial_diameter_mm"]),
                "size_class": size_class(float(lesion["volume_ml"])),
                "loculi_class": loculi_class(int(lesion["loculi"])),
                "slices": slices.tolist(),
            }
        )
    record = {
        "index": index,
        "study_uid": study_uid,
        "case_id": case.case_id,
        "host": host,
        "seed": case_seed,
        "spacing_mm": [float(s) for s in spacing],
        "shape": list(volume.shape),
        "lesions": lesions,
        "predicted_locations": [[location.space, location.side] for location in locations],
        "predicted_voxels": int(predicted.sum()),
    }
    return record, arrays


# ------------------------------------------------------------------------------------- organs


def _to_zyx_lps(data: np.ndarray, affine: np.ndarray, zooms: Sequence[float]) -> tuple[np.ndarray, list[float]]:
    """Reorient a NIfTI array to LPS and return it as ``[z, y, x]`` with ``(dz, dy, dx)``."""
    current = nib.orientations.io_orientation(affine)
    transform = nib.orientations.ornt_transform(current, nib.orientations.axcodes2ornt(("L", "P", "S")))
    oriented = nib.orientations.apply_orientation(data, transform)
    spacing = [0.0, 0.0, 0.0]
    for input_axis, (output_axis, _) in enumerate(transform):
        spacing[int(output_axis)] = float(zooms[input_axis])
    return np.ascontiguousarray(oriented.transpose(2, 1, 0)), [spacing[2], spacing[1], spacing[0]]


def _structure_names(source: str, fetch: Callable[[str], Path]) -> dict[int, str]:
    """Label id -> TotalSegmentator structure name for the labels of an organ source.

    ``neck_chest``: the ``structures.csv`` shipped with the mask (``neck_chest_structures``).
    ``abdomen``: the ``"total"`` class map of the TotalSegmentator release whose test files
    hold the mask, read (as data, with :func:`ast.literal_eval`) from that release's
    ``totalsegmentator/map_to_binary.py``. The two maps differ (the csv has an extra
    ``carpal`` row at 117), so each mask is read with its own.
    """
    if source == "neck_chest":
        with open(fetch("neck_chest_structures"), newline="") as handle:
            return {int(row["id"]): row["structure"] for row in csv.DictReader(handle)}
    labels_path = Path(fetch(ORGAN_SOURCES[source]["labels"]))
    package_root = next(p for p in labels_path.parents if (p / "totalsegmentator" / "map_to_binary.py").is_file())
    tree = ast.parse((package_root / "totalsegmentator" / "map_to_binary.py").read_text())
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Dict)
            and any(isinstance(target, ast.Name) and target.id == "class_map" for target in node.targets)
        ):
            for key, value in zip(node.value.keys, node.value.values):
                if isinstance(key, ast.Constant) and key.value == "total":
                    return {int(k): str(v) for k, v in ast.literal_eval(value).items()}
    raise ValueError(f"no 'total' class map in {package_root}/totalsegmentator/map_to_binary.py")


def load_labelled_ct(
    source: str, fetch: Callable[[str], Path] | None = None
) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """An organ-labelled real CT of DATA.md as ``[z, y, x]`` LPS arrays, square in-plane.

    Args:
        source: a key of :data:`ORGAN_SOURCES`.
        fetch: sample fetcher (default :func:`tooling.sample_data.fetch`).

    Returns:
        (volume_hu float32, labels uint8 TotalSegmentator-v2 ids, spacing (dz, dy, dx) mm);
        only the slices that have labels.
    """
    if fetch is None:
        from tooling.sample_data import fetch
    spec = ORGAN_SOURCES[source]
    image, label_image = nib.load(fetch(spec["ct"])), nib.load(fetch(spec["labels"]))
    ct = np.asarray(image.dataobj, dtype=np.float32)
    labels = np.asarray(label_image.dataobj).astype(np.uint8)
    offset = int(spec["label_slice_offset"])
    ct = ct[:, :, offset : offset + labels.shape[2]]
    if ct.shape != labels.shape:
        raise ValueError(f"{source}: CT {ct.shape} and labels {labels.shape} do not share a grid")
    zooms = image.header.get_zooms()[:3]
    volume, spacing = _to_zyx_lps(ct, image.affine, zooms)
    labels, _ = _to_zyx_lps(labels, image.affine, zooms)
    volume = np.maximum(volume, -1024.0)
    side = max(volume.shape[1:])
    pads = [(0, 0)] + [((side - n) // 2, side - n - (side - n) // 2) for n in volume.shape[1:]]
    return (np.pad(volume, pads, constant_values=-1024.0), np.pad(labels, pads, constant_values=0), spacing)


def _augment_pair(
    volume: np.ndarray,
    labels: np.ndarray,
    spacing: Sequence[float],
    size: int,
    rng: np.random.Generator,
    identity: bool,
) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Random in-plane rotation/scale/shift to a ``size`` x ``size`` grid; labels by nearest neighbour."""
    angle = 0.0 if identity else math.radians(rng.uniform(-10.0, 10.0))
    scale = 1.0 if identity else rng.uniform(0.9, 1.1)
    shift_mm = np.zeros(2) if identity else rng.uniform(-8.0, 8.0, size=2)
    source = volume.shape[1]
    zoom = size / source  # output pixels per input pixel
    cos, sin = math.cos(angle), math.sin(angle)
    inverse = np.array([[cos, -sin], [sin, cos]]) / (scale * zoom)
    centre_in = (np.array(volume.shape[1:]) - 1) / 2.0
    centre_out = (np.array([size, size]) - 1) / 2.0
    matrix = np.eye(3)
    matrix[1:, 1:] = inverse
    offset = np.zeros(3)
    offset[1:] = centre_in - inverse @ centre_out - shift_mm / np.asarray(spacing[1:])
    shape = (volume.shape[0], size, size)
    moved = ndimage.affine_transform(
        volume, matrix, offset=offset, output_shape=shape, order=1, cval=-1024.0, mode="constant"
    ).astype(np.float32)
    moved_labels = ndimage.affine_transform(
        labels, matrix, offset=offset, output_shape=shape, order=0, cval=0, mode="constant"
    )
    new_spacing = [float(spacing[0]), float(spacing[1]) / zoom, float(spacing[2]) / zoom]
    return moved, moved_labels, new_spacing


def _organ_study(
    segmenter: Segmenter,
    index: int,
    source: str,
    copy: int,
    volume: np.ndarray,
    labels: np.ndarray,
    spacing: Sequence[float],
    names: Mapping[int, str],
    size: int,
    rng: np.random.Generator,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    n = volume.shape[0]
    keep = n if copy == 0 else max(3, round(n * rng.uniform(0.7, 1.0)))
    start = 0 if copy == 0 else int(rng.integers(0, n - keep + 1))
    volume, labels, new_spacing = _augment_pair(
        volume[start : start + keep],
        labels[start : start + keep],
        spacing,
        min(size, volume.shape[1]),
        rng,
        identity=copy == 0,
    )
    coarse_ids: dict[str, list[int]] = {}
    for label_id in np.unique(labels):
        organ = coarse_organ(names.get(int(label_id), "")) if label_id else None
        if organ:
            coarse_ids.setdefault(organ, []).append(int(label_id))
    masks = {organ: np.isin(labels, ids) for organ, ids in sorted(coarse_ids.items())}
    organ_slices = {}
    for organ, mask in masks.items():
        present = np.flatnonzero(mask.sum(axis=(1, 2)) >= MIN_ORGAN_PIXELS)
        if present.size:
            organ_slices[organ] = present.tolist()
    masks = {
        organ: masks[organ] & (masks[organ].sum(axis=(1, 2)) >= MIN_ORGAN_PIXELS)[:, None, None]
        for organ in organ_slices
    }
    output = segmenter.run(volume, pixel_spacing_mm=(new_spacing[1], new_spacing[2]))
    pooled = region_embeddings(segmenter, volume, masks, (new_spacing[1], new_spacing[2]))
    arrays = {f"organ_{index}_slice": output.slice_embeddings}
    for organ, slices in organ_slices.items():
        arrays[f"organ_{index}_roi_{organ}"] = pooled[organ][slices]
        arrays[f"organ_{index}_roi_{organ}_slices"] = np.asarray(slices, dtype=np.int64)
    record = {
        "index": index,
        "study_uid": f"2.25.{PHANTOM_SEED_BASE + 1}{index:05d}",
        "source": source,
        "copy": copy,
        "source_slices": [start, start + keep - 1],
        "spacing_mm": new_spacing,
        "shape": list(volume.shape),
        "organ_slices": organ_slices,
    }
    return record, arrays


# ------------------------------------------------------------------------------------ cohort


def build_cohort(
    segmenter: Segmenter,
    out: str | Path,
    cases: int = 24,
    seed: int = 0,
    organ_copies: int = 3,
    max_size: int = 256,
    organ_sources: Sequence[str] = tuple(ORGAN_SOURCES),
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Build the evaluation cohort, run the segmenter on it and write the ``.npz`` file.

    Args:
        segmenter: The segmenter whose embeddings are evaluated.
        out: Output ``.npz`` path.
        cases: Number of abscess phantom studies (the hosts of :data:`tooling.phantoms.HOSTS` in turn).
        seed: Cohort seed (phantom seeds and organ augmentations derive from it).
        organ_copies: Augmented copies per organ-labelled CT (0: no organ studies).
        max_size: In-plane side above which volumes are resampled down.
        organ_sources: Which keys of :data:`ORGAN_SOURCES` to use.
        progress: Called with a line of text after each study (None: silent).

    Returns:
        The manifest written into the file: ``format_version``, ``settings``, ``segmenter``
        (:attr:`Segmenter.info`), ``phantoms`` and ``organs`` (one record per study),
        ``seconds``.
    """
    started = time.perf_counter()
    say = progress or (lambda line: None)
    rng = np.random.default_rng([seed, 4242])
    hosts = tuple(HOSTS)
    arrays: dict[str, np.ndarray] = {}
    phantoms = []
    for index in range(cases):
        case_seed = PHANTOM_SEED_BASE + 1000 * seed + index
        n_lesions = 2 if rng.random() < 1.0 / 3.0 else 1
        try:
            record, study_arrays = _phantom_study(segmenter, index, case_seed, hosts[index % len(hosts)], n_lesions,
                                                 max_size)
        except ValueError:  # no placement for a second lesion: fall back to one
            record, study_arrays = _phantom_study(segmenter, index, case_seed, hosts[index % len(hosts)], 1, max_size)
        phantoms.append(record)
        arrays.update(study_arrays)
        say(
            f"phantom {index + 1}/{cases}: {record['host']}, "
            + ", ".join(f"{les['space']} {les['volume_ml']:.1f} ml x{les['loculi']}" for les in record["lesions"])
            + f", {record['predicted_voxels']} predicted voxels"
        )
    organs = []
    if organ_copies > 0 and organ_sources:
        from tooling.sample_data import fetch

        for source in organ_sources:
            names = _structure_names(source, fetch)
            volume, labels, spacing = load_labelled_ct(source, fetch)
            for copy in range(organ_copies):
                record, study_arrays = _organ_study(
                    segmenter, len(organs), source, copy, volume, labels, spacing, names, max_size, rng
                )
                organs.append(record)
                arrays.update(study_arrays)
                say(
                    f"organ study {len(organs)}: {source} copy {copy}, slices {record['source_slices']}, "
                    f"{len(record['organ_slices'])} organs"
                )
    manifest = {
        "format_version": COHORT_FORMAT_VERSION,
        "settings": {
            "cases": cases,
            "seed": seed,
            "organ_copies": organ_copies,
            "max_size": max_size,
            "organ_sources": list(organ_sources),
            "size_classes_ml": list(SIZE_CLASSES_ML),
            "phantom_seed_base": PHANTOM_SEED_BASE,
            "min_organ_pixels": MIN_ORGAN_PIXELS,
        },
        "segmenter": segmenter.info.as_dict(),
        "phantoms": phantoms,
        "organs": organs,
        "seconds": round(time.perf_counter() - started, 1),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(out.name + ".tmp.npz")
    np.savez_compressed(temporary, manifest=np.asarray(json.dumps(manifest)), **arrays)
    temporary.replace(out)
    return manifest


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m tooling.cohort --weights PATH --out cohort.npz``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, help="segmenter checkpoint (default: the demo weights)")
    parser.add_argument("--tiny-random", action="store_true", help="use a random tiny network (development only)")
    parser.add_argument("--out", type=Path, required=True, help="output .npz")
    parser.add_argument("--cases", type=int, default=24, help="abscess phantom studies")
    parser.add_argument("--seed", type=int, default=0, help="cohort seed")
    parser.add_argument("--organ-copies", type=int, default=3, help="augmented copies per organ-labelled CT")
    parser.add_argument("--max-size", type=int, default=256, help="in-plane side above which volumes shrink")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="'cpu', 'cuda' or 'auto'")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        segmenter = load_segmenter(args.weights, tiny_random=args.tiny_random, device=args.device)
    except FileNotFoundError as error:
        parser.error(str(error))
    manifest = build_cohort(
        segmenter,
        args.out,
        cases=args.cases,
        seed=args.seed,
        organ_copies=args.organ_copies,
        max_size=args.max_size,
        progress=lambda line: print(line, file=sys.stderr),
    )
    print(
        f"wrote {len(manifest['phantoms'])} abscess and {len(manifest['organs'])} organ studies to {args.out} "
        f"in {manifest['seconds']} s"
    )


DEMO_WEIGHTS = NodeConfig().weights_path
"""The shipped default weights (demo weights: synthetic training data; not for clinical use)."""


def load_segmenter(weights: str | Path | None = None, *, tiny_random: bool = False, device: str = "cpu") -> Segmenter:
    """The segmenter to evaluate: a checkpoint, the demo weights, or a tiny random network.

    Raises:
        FileNotFoundError: No ``weights`` given and the demo weights are not there.
    """
    if tiny_random:
        return tiny_random_segmenter()
    path = Path(weights) if weights is not None else DEMO_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(
            f"segmenter weights {path} not found; pass --weights PATH (or --tiny-random "
            "for a meaningless development run)"
        )
    return Segmenter.load(path, device=device)


if __name__ == "__main__":
    main()

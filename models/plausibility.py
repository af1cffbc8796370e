"""Lesion plausibility: which of the network's abscess candidates a radiologist should see.

The network marks pixels; a candidate is one 3D connected component (26-connectivity) of its
thresholded mask. Each candidate passes the rules below in order, and the first rule it fails
rejects it with that rule's reason (so every rejected candidate is counted once, under one
rule). What remains is the abscess mask the SEG holds and the measurement SR reports.

=========================  ============================================================================
rule                       a candidate is rejected when
=========================  ============================================================================
``neck_soft_tissue``       less than :attr:`PlausibilityRules.min_soft_tissue_fraction` of its voxels
                           lie in the neck band's soft tissue (:meth:`models.anatomy.NeckAnatomy.soft_tissue`:
                           inside the body, 3 mm from the skin, not bone, not air, between the skull
                           base and the thoracic inlet). Kept candidates are clipped to that tissue.
``min_volume``             its volume (after clipping) is under :attr:`PlausibilityRules.min_volume_ml`.
``core_attenuation``       its core attenuation lies outside :attr:`PlausibilityRules.core_hu_range`:
                           an abscess core is fluid, 0-45 HU in AbscessHeNe (Dao et al.), widened
                           for noise and partial volume; bone, enhancing vessels and fat fall outside.
                           The core is the inner half of the candidate (voxels at least half its
                           largest depth from its surface, in mm); its attenuation is the 25th
                           percentile of their HU, the fluid part, so septa and a thick enhancing
                           rim of a small abscess do not hide it (on 36 phantom abscesses in three
                           hosts: 35 within -10..55 HU).
``rim_enhancement``        only when enabled and the series is contrast-enhanced: the mean HU of its
                           2 mm outer shell is not at least :attr:`PlausibilityRules.min_rim_enhancement_hu`
                           above its core attenuation (an abscess has an enhancing rim).
=========================  ============================================================================
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from scipy import ndimage

from models.anatomy import NeckAnatomy
from models.lesion_rules import PlausibilityRules

__all__ = ["RULES", "CandidateVerdict", "PlausibilityResult", "PlausibilityRules", "filter_candidates"]

RULES = ("neck_soft_tissue", "min_volume", "core_attenuation", "rim_enhancement")
"""The rules, in the order they are applied."""
_CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)
_SHELL_MM = 2.0


@dataclasses.dataclass(frozen=True)
class CandidateVerdict:
    """One candidate and what the rules said.

    Attributes:
        volume_ml: volume after clipping to soft tissue.
        core_hu: its core attenuation (None when it was rejected before it was measured).
        first_slice / last_slice: its slice range.
        rule: the rule that rejected it, None when kept.
        reason: that rule's reason in words (empty when kept).
    """

    volume_ml: float
    core_hu: float | None
    first_slice: int
    last_slice: int
    rule: str | None
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class PlausibilityResult:
    """The kept and rejected parts of a mask, and the verdict on every candidate.

    Attributes:
        kept: bool ``[n, H, W]``, the plausible abscesses (clipped to neck soft tissue).
        rejected: bool ``[n, H, W]``, the raw mask of the rejected candidates.
        verdicts: one :class:`CandidateVerdict` per candidate, largest first.
    """

    kept: np.ndarray
    rejected: np.ndarray
    verdicts: list[CandidateVerdict]

    def removed_by_rule(self) -> dict[str, int]:
        """How many candidates each rule removed (every rule listed, 0 included)."""
        counts = {rule: 0 for rule in RULES}
        for verdict in self.verdicts:
            if verdict.rule is not None:
                counts[verdict.rule] += 1
        return counts

    def summary(self) -> dict[str, Any]:
        """JSON-ready counts for the job record."""
        return {"candidates": len(self.verdicts), "kept": sum(v.rule is None for v in self.verdicts),
                "removed_by_rule": self.removed_by_rule(),
                "rejected": [v.as_dict() for v in self.verdicts if v.rule is not None][:20]}


def _shell_and_core(component: np.ndarray, spacing: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """The 2 mm outer shell and the inner half (depth >= half the largest depth) of a candidate."""
    depth = ndimage.distance_transform_edt(np.pad(component, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    depth = np.where(component, depth - 0.5 * min(spacing), 0.0)
    core = component & (depth >= 0.5 * depth.max())
    shell = component & (depth <= _SHELL_MM)
    return shell, core


def filter_candidates(mask: np.ndarray, volume_hu: np.ndarray, spacing_mm: tuple[float, float, float],
                      anatomy: NeckAnatomy, rules: PlausibilityRules = PlausibilityRules(),
                      contrast: bool = False) -> PlausibilityResult:
    """Apply the plausibility rules to every candidate of a thresholded mask.

    Args:
        mask: bool ``[n, H, W]`` from the network.
        volume_hu: the series in HU, same grid (read per candidate; a memory map is fine).
        spacing_mm: ``(dz, dy, dx)``.
        anatomy: the series' :class:`~models.anatomy.NeckAnatomy`.
        rules: the thresholds.
        contrast: the series is contrast-enhanced (the rim rule applies only then).

    Returns:
        The :class:`PlausibilityResult`.
    """
    mask = np.asarray(mask, dtype=bool)
    spacing = tuple(float(v) for v in spacing_mm)
    voxel_ml = spacing[0] * spacing[1] * spacing[2] / 1000.0
    kept = np.zeros(mask.shape, bool)
    rejected = np.zeros(mask.shape, bool)
    verdicts: list[CandidateVerdict] = []
    if not mask.any():
        return PlausibilityResult(kept, rejected, verdicts)
    labels, _ = ndimage.label(mask, structure=_CONNECTIVITY_26)
    tissue_cache: dict[int, np.ndarray] = {}

    def tissue(z: int) -> np.ndarray:
        if z not in tissue_cache:
            tissue_cache[z] = anatomy.soft_tissue(z, np.asarray(volume_hu[z], dtype=np.float32))
        return tissue_cache[z]

    low, high = rules.core_hu_range
    for label, box in enumerate(ndimage.find_objects(labels), start=1):
        component = labels[box] == label
        allowed = np.stack([tissue(z)[box[1], box[2]] for z in range(box[0].start, box[0].stop)])
        inside = component & allowed
        slices = (int(box[0].start), int(box[0].stop - 1))
        fraction = inside.sum() / component.sum()
        volume_ml = float(inside.sum() * voxel_ml)

        def reject(rule: str, reason: str, core_hu: float | None = None) -> None:
            rejected[box] |= component
            verdicts.append(CandidateVerdict(round(float(component.sum() * voxel_ml), 3), core_hu, *slices, rule, reason))

        if fraction < rules.min_soft_tissue_fraction:
            in_band = any(anatomy.in_band(z) for z in range(slices[0], slices[1] + 1))
            where = "in bone, air or outside the body" if in_band else "outside the neck band (skull base to thoracic inlet)"
            reject("neck_soft_tissue", f"{100 * (1 - fraction):.0f} % of it lies {where}")
            continue
        if volume_ml < rules.min_volume_ml:
            reject("min_volume", f"{volume_ml:.2f} mL, under {rules.min_volume_ml} mL")
            continue
        hu = np.asarray(volume_hu[box], dtype=np.float32)
        shell, core = _shell_and_core(inside, spacing)
        core_hu = float(np.percentile(hu[core], 25))
        if not low <= core_hu <= high:
            reject("core_attenuation", f"core {core_hu:.0f} HU, outside [{low:g}, {high:g}] HU (not fluid)", core_hu)
            continue
        if rules.rim_enhancement and contrast and shell.any():
            rim_hu = float(hu[shell].mean())
            if rim_hu - core_hu < rules.min_rim_enhancement_hu:
                reject("rim_enhancement", f"rim {rim_hu:.0f} HU is not {rules.min_rim_enhancement_hu:g} HU "
                                          f"above the core ({core_hu:.0f} HU)", core_hu)
                continue
        kept[box] |= inside
        verdicts.append(CandidateVerdict(round(volume_ml, 3), round(core_hu, 1), *slices, None))
    order = sorted(range(len(verdicts)), key=lambda i: -verdicts[i].volume_ml)
    return PlausibilityResult(kept, rejected, [verdicts[i] for i in order])

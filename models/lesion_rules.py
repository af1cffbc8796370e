"""The thresholds of the lesion plausibility rules (:mod:`models.plausibility`).

A module of its own without numpy, so that the node's configuration (read inside Orthanc's
interpreter, which loads no heavy library) can hold them.
"""

from __future__ import annotations

import dataclasses

__all__ = ["PlausibilityRules"]


@dataclasses.dataclass(frozen=True)
class PlausibilityRules:
    """Thresholds of the rules (see the module docstring); the node's ``LesionRules`` key.

    Attributes:
        core_hu_range: ``(low, high)`` HU of a plausible (fluid) core.
        min_volume_ml: smallest plausible abscess (1 mL: a 12 mm sphere; smaller deep neck
            collections are rarely called abscesses or drained, and no phantom abscess is smaller:
            1.2 to 15 mL over 30 phantoms in three hosts).
        min_soft_tissue_fraction: share of a candidate's voxels that must be neck soft tissue.
        rim_enhancement: apply the rim rule (on contrast-enhanced series only).
        min_rim_enhancement_hu: how much brighter than the core the rim must be.
    """

    core_hu_range: tuple[float, float] = (-10.0, 55.0)
    min_volume_ml: float = 1.0
    min_soft_tissue_fraction: float = 0.5
    rim_enhancement: bool = False
    min_rim_enhancement_hu: float = 10.0

    def __post_init__(self) -> None:
        low, high = self.core_hu_range
        if not low < high:
            raise ValueError(f"core_hu_range must be (low, high) with low < high, got {self.core_hu_range}")
        if self.min_volume_ml < 0 or not 0.0 <= self.min_soft_tissue_fraction <= 1.0:
            raise ValueError("min_volume_ml must be >= 0 and min_soft_tissue_fraction in [0, 1]")

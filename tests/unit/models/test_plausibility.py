"""Lesion plausibility rules and deep-neck-space location on real CT with inserted phantom abscesses."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from models.anatomy import SPACES, analyse_neck
from models.lesion_rules import PlausibilityRules
from models.plausibility import RULES, filter_candidates
from tooling.phantoms import make_case


@pytest.fixture(scope="module")
def demo_case():
    """The demo's phantom: ct_head with one right parapharyngeal abscess, not augmented."""
    case = make_case(11, host="ct_head", augment=False)
    return case, analyse_neck(case.volume_hu, case.spacing_mm)


def _ball(shape, centre, radius_px) -> np.ndarray:
    zz, yy, xx = np.indices(shape, sparse=True)
    return (zz - centre[0]) ** 2 + ((yy - centre[1]) ** 2 + (xx - centre[2]) ** 2) / 4.0 <= radius_px**2


def test_the_inserted_abscess_is_kept_and_located(demo_case) -> None:
    case, anatomy = demo_case
    result = filter_candidates(case.mask, case.volume_hu, case.spacing_mm, anatomy)
    assert [v.rule for v in result.verdicts] == [None]
    assert result.kept.sum() >= 0.95 * case.mask.sum() and not result.rejected.any()
    assert -10 <= result.verdicts[0].core_hu <= 55
    location = anatomy.locate(ndimage.center_of_mass(case.mask))
    assert (location.space, location.side) == ("parapharyngeal", "right")


def test_each_rule_removes_what_it_should_and_says_why(demo_case) -> None:
    case, anatomy = demo_case
    volume = case.volume_hu.copy()
    spine = anatomy.landmarks[10].spine_centre_yx
    marks = anatomy.landmarks[20]
    candidates = {
        # inside the skull (posterior fossa, slice 70): above the neck band
        "above the skull base": _ball(volume.shape, (70, 140, 120), 3),
        # on the vertebral body of C2-C3: bone
        "in the spine": _ball(volume.shape, (10, round(spine[0]), round(spine[1])), 2),
        # 0.05 mL of neck soft tissue
        "tiny": _ball(volume.shape, (20, round(marks.airway_centre_yx[0]) + 25, round(marks.midline_x) + 30), 0.5),
    }
    vessel = _ball(volume.shape, (25, round(marks.airway_centre_yx[0]) + 12, round(marks.midline_x) - 30), 2.5)
    volume[vessel] = 250.0  # an enhancing vessel: not fluid
    candidates["vessel"] = vessel
    mask = np.zeros(volume.shape, bool)
    for blob in candidates.values():
        mask |= blob
    result = filter_candidates(mask | case.mask, volume, case.spacing_mm, anatomy, PlausibilityRules(min_volume_ml=0.3))
    removed = result.removed_by_rule()
    assert set(removed) == set(RULES)
    assert removed == {"neck_soft_tissue": 2, "min_volume": 1, "core_attenuation": 1, "rim_enhancement": 0}
    reasons = " | ".join(v.reason for v in result.verdicts if v.rule)
    assert "outside the neck band" in reasons and "in bone, air or outside the body" in reasons
    assert "not fluid" in reasons and "under 0.3 mL" in reasons
    assert not (result.kept & candidates["vessel"]).any() and result.rejected[candidates["vessel"]].all()
    assert result.summary()["kept"] == 1


def test_rim_rule_only_on_contrast_series(demo_case) -> None:
    case, anatomy = demo_case
    volume = case.volume_hu.copy()
    volume[case.mask] = 20.0  # the same region as a fluid blob without an enhancing rim
    rules = PlausibilityRules(rim_enhancement=True)
    assert filter_candidates(case.mask, volume, case.spacing_mm, anatomy, rules, contrast=False).removed_by_rule()[
        "rim_enhancement"] == 0
    flat = filter_candidates(case.mask, volume, case.spacing_mm, anatomy, rules, contrast=True)
    assert flat.removed_by_rule()["rim_enhancement"] == 1 and "rim" in flat.verdicts[0].reason
    rimmed = filter_candidates(case.mask, case.volume_hu, case.spacing_mm, anatomy, rules, contrast=True)
    assert rimmed.removed_by_rule()["rim_enhancement"] == 0  # the phantom's rim enhances by 80-150 HU


@pytest.mark.parametrize("space", SPACES)
def test_phantoms_of_every_space_are_located_in_it(space: str) -> None:
    hits = 0
    for seed in (3, 4):
        case = make_case(seed, host="ct_head", spaces=[space])
        anatomy = analyse_neck(case.volume_hu, case.spacing_mm)
        location = anatomy.locate(ndimage.center_of_mass(case.mask))
        truth = case.lesions[0]
        hits += location.space == space
        assert location.side == truth["side"] or space == "retropharyngeal"
    assert hits >= 1, f"no {space} phantom located in its space"

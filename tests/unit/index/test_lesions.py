"""Lesion descriptors on synthetic masks whose answers are known."""

import json

import numpy as np
import pytest

from index.lesions import Lesion, label_lesions, measure_lesions


def ball(shape, centre, radius_mm, spacing=(1.0, 1.0, 1.0)):
    grid = np.indices(shape).astype(float)
    return sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, spacing)) <= radius_mm**2


def test_sphere_volume_diameter_centroid_and_slices():
    mask = ball((40, 48, 48), (20, 24, 24), 10.0)
    volume_hu = np.full(mask.shape, 25.0, dtype=np.float32)

    (lesion,) = measure_lesions(mask, volume_hu, (1.0, 1.0, 1.0), space="parapharyngeal")

    assert lesion.label == 1
    assert lesion.volume_ml == pytest.approx(4 / 3 * np.pi * 10**3 / 1000, rel=0.01)
    assert lesion.longest_axial_diameter_mm == pytest.approx(20.0)
    assert (lesion.first_slice, lesion.last_slice) == (10, 30)
    assert lesion.centroid_zyx == pytest.approx((20.0, 24.0, 24.0))
    assert lesion.loculi == 1
    assert lesion.space == "parapharyngeal"


def test_anisotropic_spacing_scales_volume_and_in_plane_diameter():
    mask = np.zeros((6, 30, 30), dtype=bool)
    mask[1:5, 5:15, 5:25] = True  # 4 slices x 10 rows x 20 columns
    spacing = (3.0, 0.5, 1.0)

    (lesion,) = measure_lesions(mask, np.zeros(mask.shape, np.float32), spacing, loculus_opening_mm=0)

    assert lesion.volume_ml == pytest.approx(4 * 10 * 20 * 3.0 * 0.5 * 1.0 / 1000)
    # Farthest pixel centres: opposite corners of the 10 x 20 rectangle.
    assert lesion.longest_axial_diameter_mm == pytest.approx(np.hypot(9 * 0.5, 19 * 1.0))


def test_core_statistics_leave_out_the_enhancing_rim():
    mask = ball((30, 40, 40), (15, 20, 20), 9.0)
    rim = mask & ~ball((30, 40, 40), (15, 20, 20), 7.0)
    rng = np.random.default_rng(1)
    volume_hu = rng.normal(20.0, 5.0, mask.shape).astype(np.float32)
    volume_hu[rim] = 150.0  # enhancing wall, 2 mm thick

    (lesion,) = measure_lesions(mask, volume_hu, (1.0, 1.0, 1.0), core_shell_mm=2.0)

    assert lesion.core_mean_hu == pytest.approx(20.0, abs=1.0)
    assert lesion.core_sd_hu == pytest.approx(5.0, abs=1.0)
    (with_rim,) = measure_lesions(mask, volume_hu, (1.0, 1.0, 1.0), core_shell_mm=0.0)
    assert with_rim.core_mean_hu > 50.0


def test_two_blobs_joined_by_a_thin_bridge_are_one_lesion_with_two_loculi():
    shape = (24, 40, 60)
    mask = ball(shape, (12, 20, 15), 7.0) | ball(shape, (12, 20, 45), 7.0)
    mask[12, 20, 15:46] = True  # one-voxel channel between the collections

    lesions = measure_lesions(mask, np.zeros(shape, np.float32), (1.0, 1.0, 1.0))

    assert len(lesions) == 1
    assert lesions[0].loculi == 2
    assert lesions[0].longest_axial_diameter_mm == pytest.approx(30 + 2 * 7)


def test_separate_blobs_are_separate_lesions_numbered_by_volume():
    shape = (30, 40, 70)
    small = ball(shape, (15, 20, 12), 5.0)
    large = ball(shape, (15, 20, 45), 9.0)
    speck = np.zeros(shape, dtype=bool)
    speck[2, 2, 2] = True  # 1 voxel = 0.001 ml, below the minimum volume

    lesions = measure_lesions(small | large | speck, np.zeros(shape, np.float32), (1.0, 1.0, 1.0))

    assert [lesion.label for lesion in lesions] == [1, 2]
    assert lesions[0].volume_ml > lesions[1].volume_ml
    assert lesions[0].centroid_zyx[2] == pytest.approx(45.0)
    assert all(lesion.loculi == 1 for lesion in lesions)
    labels, count = label_lesions(small | large | speck, (1.0, 1.0, 1.0))
    assert count == 2
    assert labels[15, 20, 45] == 1 and labels[15, 20, 12] == 2 and labels[2, 2, 2] == 0


def test_diagonal_contact_is_26_connected():
    mask = np.zeros((4, 20, 20), dtype=bool)
    mask[0:2, 0:6, 0:6] = True
    mask[2:4, 6:12, 6:12] = True  # touches the first block only at a corner

    lesions = measure_lesions(mask, np.zeros(mask.shape, np.float32), (1.0, 1.0, 1.0), min_volume_ml=0)

    assert len(lesions) == 1


def test_empty_mask_and_as_dict():
    assert measure_lesions(np.zeros((3, 8, 8), bool), np.zeros((3, 8, 8), np.float32), (1, 1, 1)) == []
    (lesion,) = measure_lesions(ball((20, 20, 20), (10, 10, 10), 6), np.zeros((20, 20, 20)), (1, 1, 1))
    record = lesion.as_dict()
    assert json.loads(json.dumps(record)) == record
    assert set(record) == set(Lesion.__dataclass_fields__)


@pytest.mark.parametrize(
    ("mask_shape", "volume_shape", "spacing", "message"),
    [
        ((3, 8, 8), (3, 8, 9), (1, 1, 1), "same"),
        ((8, 8), (8, 8), (1, 1, 1), "3D"),
        ((3, 8, 8), (3, 8, 8), (1, 0, 1), "positive"),
        ((3, 8, 8), (3, 8, 8), (1, 1), "positive"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_message(mask_shape, volume_shape, spacing, message):
    with pytest.raises(ValueError, match=message):
        measure_lesions(np.zeros(mask_shape, bool), np.zeros(volume_shape, np.float32), spacing)

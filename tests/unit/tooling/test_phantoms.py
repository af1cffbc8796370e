"""Phantom abscesses in real neck CT (tooling.phantoms): lesion model, ground truth, layout."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from tooling import phantoms
from tooling.phantoms import CSV_COLUMNS, SPACES, make_case, png16_to_hu, write_dataset

SEED = 11


@pytest.fixture(scope="module")
def case() -> phantoms.PhantomCase:
    return make_case(SEED, host="ct_head")


@pytest.fixture(scope="module")
def control() -> phantoms.PhantomCase:
    """Same seed, same augmented host, no lesion."""
    return make_case(SEED, host="ct_head", n_lesions=0)


def test_case_geometry_and_metadata(case: phantoms.PhantomCase) -> None:
    assert case.volume_hu.dtype == np.float32 and case.mask.dtype == bool
    assert case.volume_hu.shape == case.mask.shape == (95, 240, 240)
    assert case.spacing_mm == pytest.approx((2.5, 1.01, 1.01))
    (lesion,) = case.lesions
    assert lesion["space"] in SPACES and lesion["loculi"] >= 1
    voxel_ml = np.prod(case.spacing_mm) / 1000.0
    assert lesion["volume_ml"] == pytest.approx(case.mask.sum() * voxel_ml, abs=1e-3)
    assert 5.0 < lesion["longest_axial_diameter_mm"] < 80.0
    z, y, x = np.round(lesion["center_zyx"]).astype(int)
    first, last = case.neck_slices
    assert first <= z <= last  # placed in the neck band, not in the head
    body = case.volume_hu[z] > -400
    assert body[y, x]


def test_core_is_fluid_and_rim_enhances(case: phantoms.PhantomCase) -> None:
    assert case.core_mask.any() and not (case.core_mask & ~case.mask).any()
    core_hu = case.volume_hu[case.core_mask]
    assert core_hu.min() >= 0.0 and core_hu.max() <= 45.0
    outer_shell = case.mask & ~ndimage.binary_erosion(case.mask, structure=np.ones((1, 3, 3)))
    assert case.volume_hu[outer_shell].mean() > core_hu.mean() + 30.0


def test_mask_is_the_inserted_region(case: phantoms.PhantomCase, control: phantoms.PhantomCase) -> None:
    difference = np.abs(case.volume_hu - control.volume_hu)
    assert difference[case.mask].mean() > 20.0
    spacing = np.asarray(case.spacing_mm)
    distance_mm = ndimage.distance_transform_edt(~case.mask, sampling=spacing)
    assert difference[distance_mm > 45.0].max() == 0.0  # nothing changes far from the lesion
    assert not control.mask.any() and control.lesions == []


def test_deterministic_given_seed(case: phantoms.PhantomCase) -> None:
    again = make_case(SEED, host="ct_head")
    np.testing.assert_array_equal(again.volume_hu, case.volume_hu)
    np.testing.assert_array_equal(again.mask, case.mask)
    assert again.lesions == case.lesions
    other = make_case(SEED + 1, host="ct_head")
    assert not np.array_equal(other.mask, case.mask)


def test_named_space_and_second_host() -> None:
    retro = make_case(5, host="ct_head", spaces=["retropharyngeal"])
    assert retro.lesions[0]["space"] == "retropharyngeal" and retro.lesions[0]["side"] == "midline"
    chest = make_case(2, host="neck_chest_ct")
    assert chest.mask.any() and chest.spacing_mm == pytest.approx((2.5, 0.703125, 0.703125))
    two = make_case(8, host="ct_head", n_lesions=2)
    assert len(two.lesions) == 2 and set(np.unique(two.labels)) == {0, 1, 2}
    voxel_ml = np.prod(two.spacing_mm) / 1000.0
    for label, lesion in enumerate(two.lesions, start=1):
        assert lesion["volume_ml"] == pytest.approx((two.labels == label).sum() * voxel_ml, abs=1e-3)
    with pytest.raises(ValueError, match="unknown deep neck space"):
        make_case(1, spaces=["mediastinum"])


def test_dataset_layout(tmp_path) -> None:
    description = write_dataset(tmp_path, cases=2, seed=3, slice_margin=1, outside_slices=2, progress=False)
    expected = {"train_images", "train_masks", "test_images", "test_masks", "abscesshene_train.csv",
                "abscesshene_test.csv", "dataset.json"}
    assert {path.name for path in tmp_path.iterdir()} == expected
    for split in ("train", "test"):
        with open(tmp_path / f"abscesshene_{split}.csv", newline="") as handle:
            reader = csv.DictReader(handle)
            assert tuple(reader.fieldnames) == CSV_COLUMNS
            rows = list(reader)
        assert len({row["case_id"] for row in rows}) == 1  # whole cases per split
        assert sorted(path.name for path in (tmp_path / f"{split}_images").iterdir()) == sorted(r["image"] for r in rows)
        assert {row["has_lesion"] for row in rows} == {"0", "1"}  # lesion and lesion-free slices
        first, last = next(c for c in description["cases"] if c["case_id"] == rows[0]["case_id"])["slices"]
        outside = [int(row["slice_index"]) for row in rows if not first <= int(row["slice_index"]) <= last]
        assert len(outside) == 2 and all(row["has_lesion"] == "0" for row in rows
                                         if not first <= int(row["slice_index"]) <= last)
        lesion_row = next(row for row in rows if row["has_lesion"] == "1")
        assert lesion_row["deep_neck_space"] in SPACES and float(lesion_row["volume_ml"]) > 0
        with Image.open(tmp_path / f"{split}_images" / lesion_row["image"]) as image:
            assert image.size == (240, 240) and image.mode.startswith("I;16")  # the host's grid, not resampled
            assert float(lesion_row["pixel_spacing_mm"]) == pytest.approx(1.01)
            hu = png16_to_hu(np.asarray(image))
        with Image.open(tmp_path / f"{split}_masks" / lesion_row["mask"]) as mask_image:
            assert mask_image.size == (240, 240) and mask_image.mode == "L"
            mask = np.asarray(mask_image)
        assert set(np.unique(mask)) == {0, 255}
        assert -1024.0 <= hu.min() and 0.0 <= np.median(hu[mask > 0]) <= 150.0
    on_disk = json.loads((tmp_path / "dataset.json").read_text())
    assert on_disk == json.loads(json.dumps(description))
    assert on_disk["image_encoding"]["hu_offset"] == phantoms.HU_OFFSET
    assert on_disk["numTraining"] + on_disk["numTest"] == len(on_disk["training"]) + len(on_disk["test"])

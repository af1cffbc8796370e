"""Neck anatomy from HU (models.anatomy) on every real CT the project has.

Expected facts were read off the scans by eye (slice montages of each series): where the skull
base is in the head-and-neck CT, that the contrast CT of the aorta report reaches the mandible,
that the two chest CTs start at the thoracic inlet (about 20 mm above the lung apices) and that
the abdomen and brain CTs hold no neck.
"""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from models.anatomy import LPS, AxisDirections, analyse_neck, slice_landmarks
from tooling.convert import read_nifti


def _nifti(sample, name: str):
    nifti = read_nifti(sample(name))
    return nifti.volume_hu, nifti.spacing_mm


def _dicom_series(directory, top: int | None = None, pattern: str = "*.dcm"):
    """The series sorted inferior to superior (HU, spacing); ``top``: only its most superior slices."""
    paths = sorted(directory.glob(pattern),
                   key=lambda path: float(pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient[2]))
    datasets = [pydicom.dcmread(path) for path in paths[-top if top else 0:]]
    volume = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in datasets])
    step = float(datasets[1].ImagePositionPatient[2]) - float(datasets[0].ImagePositionPatient[2])
    return volume.astype(np.float32), (step, *(float(v) for v in datasets[0].PixelSpacing))


@pytest.fixture(scope="module")
def head_neck(sample):
    volume, spacing = _nifti(sample, "ct_head")
    return volume, spacing, analyse_neck(volume, spacing)


def test_head_and_neck_ct_covers_the_neck_below_the_skull_base(head_neck) -> None:
    volume, spacing, anatomy = head_neck
    assert anatomy.covers_neck and anatomy.reason == ""
    # posterior fossa from slice 38 (montage), C1-C3 and the mandible below it
    assert 34 <= anatomy.skull_base <= 42
    assert anatomy.band == (0, anatomy.skull_base - 1)
    assert anatomy.thoracic_inlet is None  # the scan stops at C3, above the lungs
    band = anatomy.landmarks[: anatomy.band[1] + 1]
    assert sum(m.airway_centre_yx is not None for m in band) >= 0.9 * len(band)
    assert sum(m.spine_centre_yx is not None for m in band) == len(band)
    assert sum(m.mandible for m in anatomy.landmarks[8:22]) >= 10  # mandibular body around slices 8-21
    assert all(m.kind == "cranial" for m in anatomy.landmarks[62:85])  # the vault


def test_landmarks_lie_where_the_anatomy_is(head_neck) -> None:
    volume, spacing, anatomy = head_neck
    marks = anatomy.landmarks[10]
    spine_y, spine_x = (int(round(v)) for v in marks.spine_centre_yx)
    airway_y, airway_x = (int(round(v)) for v in marks.airway_centre_yx)
    assert volume[10, spine_y - 2:spine_y + 3, spine_x - 2:spine_x + 3].max() > 300  # bone
    assert volume[10, airway_y, airway_x] < -400  # air
    assert airway_y < marks.spine_front_y < spine_y  # airway in front of the vertebral body
    assert abs(airway_x - spine_x) * spacing[2] < 15  # both near the midline (the head is turned a little)


@pytest.mark.parametrize("name, minimum_mm", [("aorta_ct", 25.0)])
def test_contrast_ct_reaching_the_mandible_covers_the_neck(sample, name: str, minimum_mm: float) -> None:
    volume, spacing = _nifti(sample, name)
    anatomy = analyse_neck(volume, spacing)
    assert anatomy.covers_neck, anatomy.reason
    assert anatomy.thoracic_inlet is not None and anatomy.band_height_mm() >= minimum_mm
    assert anatomy.skull_base is None  # it ends at the mandible


@pytest.mark.parametrize("name, why", [
    ("neck_chest_ct", "lung apices"),   # chest CT starting at the thoracic inlet
    ("abdomen_ct", "no neck"),           # abdomen with the lung bases
    ("head_ct", "no neck"),              # brain CT above the skull base
])
def test_series_without_a_neck_say_why(sample, name: str, why: str) -> None:
    volume, spacing = _nifti(sample, name)
    anatomy = analyse_neck(volume, spacing)
    assert not anatomy.covers_neck
    assert why in anatomy.reason


def test_chest_ct_in_dicom_has_no_neck(sample) -> None:
    volume, spacing = _dicom_series(sample("rider_lung_ct"), top=80)  # its upper 100 mm: apices and above
    anatomy = analyse_neck(volume, spacing)
    assert not anatomy.covers_neck and "lung apices" in anatomy.reason
    assert anatomy.band_height_mm() < 25.0


def test_jpeg2000_abdomen_series_has_no_neck(sample) -> None:
    volume, spacing = _dicom_series(sample("jpeg2000_ct"), pattern="CT.*")  # JPEG 2000 lossless, 20 slices
    anatomy = analyse_neck(volume, spacing)
    assert not anatomy.covers_neck and "no neck" in anatomy.reason


def test_feet_first_prone_series_gives_the_same_anatomy(head_neck) -> None:
    volume, spacing, anatomy = head_neck
    flipped = volume[::-1, ::-1, ::-1]
    other = analyse_neck(flipped, spacing, AxisDirections(z_superior=False, y_posterior=False, x_left=False))
    assert other.band == anatomy.band and other.skull_base == anatomy.skull_base
    assert sorted(other.band_slices()) == sorted(volume.shape[0] - 1 - z for z in anatomy.band_slices())
    # a point right of the airway stays on the patient's right
    marks = anatomy.landmarks[10]
    y, x = marks.airway_centre_yx[0], marks.airway_centre_yx[1] - 20.0 / spacing[2]
    assert anatomy.locate((10, y, x)).side == "right"
    shape = volume.shape
    assert other.locate((shape[0] - 1 - 10, shape[1] - 1 - y, shape[2] - 1 - x)).side == "right"


def test_soft_tissue_excludes_bone_air_and_skin(head_neck) -> None:
    volume, spacing, anatomy = head_neck
    allowed = anatomy.soft_tissue(10, volume[10])
    assert allowed.any()
    assert (volume[10][allowed] > -400).all() and (volume[10][allowed] < 300).all()
    assert not anatomy.soft_tissue(70, volume[70]).any()  # inside the skull: not the neck band
    assert anatomy.soft_tissue(70, volume[70], band_only=False).any()


def test_empty_slice_is_outside() -> None:
    marks = slice_landmarks(np.full((64, 64), -1000.0, np.float32), (1.0, 1.0))
    assert marks.kind == "outside" and marks.spine_centre_yx is None
    air = analyse_neck(np.full((5, 32, 32), -1000.0, np.float32), (2.0, 1.0, 1.0), LPS)
    assert not air.covers_neck and "no body" in air.reason

"""Volume loading, series selection, NIfTI conversion and the SEG writer, on real CT."""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pytest

from dicom_node.config import SeriesRules
from dicom_node.seg import build_segmentation
from dicom_node.series import InputError, SeriesCandidate, read_geometry, read_hu, select_series
from models.weights import AlgorithmInfo
from tooling.convert import nifti_to_ct_series, volume_to_ct_series, write_series
from tooling.dciodvfy import assert_valid

ALGORITHM = AlgorithmInfo(name="vmunet-test", version="1", demo=True,
                          description="demo weights, trained on synthetic lesions in real CT, not for clinical use")


@pytest.fixture(scope="module")
def head_series(tmp_path_factory, sample) -> tuple[list, list[Path]]:
    datasets = nifti_to_ct_series(sample("ct_head"), uid_seed="unit-head")
    directory = tmp_path_factory.mktemp("head")
    return datasets, write_series(datasets, directory)


def test_nifti_geometry_becomes_real_dicom_geometry(head_series, sample):
    datasets, paths = head_series
    image = nib.load(sample("ct_head"))
    assert len(datasets) == image.shape[2]
    # voxel (i, j, k) of the NIfTI (RAS) must sit at the DICOM position of row j', column i' of slice k
    affine = image.affine
    ds = datasets[10]
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    row_dir = np.array([float(v) for v in ds.ImageOrientationPatient[:3]])
    col_dir = np.array([float(v) for v in ds.ImageOrientationPatient[3:]])
    dy, dx = (float(v) for v in ds.PixelSpacing)
    r, c = 37, 51
    lps = ipp + c * dx * row_dir + r * dy * col_dir
    ras = lps * np.array([-1, -1, 1])
    voxel = np.linalg.inv(affine) @ np.append(ras, 1)
    hu_dicom = float(ds.pixel_array[r, c]) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    hu_nifti = float(np.asarray(image.dataobj)[tuple(np.rint(voxel[:3]).astype(int))])
    assert np.allclose(voxel[:3], np.rint(voxel[:3]), atol=1e-3)
    assert hu_dicom == pytest.approx(round(hu_nifti), abs=1)
    assert_valid(paths[0])


def test_geometry_sorts_by_position_and_reads_hu(head_series):
    datasets, paths = head_series
    shuffled = list(reversed(paths))
    geometry = read_geometry(shuffled)
    assert [h.SOPInstanceUID for h in geometry.headers] == [d.SOPInstanceUID for d in datasets]
    assert geometry.spacing_mm == pytest.approx((2.5, 1.01, 1.01))
    assert geometry.warnings == []
    chunk = read_hu(geometry, 40, 44)
    assert chunk.shape == (4, 240, 190) and chunk.dtype == np.float32
    assert -1100 < chunk.min() < -900 and chunk.max() > 300  # air and bone of a real head


def test_duplicates_uneven_spacing_and_tilt_are_reported(tmp_path):
    volume = np.zeros((12, 16, 16), np.float32)
    datasets = volume_to_ct_series(volume, (2.0, 1.0, 1.0), uid_seed="geom")
    datasets[6].ImagePositionPatient = [0.0, 0.0, 13.0]  # uneven: 10 -> 13 -> 14
    duplicate = volume_to_ct_series(volume, (2.0, 1.0, 1.0), uid_seed="geom-dup")[3]
    duplicate.SeriesInstanceUID, duplicate.FrameOfReferenceUID = datasets[0].SeriesInstanceUID, datasets[0].FrameOfReferenceUID
    duplicate.InstanceNumber = 99
    geometry = read_geometry(write_series(datasets + [duplicate], tmp_path / "a"))
    assert geometry.shape[0] == 12
    assert duplicate.SOPInstanceUID in {h.SOPInstanceUID for h in geometry.headers}
    assert any("duplicate positions" in w for w in geometry.warnings)
    assert any("uneven slice spacing" in w for w in geometry.warnings)
    tilted = volume_to_ct_series(volume, (2.0, 1.0, 1.0), uid_seed="tilt")
    for index, ds in enumerate(tilted):
        ds.ImagePositionPatient = [0.0, index * 2.0 * np.tan(np.radians(12)), index * 2.0]
    assert any("gantry tilt of 12.0 deg" in w for w in read_geometry(write_series(tilted, tmp_path / "b")).warnings)


def test_missing_geometry_and_single_slice_are_input_errors(tmp_path):
    datasets = volume_to_ct_series(np.zeros((3, 8, 8), np.float32), (2.0, 1.0, 1.0), uid_seed="missing")
    del datasets[1].ImagePositionPatient
    with pytest.raises(InputError, match=r"lacks ImagePositionPatient \(0020,0032\)"):
        read_geometry(write_series(datasets, tmp_path / "a"))
    single = volume_to_ct_series(np.zeros((1, 8, 8), np.float32), (2.0, 1.0, 1.0), uid_seed="single")
    with pytest.raises(InputError, match="single slice"):
        read_geometry(write_series(single, tmp_path / "b"))
    with pytest.raises(InputError, match="MaxSlices=2"):
        read_geometry(write_series(volume_to_ct_series(np.zeros((3, 8, 8), np.float32), (2.0, 1.0, 1.0)), tmp_path / "c"), max_slices=2)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.dcm").write_bytes(b"\0" * 200)
    with pytest.raises(InputError, match="cannot be read as DICOM"):
        read_geometry([tmp_path / "d" / "x.dcm"])


def test_series_selection_explains_every_skip():
    axial = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    sagittal = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
    candidates = [
        SeriesCandidate("thin", "CT", "Neck 1mm", 300, axial, 1.0),
        SeriesCandidate("thick", "CT", "Neck 3mm", 100, axial, 3.0),
        SeriesCandidate("scout", "CT", "Topogram", 1, axial),
        SeriesCandidate("sag", "CT", "Sag MPR", 200, sagittal),
        SeriesCandidate("seg", "SEG", "Abscess SEG", 1),
    ]
    eligible, skipped = select_series(candidates, SeriesRules())
    assert [s.series_uid for s in eligible] == ["thin", "thick"]
    assert "ranks first" in skipped["thick"]
    assert "Topogram" not in skipped["scout"] and "ExcludeDescriptions" in skipped["scout"]
    assert "not axial" in skipped["sag"]
    assert "modality SEG" in skipped["seg"]
    eligible, _ = select_series(candidates, SeriesRules(prefer="thinnest", min_slices=50))
    assert eligible[0].series_uid == "thin"


@pytest.mark.parametrize("segmentation_type", ["BINARY", "FRACTIONAL"])
def test_seg_is_valid_and_pixel_exact(head_series, tmp_path, segmentation_type):
    datasets, paths = head_series
    geometry = read_geometry(paths)
    rng = np.random.default_rng(0)
    mask = np.zeros(geometry.shape, bool)
    mask[30:41, 100:140, 60:90] = True
    mask[50, 5, 7] = True  # a single pixel: catches any flip or off-by-one
    values = mask if segmentation_type == "BINARY" else np.where(mask, rng.uniform(0.5, 1.0, mask.shape), 0.0)
    seg = build_segmentation(geometry.headers, values, ALGORITHM, segmentation_type)
    path = tmp_path / "seg.dcm"
    seg.save_as(path, enforce_file_format=True)
    assert_valid(path)
    back = hd.seg.segread(io.BytesIO(path.read_bytes()))
    assert int(back.NumberOfFrames) == geometry.shape[0]
    frames = np.stack([back.get_pixels_by_source_instance([h.SOPInstanceUID], combine_segments=False,
                                                          rescale_fractional=True)[0, ..., 0]
                       for h in geometry.headers])
    if segmentation_type == "BINARY":
        assert np.array_equal(frames.astype(bool), mask)
    else:
        assert np.allclose(frames, values, atol=1 / 255 + 1e-6)
    assert back.SegmentSequence[0].SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert back.ContentCreatorName == "abscess-node^VM-UNet"
    with pytest.raises(ValueError, match="does not match"):
        build_segmentation(geometry.headers, mask[:-1], ALGORITHM)


@pytest.mark.parametrize("segmentation_type", ["BINARY", "FRACTIONAL"])
def test_seg_can_keep_the_rejected_candidates_as_a_second_segment(head_series, tmp_path, segmentation_type):
    datasets, paths = head_series
    geometry = read_geometry(paths)
    kept = np.zeros(geometry.shape, bool)
    kept[10:14, 100:120, 60:80] = True
    rejected = np.zeros(geometry.shape, bool)
    rejected[45:48, 80:90, 120:130] = True  # e.g. a candidate in the petrous bone
    values = kept if segmentation_type == "BINARY" else kept.astype(np.float32)
    seg = build_segmentation(geometry.headers, values, ALGORITHM, segmentation_type, rejected=rejected)
    path = tmp_path / "seg2.dcm"
    seg.save_as(path, enforce_file_format=True)
    assert_valid(path)
    back = hd.seg.segread(io.BytesIO(path.read_bytes()))
    assert [s.SegmentLabel for s in back.SegmentSequence] == ["Abscess", "Abscess candidate (rejected)"]
    frames = np.stack([back.get_pixels_by_source_instance([h.SOPInstanceUID], combine_segments=False,
                                                          rescale_fractional=True)[0] for h in geometry.headers])
    assert np.array_equal(frames[..., 0] > 0.5, kept) and np.array_equal(frames[..., 1] > 0.5, rejected)
    with pytest.raises(ValueError, match="rejected mask shape"):
        build_segmentation(geometry.headers, kept, ALGORITHM, rejected=rejected[:-1])

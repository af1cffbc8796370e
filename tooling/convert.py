"""Turn a CT volume (NIfTI or an array with its geometry) into a DICOM CT Image series.

Used by the demo (dicom2stl's real head-and-neck CT becomes the study a "PACS" sends) and by the
tests (phantom cases with inserted abscesses). The geometry is real: ImagePositionPatient,
ImageOrientationPatient and PixelSpacing come from the NIfTI affine converted from RAS to DICOM's
LPS patient frame, and HU are stored as unsigned 16-bit with RescaleIntercept -1024, as scanners do.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from dicom_node.identity import UID_ROOT

RESCALE_INTERCEPT = -1024.0


@dataclasses.dataclass(frozen=True)
class StudyInfo:
    """Patient and study attributes written into a converted series (no real patient data)."""

    patient_name: str = "Demo^HeadNeck"
    patient_id: str = "ABSCESS-DEMO-001"
    patient_birth_date: str = ""
    patient_sex: str = "O"
    study_description: str = "CT NECK WITH CONTRAST (sample)"
    series_description: str = "Axial soft tissue"
    accession_number: str = "DEMO0001"
    study_date: str = "20260101"
    study_time: str = "120000"
    series_number: int = 2
    study_id: str = "1"
    institution_name: str = "abscess-node sample data"


def volume_to_ct_series(volume_hu: np.ndarray, spacing_mm: Sequence[float], *, origin_lps: Sequence[float] = (0.0, 0.0, 0.0),
                        row_direction: Sequence[float] = (1.0, 0.0, 0.0), column_direction: Sequence[float] = (0.0, 1.0, 0.0),
                        info: StudyInfo = StudyInfo(), uid_seed: str | None = None,
                        study_uid: str | None = None) -> list[FileDataset]:
    """Build one CT Image Storage instance per axial slice.

    Args:
        volume_hu: float array [z, y, x] in Hounsfield units; slice z, row y, column x.
        spacing_mm: (dz, dy, dx): slice step along the normal, row spacing, column spacing.
        origin_lps: patient position (mm, LPS) of voxel (0, 0, 0).
        row_direction: unit vector (LPS) along which the column index x increases.
        column_direction: unit vector (LPS) along which the row index y increases.
        info: patient/study attributes.
        uid_seed: when given, UIDs are derived from it, so converting the same input twice gives
            the same study (a PACS re-sending the same images).
        study_uid: put the series into this existing study instead of a new one.

    Returns:
        The datasets, ordered by slice index, ready for ``save_as``.
    """
    volume_hu = np.asarray(volume_hu)
    if volume_hu.ndim != 3:
        raise ValueError(f"volume_hu must be [z, y, x], got shape {volume_hu.shape}")
    dz, dy, dx = (float(s) for s in spacing_mm)
    if min(dz, dy, dx) <= 0:
        raise ValueError(f"spacing_mm must be positive, got {spacing_mm}")
    row = np.asarray(row_direction, float)
    column = np.asarray(column_direction, float)
    row, column = row / np.linalg.norm(row), column / np.linalg.norm(column)
    if abs(float(row @ column)) > 1e-4:
        raise ValueError("row_direction and column_direction must be orthogonal")
    normal = np.cross(row, column)
    origin = np.asarray(origin_lps, float)

    def uid(tag: str) -> str:
        return generate_uid(UID_ROOT, [uid_seed, tag]) if uid_seed else generate_uid(UID_ROOT)

    study_uid = study_uid or uid("study")
    series_uid, frame_uid = uid("series"), uid("frame-of-reference")
    stored = np.clip(np.rint(volume_hu - RESCALE_INTERCEPT), 0, 65535).astype(np.uint16)
    now = dt.datetime.now()
    datasets = []
    for index in range(volume_hu.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = uid(f"instance-{index}")
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = UID_ROOT + "1"
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.InstanceCreationDate = now.strftime("%Y%m%d")
        ds.InstanceCreationTime = now.strftime("%H%M%S")
        ds.PatientName = info.patient_name
        ds.PatientID = info.patient_id
        ds.PatientBirthDate = info.patient_birth_date
        ds.PatientSex = info.patient_sex
        ds.StudyInstanceUID = study_uid
        ds.StudyDate = info.study_date
        ds.StudyTime = info.study_time
        ds.StudyID = info.study_id
        ds.AccessionNumber = info.accession_number
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = info.study_description
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = info.series_number
        ds.SeriesDescription = info.series_description
        ds.SeriesDate = info.study_date
        ds.SeriesTime = info.study_time
        ds.BodyPartExamined = "NECK"
        ds.PatientPosition = "HFS"
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.Manufacturer = "abscess-node converter"
        ds.InstitutionName = info.institution_name
        ds.InstanceNumber = index + 1
        ds.AcquisitionNumber = 1
        ds.ContentDate = info.study_date
        ds.ContentTime = info.study_time
        position = origin + index * dz * normal
        ds.ImagePositionPatient = [round(float(v), 4) for v in position]
        ds.ImageOrientationPatient = [round(float(v), 6) for v in (*row, *column)]
        ds.PixelSpacing = [round(dy, 6), round(dx, 6)]
        ds.SliceThickness = round(dz, 6)
        ds.SliceLocation = round(float(position @ normal), 4)
        ds.KVP = ""
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = int(volume_hu.shape[1]), int(volume_hu.shape[2])
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = RESCALE_INTERCEPT
        ds.RescaleSlope = 1.0
        ds.RescaleType = "HU"
        ds.WindowCenter = 50
        ds.WindowWidth = 400
        ds.PixelData = stored[index].tobytes()
        datasets.append(ds)
    return datasets


@dataclasses.dataclass
class NiftiVolume:
    """A NIfTI CT reoriented to LPS voxel axes, with what a DICOM series needs of its geometry."""

    volume_hu: np.ndarray  # float32 [z, y, x]: slices inferior->superior, rows anterior->posterior, columns right->left
    spacing_mm: tuple[float, float, float]  # (dz, dy, dx)
    origin_lps: np.ndarray
    row_direction: np.ndarray
    column_direction: np.ndarray


def read_nifti(path: Path | str) -> NiftiVolume:
    """Read a NIfTI CT (HU) and reorient it to LPS voxel axes (column index towards the patient's
    left, row index towards posterior, slices from inferior to superior), so viewers show it the
    radiological way; positions come from the affine (RAS -> LPS)."""
    import nibabel as nib

    image = nib.load(str(path))
    target = nib.orientations.axcodes2ornt(("L", "P", "S"))
    transform = nib.orientations.ornt_transform(nib.orientations.io_orientation(image.affine), target)
    data = nib.orientations.apply_orientation(np.asanyarray(image.dataobj), transform)
    affine = image.affine @ nib.orientations.inv_ornt_aff(transform, image.shape)
    ras_to_lps = np.diag([-1.0, -1.0, 1.0])
    axes = ras_to_lps @ affine[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)  # (di, dj, dk)
    return NiftiVolume(
        volume_hu=np.ascontiguousarray(np.transpose(np.asarray(data, dtype=np.float32), (2, 1, 0))),
        spacing_mm=(float(spacing[2]), float(spacing[1]), float(spacing[0])),
        origin_lps=ras_to_lps @ affine[:3, 3], row_direction=axes[:, 0] / spacing[0],
        column_direction=axes[:, 1] / spacing[1])


def nifti_to_ct_series(path: Path | str, info: StudyInfo = StudyInfo(), uid_seed: str | None = None,
                       volume_hu: np.ndarray | None = None) -> list[FileDataset]:
    """Convert a NIfTI CT (HU) into an axial DICOM series with its real geometry (see :func:`read_nifti`).

    Args:
        volume_hu: replace the voxel values (same shape as the reoriented volume), e.g. with an
            inserted synthetic lesion; the geometry stays the NIfTI's.
    """
    nifti = read_nifti(path)
    if volume_hu is not None and volume_hu.shape != nifti.volume_hu.shape:
        raise ValueError(f"volume_hu shape {volume_hu.shape} differs from the NIfTI's {nifti.volume_hu.shape}")
    return volume_to_ct_series(
        nifti.volume_hu if volume_hu is None else volume_hu, nifti.spacing_mm, origin_lps=nifti.origin_lps,
        row_direction=nifti.row_direction, column_direction=nifti.column_direction,
        info=info, uid_seed=uid_seed or Path(path).name)


def write_series(datasets: Sequence[pydicom.Dataset], directory: Path | str) -> list[Path]:
    """Write datasets as ``<InstanceNumber>.dcm`` files; returns their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = directory / f"{int(ds.InstanceNumber):05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths

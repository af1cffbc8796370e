"""Small, real-looking DICOM inputs for the SR tests: a CT series and its abscess SEG.

The CT series is built from scratch with the attributes the CT Image IOD asks for (so
``dciodvfy`` is clean on it as well) and real geometry: axial slices, 0.8 mm pixels,
2.5 mm slice spacing, HU stored with RescaleSlope 1 / RescaleIntercept -1024.
"""

from __future__ import annotations

import datetime

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

PIXEL_SPACING_MM = (0.8, 0.8)
SLICE_SPACING_MM = 2.5
RESCALE_INTERCEPT = -1024.0

ABSCESS_CODE = hd.sr.CodedConcept("44132006", "SCT", "Abscess")


def make_ct_series(
    n_slices: int = 6,
    rows: int = 64,
    columns: int = 64,
    study_uid: str | None = None,
    patient_id: str = "ANON0001",
) -> list[pydicom.Dataset]:
    """Build an axial head-and-neck CT series in memory.

    Args:
        n_slices: Number of axial slices (one instance each).
        rows: Image rows.
        columns: Image columns.
        study_uid: StudyInstanceUID to use; a new one when None.
        patient_id: PatientID of the (synthetic) patient.

    Returns:
        The slices, ordered from inferior to superior, each a complete CT Image instance.
    """
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    frame_of_reference_uid = generate_uid()
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[:rows, :columns]
    body = ((yy - rows / 2) / (rows * 0.42)) ** 2 + ((xx - columns / 2) / (columns * 0.38)) ** 2 <= 1
    slices = []
    for index in range(n_slices):
        volume_hu = np.where(body, 40.0, -1000.0) + rng.normal(0.0, 8.0, (rows, columns))
        stored = np.clip(volume_hu - RESCALE_INTERCEPT, 0, 4095).astype(np.uint16)

        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.StudyDate = "20240312"
        ds.StudyTime = "101500"
        ds.SeriesDate = ds.StudyDate
        ds.SeriesTime = "101700"
        ds.ContentDate = ds.StudyDate
        ds.ContentTime = "101705"
        ds.AcquisitionDate = ds.StudyDate
        ds.AcquisitionTime = "101702"
        ds.AccessionNumber = "ACC0001"
        ds.Modality = "CT"
        ds.Manufacturer = "Synthetic"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "CT NECK WITH CONTRAST"
        ds.SeriesDescription = "Neck soft tissue 2.5 mm"
        ds.PatientName = "Test^Abscess"
        ds.PatientID = patient_id
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.BodyPartExamined = "NECK"
        ds.SliceThickness = SLICE_SPACING_MM
        ds.KVP = 120
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 3
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = [-25.6, -25.6, -60.0 + index * SLICE_SPACING_MM]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.FrameOfReferenceUID = frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = ds.ImagePositionPatient[2]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = columns
        ds.PixelSpacing = list(PIXEL_SPACING_MM)
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        ds.RescaleIntercept = RESCALE_INTERCEPT
        ds.RescaleSlope = 1.0
        ds.RescaleType = "HU"
        ds.PixelData = stored.tobytes()
        slices.append(ds)
    return slices


def make_abscess_mask(n_slices: int = 6, rows: int = 64, columns: int = 64) -> np.ndarray:
    """A known abscess mask: a 10x12 pixel block on slices 2..4 (inclusive).

    Returns:
        bool array [n_slices, rows, columns].
    """
    mask = np.zeros((n_slices, rows, columns), dtype=bool)
    mask[2:5, 30:40, 20:32] = True
    return mask


def make_abscess_seg(source_images: list[pydicom.Dataset], mask: np.ndarray) -> hd.seg.Segmentation:
    """Build a BINARY DICOM SEG with one segment "Abscess" (frame per source slice).

    Args:
        source_images: The CT slices the mask was computed on, in mask order.
        mask: bool [n, rows, columns] mask on the CT grid.

    Returns:
        The highdicom Segmentation instance.
    """
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Abscess",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=ABSCESS_CODE,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="VM-UNet", version="test", family=codes.DCM.ArtificialIntelligence
        ),
    )
    return hd.seg.Segmentation(
        source_images=source_images,
        pixel_array=mask.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=generate_uid(),
        series_number=90,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="abscess-node",
        manufacturer_model_name="abscess-node",
        software_versions="test",
        device_serial_number="0",
        omit_empty_frames=False,
        content_date=datetime.date(2024, 3, 12),
        content_time=datetime.time(11, 0),
    )

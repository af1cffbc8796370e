"""Small, real-looking DICOM inputs for tests: a synthetic CT series and its abscess SEG.

The CT series comes from the project's converter (tooling.convert) with real geometry: axial
slices, 0.8 mm pixels, 2.5 mm slice spacing, HU stored with RescaleIntercept -1024; the SEG from
the node's SEG writer (dicom_node.seg).
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom

from dicom_node.seg import build_segmentation
from models.weights import AlgorithmInfo
from tooling.convert import StudyInfo, volume_to_ct_series

TEST_ALGORITHM = AlgorithmInfo(name="vmunet-test", version="test", demo=True, description="test weights")
PIXEL_SPACING_MM = (0.8, 0.8)
SLICE_SPACING_MM = 2.5


def make_ct_series(
    n_slices: int = 6,
    rows: int = 64,
    columns: int = 64,
    study_uid: str | None = None,
    patient_id: str = "ANON0001",
) -> list[pydicom.Dataset]:
    """Build an axial head-and-neck CT series in memory with the project's own converter.

    Args:
        n_slices: Number of axial slices (one instance each).
        rows: Image rows.
        columns: Image columns.
        study_uid: StudyInstanceUID to use; a new one when None.
        patient_id: PatientID of the (synthetic) patient.

    Returns:
        The slices, ordered from inferior to superior, each a complete CT Image instance.
    """
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[:rows, :columns]
    body = ((yy - rows / 2) / (rows * 0.42)) ** 2 + ((xx - columns / 2) / (columns * 0.38)) ** 2 <= 1
    volume_hu = np.where(body, 40.0, -1000.0)[None] + rng.normal(0.0, 8.0, (n_slices, rows, columns))
    info = StudyInfo(patient_name="Test^Abscess", patient_id=patient_id, patient_birth_date="19700101",
                     accession_number="ACC0001", study_date="20240312", study_time="101500",
                     study_description="CT NECK WITH CONTRAST", series_description="Neck soft tissue 2.5 mm",
                     series_number=3)
    return volume_to_ct_series(volume_hu, (SLICE_SPACING_MM, *PIXEL_SPACING_MM), origin_lps=(-25.6, -25.6, -60.0),
                               info=info, study_uid=study_uid)


def make_abscess_mask(n_slices: int = 6, rows: int = 64, columns: int = 64) -> np.ndarray:
    """A known abscess mask: a 10x12 pixel block on slices 2..4 (inclusive).

    Returns:
        bool array [n_slices, rows, columns].
    """
    mask = np.zeros((n_slices, rows, columns), dtype=bool)
    mask[2:5, 30:40, 20:32] = True
    return mask


def make_abscess_seg(source_images: list[pydicom.Dataset], mask: np.ndarray) -> hd.seg.Segmentation:
    """The node's own BINARY DICOM SEG (one segment "Abscess", a frame per source slice) of ``mask``."""
    return build_segmentation(source_images, mask, TEST_ALGORITHM)

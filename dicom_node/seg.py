"""Write the abscess mask of one CT series as a DICOM Segmentation (highdicom).

One segment "Abscess" (SNOMED CT 44132006, morphologic abnormality; category "Morphologically abnormal structure"
49755003): the candidates that passed the plausibility rules; optionally (``RejectedCandidatesSegment``) a
second segment "Abscess candidate (rejected)" with the raw mask of the rejected candidates, for QA;
a frame for every source slice (empty frames are kept: OHIF misplaces overlays when
they are omitted), the source's Patient/Study modules and Frame of Reference, the algorithm
(VM-UNet + weights name/version, and the demo wording when demo weights run) in the segment's
AlgorithmIdentificationSequence, and this node as ContributingEquipment.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from dicom_node.identity import MODEL_NAME, NODE_NAME, NODE_VERSION, SEG_SERIES_NUMBER, derived_uid, new_uid
from dicom_node.reports.codes import ABSCESS, MORPHOLOGICALLY_ABNORMAL_STRUCTURE
from models.weights import AlgorithmInfo


def algorithm_identification(algorithm: AlgorithmInfo) -> hd.AlgorithmIdentificationSequence:
    """VM-UNet with the weights' name/version (and the demo wording) as DICOM algorithm identification."""
    parameters = {"weights": f"{algorithm.name} v{algorithm.version}"}
    if algorithm.description:
        parameters["weights_description"] = algorithm.description[:64]
    return hd.AlgorithmIdentificationSequence(
        name="VM-UNet", version=f"{algorithm.name}-{algorithm.version}",
        family=codes.cid7162.ArtificialIntelligence,
        source=f"{NODE_NAME} {NODE_VERSION}", parameters=parameters)


def contributing_equipment() -> hd.ContributingEquipment:
    """This node as the equipment that derived the object."""
    return hd.ContributingEquipment(
        manufacturer=NODE_NAME, purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=MODEL_NAME, software_versions=NODE_VERSION,
        institution_name=None)


def build_segmentation(source_images: Sequence[pydicom.Dataset], mask: np.ndarray,
                       algorithm: AlgorithmInfo, segmentation_type: str = "BINARY",
                       uid_seed: str | None = None, rejected: np.ndarray | None = None) -> hd.seg.Segmentation:
    """Build the SEG for one series.

    Args:
        source_images: the series' datasets (headers suffice), sorted as the mask's first axis.
        mask: bool [n, rows, columns] for BINARY; float probabilities in [0, 1] for FRACTIONAL.
        algorithm: the network that produced the mask (``Segmenter.info``).
        segmentation_type: ``"BINARY"`` or ``"FRACTIONAL"``.
        uid_seed: derive the SEG's UIDs from it (same content -> same UIDs); random if None.
        rejected: bool [n, rows, columns], the rejected candidates: written as segment 2
            "Abscess candidate (rejected)" when given.

    Raises:
        ValueError: the mask does not match the source images.
    """
    n, rows, columns = len(source_images), int(source_images[0].Rows), int(source_images[0].Columns)
    if mask.shape != (n, rows, columns):
        raise ValueError(f"mask shape {mask.shape} does not match the {n} source slices of {rows}x{columns}")
    if rejected is not None and rejected.shape != mask.shape:
        raise ValueError(f"rejected mask shape {rejected.shape} differs from the mask's {mask.shape}")
    if segmentation_type == "FRACTIONAL":
        pixel_array = np.clip(mask.astype(np.float32), 0.0, 1.0)
    elif segmentation_type == "BINARY":
        pixel_array = mask.astype(bool)
    else:
        raise ValueError(f"segmentation_type must be BINARY or FRACTIONAL, not {segmentation_type!r}")
    segments = [("Abscess", "abscess", hd.color.CIELabColor(53.2, 80.1, 67.2))]  # red in every viewer
    if rejected is not None:
        pixel_array = np.stack([pixel_array, rejected.astype(pixel_array.dtype)], axis=-1)
        segments.append(("Abscess candidate (rejected)", "rejected-candidate", hd.color.CIELabColor(60.0, -30.0, -40.0)))
    descriptions = [hd.seg.SegmentDescription(
        segment_number=number, segment_label=label,
        segmented_property_category=MORPHOLOGICALLY_ABNORMAL_STRUCTURE, segmented_property_type=ABSCESS,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm_identification(algorithm),
        tracking_uid=(derived_uid(uid_seed, "tracking" if number == 1 else f"tracking-{tracking}") if uid_seed
                      else new_uid()),
        tracking_id=tracking, display_color=colour)
        for number, (label, tracking, colour) in enumerate(segments, start=1)]
    demo = algorithm.demo
    seg = hd.seg.Segmentation(
        source_images=list(source_images), pixel_array=pixel_array,
        segmentation_type=segmentation_type, segment_descriptions=descriptions,
        series_instance_uid=derived_uid(uid_seed, "seg-series") if uid_seed else new_uid(),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=derived_uid(uid_seed, "seg-instance") if uid_seed else new_uid(),
        instance_number=1, manufacturer=NODE_NAME, manufacturer_model_name=MODEL_NAME,
        software_versions=NODE_VERSION, device_serial_number=NODE_NAME,
        content_description=("VM-UNet abscess; demo weights, not for clinical use" if demo
                             else "VM-UNet neck abscess segmentation"),
        content_creator_name="abscess-node^VM-UNet", content_label="ABSCESS",
        omit_empty_frames=False, contributing_equipment=[contributing_equipment()],
        max_fractional_value=255)
    seg.SeriesDescription = "Abscess SEG (VM-UNet) DEMO - not for clinical use" if demo else "Abscess SEG (VM-UNet)"
    now = dt.datetime.now()
    seg.SeriesDate = now.strftime("%Y%m%d")
    seg.SeriesTime = now.strftime("%H%M%S")
    return seg

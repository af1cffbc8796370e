"""Who the node is in the DICOM objects it writes: names, UID root, series numbers.

One definition of each, used by the SEG and SR writers, the similar-case service and the
pipeline (and by the tooling that converts sample data).
"""

from __future__ import annotations

import io
import re

import pydicom
from pydicom.uid import generate_uid

NODE_NAME = "abscess-node"
"""Manufacturer of every object the node writes."""
NODE_VERSION = "0.1.0"
"""Software version written into every object."""
DEVICE_NAME = "ABSCESS_NODE"
"""Device observer name of the SRs (TID 1004)."""
MODEL_NAME = "abscess-node VM-UNet"
"""Manufacturer's model name of the SEG and of the contributing equipment."""

UID_ROOT = "1.2.826.0.1.3680043.10.1087."
"""Prefix of every UID this project generates."""
UID_PATTERN = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
"""A DICOM UID (PS3.5 9.1): dot-separated numbers without leading zeros; at most 64 characters."""

SEG_SERIES_NUMBER = 9901
MEASUREMENT_SERIES_NUMBER = 9902
SIMILAR_CASES_SERIES_NUMBER = 9903


def is_uid(value: object) -> bool:
    """Whether ``value`` is a syntactically valid DICOM UID."""
    return isinstance(value, str) and len(value) <= 64 and UID_PATTERN.fullmatch(value) is not None


def derived_uid(*seeds: object) -> str:
    """A UID under :data:`UID_ROOT` derived from ``seeds`` (the same seeds give the same UID)."""
    return generate_uid(UID_ROOT, [str(seed) for seed in seeds])


def new_uid() -> str:
    """A fresh random UID under :data:`UID_ROOT`."""
    return generate_uid(UID_ROOT)


def dataset_bytes(dataset: pydicom.Dataset) -> bytes:
    """A dataset as a DICOM Part 10 file in memory (what Orthanc's ``POST /instances`` takes)."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()

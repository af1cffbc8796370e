"""What the case index stores per study and per slice (plain, validated records).

The caller reads these values from wherever it gets them (the node from Orthanc's index, the
evaluation harness from its cohort); the index only stores and returns them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

_STUDY_TEXT_FIELDS = (
    "series_uid",
    "patient_id",
    "patient_name",
    "patient_sex",
    "patient_birth_date",
    "study_date",
    "study_description",
    "accession_number",
    "orthanc_study_id",
    "orthanc_series_id",
    "content_fingerprint",
)


@dataclass(frozen=True)
class StudyRecord:
    """Metadata of one indexed study (values from the DICOM header, read by the caller).

    Attributes:
        study_uid: StudyInstanceUID (required).
        series_uid: SeriesInstanceUID of the CT series that was indexed.
        patient_id, patient_name, patient_sex, patient_birth_date: Patient module values.
        study_date: StudyDate (DA, YYYYMMDD).
        study_description: StudyDescription.
        modalities: ModalitiesInStudy, e.g. ("CT", "SEG", "SR").
        accession_number: AccessionNumber.
        orthanc_study_id, orthanc_series_id: Orthanc's resource ids.
        content_fingerprint: Hash of the indexed content (lets callers skip unchanged studies).
        extra: Any further JSON-serialisable values.

    Raises:
        ValueError: ``study_uid`` is empty.
    """

    study_uid: str
    series_uid: str = ""
    patient_id: str = ""
    patient_name: str = ""
    patient_sex: str = ""
    patient_birth_date: str = ""
    study_date: str = ""
    study_description: str = ""
    modalities: tuple[str, ...] = ()
    accession_number: str = ""
    orthanc_study_id: str = ""
    orthanc_series_id: str = ""
    content_fingerprint: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.study_uid, str) or not self.study_uid.strip():
            raise ValueError("StudyRecord.study_uid must be a non-empty StudyInstanceUID")
        modalities = self.modalities
        if isinstance(modalities, str):
            modalities = tuple(m for m in modalities.replace(",", "\\").split("\\") if m)
        object.__setattr__(self, "modalities", tuple(str(m) for m in modalities))
        for name in _STUDY_TEXT_FIELDS:
            value = getattr(self, name)
            object.__setattr__(self, name, "" if value is None else str(value))

    def as_dict(self) -> dict[str, Any]:
        """Return the record as a plain JSON-serialisable dict."""
        record = asdict(self)
        record["modalities"] = list(self.modalities)
        return record


@dataclass(frozen=True)
class SliceRecord:
    """One slice of an indexed series.

    Attributes:
        slice_index: Index of the slice in the volume (axis 0 of the arrays).
        sop_instance_uid: SOPInstanceUID of the slice's instance.
        z_position_mm: Position along the slice normal (mm), when known.
    """

    slice_index: int
    sop_instance_uid: str = ""
    z_position_mm: float | None = None

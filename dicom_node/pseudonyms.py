"""Keyed pseudonyms of other patients: stable per node, not reversible without the node's secret.

A pseudonym is ``HMAC-SHA256(secret, kind + ":" + value)``: the same value always gives the
same pseudonym on one node (a radiologist can tell two answers are the same patient), but
trying every MRN does not reverse it without the secret (an unkeyed hash would). UIDs are
replaced by UIDs derived from their HMAC under the project's UID root, so a pseudonymised
answer names no real study, series or instance.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from pathlib import Path

from dicom_node.identity import derived_uid
from dicom_node.private_files import create_secret, read_private_file
from dicom_node.similar.query import SimilarCase, SlicePair
from index.records import StudyRecord

class Pseudonymizer:
    """Replaces other patients' identities by keyed pseudonyms.

    Args:
        secret: the node's secret (at least 16 bytes).
    """

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the pseudonym secret must hold at least 16 bytes")
        self._secret = secret

    @classmethod
    def from_file(cls, path: Path) -> Pseudonymizer:
        """The node's pseudonymizer (the secret file is created on first use)."""
        create_secret(path)
        return cls(read_private_file(path).encode())

    def _digest(self, kind: str, value: str) -> str:
        return hmac.new(self._secret, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()

    def token(self, kind: str, value: str) -> str:
        """``<KIND>-<16 hex>``, or "" for an empty value."""
        return f"{kind}-{self._digest(kind, value)[:16].upper()}" if value else ""

    def uid(self, value: str) -> str:
        """A UID standing for ``value`` (a real UID), or "" for an empty value."""
        return derived_uid("pseudonym", self._digest("UID", value)) if value else ""

    def study(self, study: StudyRecord) -> StudyRecord:
        """The record without another patient's identity: pseudonyms for IDs and UIDs, no name,
        birth date or study date, no Orthanc ids."""
        return dataclasses.replace(
            study, study_uid=self.uid(study.study_uid), series_uid=self.uid(study.series_uid),
            patient_id=self.token("PID", study.patient_id), patient_name="", patient_birth_date="",
            accession_number=self.token("ACC", study.accession_number), study_date="",
            orthanc_study_id="", orthanc_series_id="", content_fingerprint="", extra={})

    def case(self, case: SimilarCase) -> SimilarCase:
        """The similar case with its study and its matched instances pseudonymised."""
        return dataclasses.replace(
            case, study=self.study(case.study),
            best_slices=tuple(SlicePair(pair.query_slice, pair.matched_slice, self.uid(pair.matched_sop_instance_uid),
                                        pair.similarity) for pair in case.best_slices))

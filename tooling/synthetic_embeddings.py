"""Seeded synthetic embeddings for the index tests and benchmarks (no real data needed).

Real slice embeddings are not uniform on the sphere: neighbouring slices and similar anatomy
form clusters, and their variation spans few directions. These generators draw cluster
centres and add noise, then project to the unit sphere, so that HNSW and exact search are
compared on data that resembles embeddings.
"""

from __future__ import annotations

import numpy as np

from index.lesions import Lesion
from index.records import SliceRecord, StudyRecord
from index.retrieval import normalize_rows

SLICES_PER_STUDY = 100
"""Slices of one synthetic study (:class:`SyntheticStudies`)."""
ROI_BAND = 20
"""Consecutive slices of a synthetic study that carry an ROI (abscess) embedding."""


class ClusteredEmbeddings:
    """A distribution of unit vectors around cluster centres.

    A sample is ``normalize(centre + noise * offset)`` with a random centre and an offset of
    expected norm 1: isotropic, or (with ``intrinsic_dim``) 90 % in one random subspace of that
    dimension shared by all samples and 10 % isotropic.

    Args:
        dim: Dimension.
        rng: Seeded generator (also used by :meth:`sample`).
        clusters: Number of random centres (ignored when ``centres`` is given).
        noise: Norm of the offset relative to the unit-norm centres.
        centres: Optional [c, dim] centres, e.g. real embeddings.
        intrinsic_dim: Dimension of the shared subspace of the offsets (None: isotropic).
    """

    def __init__(
        self,
        dim: int,
        rng: np.random.Generator,
        clusters: int = 100,
        noise: float = 0.5,
        centres: np.ndarray | None = None,
        intrinsic_dim: int | None = None,
    ) -> None:
        self.dim, self.rng, self.noise = dim, rng, noise
        if centres is None:
            centres = rng.standard_normal((clusters, dim))
        self.centres = normalize_rows(np.asarray(centres, dtype=np.float32))
        self.basis = None
        if intrinsic_dim is not None:
            self.basis = np.linalg.qr(rng.standard_normal((dim, intrinsic_dim)))[0].T.astype(np.float32)

    def sample(self, count: int) -> np.ndarray:
        """Draw ``count`` vectors: float32 [count, dim] with unit-norm rows."""
        return self.around(self.rng.integers(0, len(self.centres), size=count))

    def around(self, centre_indices: np.ndarray) -> np.ndarray:
        """One vector around each given centre: float32 [len(centre_indices), dim], unit-norm rows.

        A study's slices drawn around consecutive centres (``start + slice // 4``) resemble a
        scan moving through the anatomy: studies over the same region share their neighbours.
        """
        rng = self.rng
        count = len(centre_indices)
        offsets = rng.standard_normal((count, self.dim), dtype=np.float32) / np.sqrt(self.dim)
        if self.basis is not None:
            rank = len(self.basis)
            in_subspace = rng.standard_normal((count, rank), dtype=np.float32) / np.sqrt(rank)
            offsets = 0.9 * (in_subspace @ self.basis) + 0.1 * offsets
        return normalize_rows(self.centres[np.asarray(centre_indices) % len(self.centres)] + self.noise * offsets)


def clustered_unit_vectors(
    count: int, dim: int, rng: np.random.Generator, clusters: int = 100, noise: float = 0.5
) -> np.ndarray:
    """``count`` unit vectors around ``clusters`` fresh random centres (isotropic noise).

    Args:
        count: Number of vectors.
        dim: Dimension.
        rng: Seeded generator.
        clusters: Number of random centres.
        noise: Norm of the noise relative to the centres (0.5: cosine ~0.9 to the centre).
    """
    return ClusteredEmbeddings(dim, rng, clusters, noise).sample(count)


class SyntheticStudies:
    """Seeded synthetic studies for index benchmarks: slice embeddings along anatomical centres
    (:meth:`ClusteredEmbeddings.around`), ROI embeddings on a band of :data:`ROI_BAND` slices, one lesion.

    Args:
        dim: Embedding dimension.
        seed: Seed of everything drawn.
        centres: Anatomical centres of the slice embeddings (a quarter as many ROI centres).
    """

    def __init__(self, dim: int, seed: int, centres: int = 400) -> None:
        self.rng = np.random.default_rng(seed)
        self.slices = ClusteredEmbeddings(dim, self.rng, centres, noise=0.6, intrinsic_dim=32)
        self.rois = ClusteredEmbeddings(dim, self.rng, centres // 4, noise=0.6, intrinsic_dim=32)

    def study(self, uid: str) -> tuple[StudyRecord, list[SliceRecord], np.ndarray, np.ndarray, list[Lesion]]:
        """One study's record, slice records, slice and ROI embeddings and lesion."""
        rng = self.rng
        start = int(rng.integers(0, len(self.slices.centres)))
        slice_embeddings = self.slices.around(start + np.arange(SLICES_PER_STUDY) // 4)
        roi_embeddings = np.zeros_like(slice_embeddings)
        first = int(rng.integers(0, SLICES_PER_STUDY - ROI_BAND))
        roi_start = int(rng.integers(0, len(self.rois.centres)))
        roi_embeddings[first : first + ROI_BAND] = self.rois.around(roi_start + np.arange(ROI_BAND) // 5)
        volume = float(rng.uniform(0.5, 40.0))
        lesion = Lesion(label=1, voxel_count=int(volume * 1000), volume_ml=volume,
                        longest_axial_diameter_mm=float(rng.uniform(10, 60)), core_mean_hu=float(rng.uniform(5, 40)),
                        core_sd_hu=float(rng.uniform(3, 15)), loculi=int(rng.integers(1, 4)), first_slice=first,
                        last_slice=first + ROI_BAND - 1, space=str(rng.choice(["parapharyngeal", "retropharyngeal"])))
        record = StudyRecord(uid, series_uid=f"{uid}.1", patient_id=f"BENCH-{uid.rsplit('.', 1)[1]}",
                             patient_name="Bench^Synthetic", study_date="20260101", modalities=("CT",))
        slices = [SliceRecord(i, f"{uid}.1.{i + 1}", 2.5 * i) for i in range(SLICES_PER_STUDY)]
        return record, slices, slice_embeddings, roi_embeddings, [lesion]

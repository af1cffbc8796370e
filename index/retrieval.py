"""Retrieval building blocks of the case index (Khun Jush et al. 2024, "Content-based image
retrieval for multi-class volumetric radiology images: a benchmark study").

Pure functions and result types; :class:`index.store.CaseIndex` runs the vector searches and
feeds them here. The pipeline of one study query:

1. slice-wise kNN (eq. 1): every query slice retrieves its ``k`` most similar database slices
   (cosine similarity = inner product of L2-normalised vectors);
2. count-based aggregation (sec. 2.4.1, Fig. 1): a hit table counts, per database study, the
   retrieved slices that belong to it, and ranks the studies by count;
3. late-interaction re-ranking (sec. 2.5, eq. 3-6): every study with at least one hit is
   re-scored by ``RS = sum_i max_j SIM(M_Q, M_V)_ij`` and localised by the ``L`` slices with the
   highest column maxima ``m_SIM`` (eq. 6);
4. lesion-descriptor post-filters and an optional mixed score that blends the image similarity
   with a descriptor similarity (AbscessHeNe retrieval prototype: metadata as post-retrieval
   filters or fused into the score).
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from index.lesions import Lesion
from index.records import StudyRecord

LOCALIZATION_L = 15
"""Number of best-matching slices returned per study (L = 15 in Khun Jush et al., sec. 2.5.4)."""
HIT_TABLE_K = 1
"""Neighbours per query slice in the hit table: the most similar slice only (eq. 1, sec. 2.4.1);
larger ``k`` stays an option."""
DEFAULT_IMAGE_WEIGHT = 0.7
"""Weight w of the image similarity in the mixed score ``w * image + (1 - w) * descriptors``:
the image evidence leads, the descriptors re-order studies whose images are about as similar."""

NUMERIC_DESCRIPTORS = (
    "volume_ml",
    "longest_axial_diameter_mm",
    "core_mean_hu",
    "core_sd_hu",
    "loculi",
    "voxel_count",
    "first_slice",
    "last_slice",
)
"""Lesion descriptors that filters compare as numbers."""
TEXT_DESCRIPTORS = ("space", "side")
"""Lesion descriptors that filters compare as case-insensitive text (``=`` and ``!=`` only)."""

# Descriptor similarity: size-like descriptors by relative difference, HU descriptors by the
# absolute difference over this many HU (clipped to [0, 1]).
_RELATIVE_DESCRIPTORS = ("volume_ml", "longest_axial_diameter_mm", "loculi")
_HU_SCALE = {"core_mean_hu": 100.0, "core_sd_hu": 50.0}


@dataclass(frozen=True)
class SliceHit:
    """One database slice returned by slice-wise kNN (eq. 1).

    Attributes:
        query_slice_index: Slice index of the query slice in the query volume.
        study_uid: StudyInstanceUID of the database slice.
        slice_index: Index of the database slice in its study's volume.
        sop_instance_uid: SOPInstanceUID of the database slice ("" when unknown).
        similarity: Cosine similarity to the query slice.
    """

    query_slice_index: int
    study_uid: str
    slice_index: int
    sop_instance_uid: str
    similarity: float


@dataclass
class StudyHit:
    """One ranked study of a study query.

    Attributes:
        study_uid: StudyInstanceUID of the retrieved study.
        rank: 1-based rank.
        score: The score the ranking used, in [0, 1]: the normalised image score, or the mixed
            score when query descriptors were given.
        mode: ``"<space>:<ranking>"`` with space ``slice`` or ``roi`` and ranking ``count`` or
            ``late_interaction``, plus ``+descriptors`` for the mixed score.
        hit_count: Number of slice hits of the study in the hit table (sec. 2.4.1).
        late_interaction_score: RS of eq. 5 (None when not re-ranked).
        image_score: Normalised image similarity (count: hits / (n_query * k); late interaction:
            RS / n_query clipped to [0, 1]).
        descriptor_score: Descriptor similarity in [0, 1] (None unless a mixed query).
        best_slices: Localisation: (query_slice_index, slice_index, similarity) triples, best
            first. Late interaction: the L slices with the largest m_SIM (eq. 6), each paired with
            its best query slice; count: the hit slices of the hit table.
        lesions: Lesions of the study, label order.
        study: Study metadata (None until the index attaches it).
    """

    study_uid: str
    rank: int
    score: float
    mode: str
    hit_count: int
    late_interaction_score: float | None = None
    image_score: float = 0.0
    descriptor_score: float | None = None
    best_slices: list[tuple[int, int, float]] = field(default_factory=list)
    lesions: list[Lesion] = field(default_factory=list)
    study: StudyRecord | None = None


@dataclass
class HitTableRow:
    """One study's row of the hit table (Khun Jush et al., Fig. 1 step 4).

    Attributes:
        study_uid: The database study.
        hit_count: Number of retrieved slices that belong to the study.
        similarity_sum: Sum of the similarities of those hits (the table's "total score").
        hits: The hits as (query_slice_index, slice_index, similarity).
    """

    study_uid: str
    hit_count: int = 0
    similarity_sum: float = 0.0
    hits: list[tuple[int, int, float]] = field(default_factory=list)


def count_based_ranking(slice_hits: Iterable[SliceHit]) -> list[HitTableRow]:
    """Aggregate slice hits into a hit table and rank studies by hit count (sec. 2.4.1).

    Every retrieved slice is one hit for the study it belongs to (with ``k`` neighbours per
    query slice a study can collect up to ``k`` hits from one query slice). Ties in the count
    are broken by the larger sum of hit similarities, then by study_uid, so the order is
    deterministic.

    Args:
        slice_hits: Hits of all query slices (from slice-wise kNN, eq. 1).

    Returns:
        Hit-table rows, best first. Each row's hits are sorted by similarity, best first.
    """
    table: dict[str, HitTableRow] = {}
    for hit in slice_hits:
        row = table.setdefault(hit.study_uid, HitTableRow(hit.study_uid))
        row.hit_count += 1
        row.similarity_sum += hit.similarity
        row.hits.append((hit.query_slice_index, hit.slice_index, hit.similarity))
    for row in table.values():
        row.hits.sort(key=lambda pair: (-pair[2], pair[1], pair[0]))
    return sorted(table.values(), key=lambda row: (-row.hit_count, -row.similarity_sum, row.study_uid))


def similarity_matrix(query_matrix: np.ndarray, candidate_matrix: np.ndarray) -> np.ndarray:
    """Cosine similarity of every query slice with every candidate slice (eq. 3-4).

    Args:
        query_matrix: Query embeddings M_Q [n, D] (normalised here, eq. 3).
        candidate_matrix: Candidate embeddings M_V [m, D] (normalised here, eq. 3).

    Returns:
        SIM(M_Q, M_V) [n, m].
    """
    return normalize_rows(query_matrix) @ normalize_rows(candidate_matrix).T


def late_interaction(
    query_matrix: np.ndarray,
    candidate_matrix: np.ndarray,
    query_slice_indices: Sequence[int],
    candidate_slice_indices: Sequence[int],
    localization_l: int = LOCALIZATION_L,
) -> tuple[float, list[tuple[int, int, float]]]:
    """ColBERT-style late-interaction score and localisation of one candidate (eq. 4-6).

    ``RS = sum_{i=1..n} max_{j=1..m} SIM(M_Q, M_V)_ij`` (eq. 5). For the localisation the
    column maxima ``m_SIM_j = max_i SIM_ij`` (eq. 6) are computed and the ``L`` candidate slices
    with the largest values are returned, each with the query slice that attains the maximum.

    Args:
        query_matrix: Query slice embeddings [n, D].
        candidate_matrix: Candidate slice embeddings [m, D].
        query_slice_indices: Slice index of each query row.
        candidate_slice_indices: Slice index of each candidate row.
        localization_l: L, the number of best-matching slices to return (L <= m).

    Returns:
        (RS, best_slices) with best_slices as (query_slice_index, slice_index, similarity),
        best first.
    """
    return late_interaction_of(similarity_matrix(query_matrix, candidate_matrix), query_slice_indices,
                               candidate_slice_indices, localization_l)


def late_interaction_of(
    sim: np.ndarray,
    query_slice_indices: Sequence[int],
    candidate_slice_indices: Sequence[int],
    localization_l: int = LOCALIZATION_L,
) -> tuple[float, list[tuple[int, int, float]]]:
    """:func:`late_interaction` from an already computed similarity matrix SIM [n, m]."""
    rank_score = float(sim.max(axis=1).sum())
    column_best_query = sim.argmax(axis=0)
    m_sim = sim[column_best_query, np.arange(sim.shape[1])]
    count = min(localization_l, sim.shape[1])
    # Stable order: by similarity, then by slice index.
    order = np.lexsort((np.asarray(candidate_slice_indices), -m_sim))[:count]
    best = [
        (int(query_slice_indices[column_best_query[j]]), int(candidate_slice_indices[j]), float(m_sim[j]))
        for j in order
    ]
    return rank_score, best


def normalize_rows(vectors: np.ndarray, in_place: bool = False) -> np.ndarray:
    """L2-normalise the rows of a float matrix (rows of zeros stay zero).

    Args:
        vectors: [n, D] array.
        in_place: Overwrite ``vectors`` (a float32 array the caller owns) instead of copying it.

    Returns:
        float32 [n, D] with unit-norm rows.
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", vectors, vectors))[:, None]
    out = vectors if in_place else np.zeros_like(vectors)
    return np.divide(vectors, norms, out=out, where=norms > 0)


_OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "!=": operator.ne,
    "==": operator.eq,
    "=": operator.eq,
    ">": operator.gt,
    "<": operator.lt,
}
_FILTER_PATTERN = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|!=|==|=|>|<)\s*(.+?)\s*$")


@dataclass(frozen=True)
class LesionFilter:
    """A post-filter on one lesion descriptor, e.g. ``loculi>=2`` or ``space=parapharyngeal``.

    A study passes a list of filters when at least one of its lesions satisfies all of them
    (the same lesion); a study without lesions passes no filter.

    Attributes:
        descriptor: A name from :data:`NUMERIC_DESCRIPTORS` or :data:`TEXT_DESCRIPTORS`.
        op: One of ``>= <= != == = > <`` (text descriptors: ``=``, ``==``, ``!=``).
        value: The value compared against (float for numeric, lower-case str for text).
    """

    descriptor: str
    op: str
    value: float | str

    def __post_init__(self) -> None:
        if self.op not in _OPERATORS:
            raise ValueError(f"unknown operator {self.op!r}; use one of {', '.join(_OPERATORS)}")
        if self.descriptor in NUMERIC_DESCRIPTORS:
            try:
                object.__setattr__(self, "value", float(self.value))
            except (TypeError, ValueError):
                raise ValueError(f"filter on {self.descriptor!r} needs a number, got {self.value!r}") from None
        elif self.descriptor in TEXT_DESCRIPTORS:
            if self.op not in ("=", "==", "!="):
                raise ValueError(f"filter on {self.descriptor!r} supports only '=' and '!=', got {self.op!r}")
            object.__setattr__(self, "value", str(self.value).strip().lower())
        else:
            known = ", ".join(NUMERIC_DESCRIPTORS + TEXT_DESCRIPTORS)
            raise ValueError(f"unknown lesion descriptor {self.descriptor!r}; filters can use: {known}")

    @classmethod
    def parse(cls, text: str) -> LesionFilter:
        """Parse ``"<descriptor><op><value>"``, e.g. ``"volume_ml>5"``.

        Raises:
            ValueError: If the text is not of that form or names an unknown descriptor.
        """
        found = _FILTER_PATTERN.match(text)
        if found is None:
            raise ValueError(f"cannot parse filter {text!r}; write it as <descriptor><op><value>, e.g. 'loculi>=2'")
        return cls(found.group(1), found.group(2), found.group(3))

    def matches(self, lesion: Lesion) -> bool:
        """Whether one lesion satisfies the filter."""
        actual = getattr(lesion, self.descriptor)
        if actual is None:
            return False
        if self.descriptor in TEXT_DESCRIPTORS:
            actual = str(actual).strip().lower()
        else:
            actual = float(actual)
        return _OPERATORS[self.op](actual, self.value)


def parse_filters(filters: Iterable[str | LesionFilter]) -> list[LesionFilter]:
    """Coerce filter strings to :class:`LesionFilter` (filters pass through unchanged)."""
    return [f if isinstance(f, LesionFilter) else LesionFilter.parse(f) for f in filters]


def study_passes(lesions: Sequence[Lesion], filters: Sequence[LesionFilter]) -> bool:
    """Whether a study passes all filters: some lesion satisfies every filter.

    Args:
        lesions: The study's lesions.
        filters: Parsed filters; an empty list passes every study.
    """
    if not filters:
        return True
    return any(all(f.matches(lesion) for f in filters) for lesion in lesions)


def descriptor_similarity(query_descriptors: Mapping[str, Any], lesions: Sequence[Lesion]) -> float:
    """Similarity in [0, 1] of a query's lesion descriptors to a study's best-matching lesion.

    Per descriptor given in the query (unknown keys and None values are ignored):

    - ``volume_ml``, ``longest_axial_diameter_mm``, ``loculi``: ``1 - |a - b| / max(|a|, |b|)``
      (relative difference; 1 when both are 0);
    - ``core_mean_hu`` / ``core_sd_hu``: ``1 - min(|a - b| / s, 1)`` with s = 100 / 50 HU;
    - ``space``, ``side``: 1 when equal (case-insensitive), else 0.

    The lesion's similarity is the mean over these descriptors; the study's is the maximum
    over its lesions (0 for a study without lesions).

    Args:
        query_descriptors: e.g. ``{"volume_ml": 12.0, "loculi": 2, "space": "parapharyngeal"}``.
        lesions: The candidate study's lesions.
    """
    keys = [
        key for key in (*_RELATIVE_DESCRIPTORS, *_HU_SCALE, *TEXT_DESCRIPTORS) if query_descriptors.get(key) is not None
    ]
    if not keys or not lesions:
        return 0.0
    best = 0.0
    for lesion in lesions:
        total = 0.0
        for key in keys:
            wanted, actual = query_descriptors[key], getattr(lesion, key)
            if actual is None:
                continue
            if key in TEXT_DESCRIPTORS:
                total += float(str(wanted).strip().lower() == str(actual).strip().lower())
            elif key in _HU_SCALE:
                total += 1.0 - min(abs(float(wanted) - float(actual)) / _HU_SCALE[key], 1.0)
            else:
                largest = max(abs(float(wanted)), abs(float(actual)))
                total += 1.0 if largest == 0 else 1.0 - abs(float(wanted) - float(actual)) / largest
        best = max(best, total / len(keys))
    return best


def mixed_score(image_score: float, descriptor_score: float, image_weight: float = DEFAULT_IMAGE_WEIGHT) -> float:
    """Composite score ``w * image + (1 - w) * descriptors`` (both terms in [0, 1]).

    Args:
        image_score: Normalised image similarity.
        descriptor_score: Descriptor similarity from :func:`descriptor_similarity`.
        image_weight: w in [0, 1] (default :data:`DEFAULT_IMAGE_WEIGHT`).

    Raises:
        ValueError: If the weight is outside [0, 1].
    """
    if not 0.0 <= image_weight <= 1.0 or math.isnan(image_weight):
        raise ValueError(f"image_weight must be in [0, 1], got {image_weight}")
    return image_weight * image_score + (1.0 - image_weight) * descriptor_score


def rank_studies(
    queries: np.ndarray,
    positions: np.ndarray,
    slice_hits: Sequence[Sequence[SliceHit]],
    lesions: Mapping[str, Sequence[Lesion]],
    candidate_embeddings: Callable[[Sequence[str]], Mapping[str, tuple[np.ndarray, np.ndarray]]],
    *,
    space: str,
    k: int,
    top: int,
    rerank: bool,
    filters: Sequence[LesionFilter] = (),
    query_descriptors: Mapping[str, Any] | None = None,
    image_weight: float = DEFAULT_IMAGE_WEIGHT,
    localization_l: int = LOCALIZATION_L,
    max_candidates: int | None = None,
) -> list[StudyHit]:
    """Rank the studies hit by a slice-wise kNN search (steps 2-4 of the module docstring).

    Args:
        queries: The query rows [n, D] that were searched (L2-normalised).
        positions: Slice index of each query row [n].
        slice_hits: Per query row, its database hits (eq. 1), best first.
        lesions: Lesions of every candidate study (missing: none).
        candidate_embeddings: ``study_uids -> {study_uid: (slice indices [m], embeddings [m, D])}``
            of the candidates to re-rank, in the searched space (called once, only when
            re-ranking; a study left out of the answer, e.g. deleted meanwhile, is dropped).
        space: ``"slice"`` or ``"roi"`` (written into each hit's mode).
        k: Neighbours that were retrieved per query slice (normalises the count score).
        top: Number of studies returned.
        rerank: Re-rank by late interaction (eq. 5) or keep the count-based order.
        filters: Lesion-descriptor post-filters.
        query_descriptors: Descriptors of the query lesion for the mixed score.
        image_weight: w of the mixed score.
        localization_l: L best-matching slices per result (eq. 6).
        max_candidates: Re-rank at most this many candidates (the ones with most hits); None
            re-ranks every study with a hit, as the paper does (sec. 2.5.1).

    Returns:
        Up to ``top`` hits, rank 1 first (``study`` not yet attached).
    """
    table = count_based_ranking(hit for row in slice_hits for hit in row)
    if filters:
        table = [row for row in table if study_passes(lesions.get(row.study_uid, []), filters)]
    mode = f"{space}:{'late_interaction' if rerank else 'count'}"
    mode += "+descriptors" if query_descriptors is not None else ""
    rows = table[: max_candidates if rerank else None]
    similarities: dict[str, np.ndarray] = {}
    if rerank and rows:
        embeddings = candidate_embeddings([row.study_uid for row in rows])
        rows = [row for row in rows if row.study_uid in embeddings]
        if rows:  # one matrix product for all candidates, then split by candidate
            matrices = [embeddings[row.study_uid][1] for row in rows]
            candidates = np.concatenate(matrices).astype(np.float32, copy=False)
            split = np.split(normalize_rows(queries) @ normalize_rows(candidates, in_place=True).T,  # eq. 3-4
                             np.cumsum([len(matrix) for matrix in matrices])[:-1], axis=1)
            similarities = {row.study_uid: sim for row, sim in zip(rows, split)}
    results = []
    for row in rows:
        hit = StudyHit(
            study_uid=row.study_uid,
            rank=0,
            score=0.0,
            mode=mode,
            hit_count=row.hit_count,
            image_score=row.hit_count / (len(queries) * k),
            best_slices=row.hits,
            lesions=list(lesions.get(row.study_uid, [])),
        )
        if rerank:
            hit.late_interaction_score, hit.best_slices = late_interaction_of(
                similarities[row.study_uid], positions, embeddings[row.study_uid][0], localization_l
            )
            hit.image_score = min(max(hit.late_interaction_score / len(queries), 0.0), 1.0)
        hit.score = hit.image_score
        if query_descriptors is not None:
            hit.descriptor_score = descriptor_similarity(query_descriptors, hit.lesions)
            hit.score = mixed_score(hit.image_score, hit.descriptor_score, image_weight)
        results.append(hit)
    if rerank or query_descriptors is not None:
        # Stable sort: equal scores keep the hit-table order.
        results.sort(key=lambda hit: -hit.score)
    results = results[:top]
    for rank, hit in enumerate(results, start=1):
        hit.rank = rank
    return results

"""Retrieval evaluation measures: Recall@K, P@K, AP/mAP, ANN recall and the localization ratio.

References: Khun Jush et al. 2024 (recall protocol, sec. 2.4; localization ratio, eq. 2 and 7)
and Lee & Kim (Precision@K, eq. 3-4).
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Iterable, Sequence

import numpy as np


def recall_at_k(ranked: Sequence[Hashable], relevant: Collection[Hashable], k: int) -> float:
    """Fraction of the relevant items found in the top ``k`` of a ranked list.

    With a single relevant item this is the hit rate used by Khun Jush et al. (a query counts as
    a true positive when the retrieved volume is relevant).

    Args:
        ranked: Retrieved items, best first.
        relevant: The relevant items (ground truth).
        k: Cut-off.

    Returns:
        ``|top-k ∩ relevant| / |relevant|`` (0 when nothing is relevant).
    """
    _check_k(k)
    relevant = set(relevant)
    if not relevant:
        return 0.0
    return len(relevant.intersection(ranked[:k])) / len(relevant)


def precision_at_k(ranked: Sequence[Hashable], relevant: Collection[Hashable], k: int) -> float:
    """Fraction of the top ``k`` results that are relevant (Lee & Kim, eq. 3, one query).

    Divides by ``k`` even when fewer than ``k`` results were returned, as in eq. 3.
    Average it over the queries of one class and then over classes for eq. 4.

    Args:
        ranked: Retrieved items, best first.
        relevant: The relevant items.
        k: Cut-off.
    """
    _check_k(k)
    relevant = set(relevant)
    return sum(item in relevant for item in ranked[:k]) / k


def average_precision(ranked: Sequence[Hashable], relevant: Collection[Hashable]) -> float:
    """Average precision over a ranked list: mean of P@rank at the ranks of the relevant items.

    Relevant items that were not retrieved contribute 0 (the sum is divided by ``|relevant|``).

    Args:
        ranked: Retrieved items, best first.
        relevant: The relevant items.
    """
    relevant = set(relevant)
    if not relevant:
        return 0.0
    found, total = 0, 0.0
    for rank, item in enumerate(ranked, start=1):
        if item in relevant:
            found += 1
            total += found / rank
    return total / len(relevant)


def mean_average_precision(
    runs: Iterable[tuple[Sequence[Hashable], Collection[Hashable]]],
) -> float:
    """mAP: the mean of :func:`average_precision` over queries.

    Args:
        runs: (ranked, relevant) per query.
    """
    values = [average_precision(ranked, relevant) for ranked, relevant in runs]
    return float(np.mean(values)) if values else 0.0


def knn_recall(approximate_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    """Recall@k of an approximate nearest-neighbour search against the exact answer.

    ``mean over queries of |ANN top-k ∩ exact top-k| / k`` (ids of -1 never count).

    Args:
        approximate_ids: [nq, >=k] ids from the approximate index.
        exact_ids: [nq, >=k] ids from an exact ``IndexFlatIP`` search.
        k: Cut-off.
    """
    _check_k(k)
    approximate_ids = np.asarray(approximate_ids)[:, :k]
    exact_ids = np.asarray(exact_ids)[:, :k]
    found = sum(len(set(a[a >= 0].tolist()) & set(e[e >= 0].tolist())) for a, e in zip(approximate_ids, exact_ids))
    return found / (k * len(exact_ids)) if len(exact_ids) else 0.0


def localization_ratio(
    retrieved_slices: Sequence[int],
    region_slices: Collection[int],
    localization_l: int | None = None,
    *,
    distinct_hits: bool = False,
) -> float:
    """Localization ratio of one retrieved volume (Khun Jush et al., eq. 2 and eq. 7).

    - ``localization_l=None`` (eq. 2, count-based retrieval): the hits in the retrieved volume
      whose slice contains the region of interest, divided by the hit count of that volume, as
      in the paper's example (12 of the 48 hits -> 0.25). A database slice hit by two query
      slices counts twice. ``distinct_hits=True`` divides by the distinct hit slices instead
      (the node's earlier variant).
    - ``localization_l=L`` (eq. 7, after re-ranking): the number of the ``L`` most similar slices
      (``retrieved_slices`` best first, from eq. 6) that contain the region, divided by ``L``
      (a volume with fewer than ``L`` slices cannot reach 1).

    Args:
        retrieved_slices: Slice indices in the retrieved volume: every hit (eq. 2), or the
            best-first slices of eq. 6 (eq. 7).
        region_slices: Slice indices of the retrieved volume that contain the region (ground truth).
        localization_l: L for eq. 7 (the paper uses 15), or None for eq. 2.
        distinct_hits: eq. 2 over distinct hit slices (an option; the paper counts hits).

    Returns:
        The ratio in [0, 1] (0 when nothing was retrieved).
    """
    region = set(region_slices)
    if localization_l is None:
        hits = list(dict.fromkeys(retrieved_slices)) if distinct_hits else list(retrieved_slices)
        return sum(s in region for s in hits) / len(hits) if hits else 0.0
    _check_k(localization_l)
    top = list(dict.fromkeys(retrieved_slices))[:localization_l]
    return sum(s in region for s in top) / localization_l if top else 0.0


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")

"""Retrieval modes on seeded synthetic studies whose right answers are known, and the metrics.

Cohort: 24 studies of 30 slices. Every slice embedding is ``anatomy[level] + protocol signature
+ noise``; the 6 slices of the study's abscess add a lesion-type signature and carry an ROI
embedding. Protocol (3 values) and lesion type (4 values) are independent, so a whole-volume
query should find studies of the same protocol, while a region or ROI query on the abscess
slices should find studies with the same lesion type, localised on their abscess slices.
"""

import numpy as np
import pytest

from index.metrics import (
    average_precision,
    knn_recall,
    localization_ratio,
    mean_average_precision,
    precision_at_k,
    recall_at_k,
)
from index.retrieval import (
    LesionFilter,
    SliceHit,
    count_based_ranking,
    descriptor_similarity,
    late_interaction,
    mixed_score,
    normalize_rows,
    study_passes,
)
from index.lesions import Lesion
from index.records import SliceRecord, StudyRecord
from index.store import CaseIndex

DIM = 32
LEVELS = 30
LESION_SLICES = 6
SPACES = ["parapharyngeal", "retropharyngeal", "submandibular", "peritonsillar"]


class Cohort:
    def __init__(self, seed: int = 3) -> None:
        self.rng = np.random.default_rng(seed)
        walk = np.cumsum(self.rng.standard_normal((LEVELS, DIM)), axis=0)
        self.anatomy = normalize_rows(walk)  # neighbouring levels look alike
        self.protocols = normalize_rows(self.rng.standard_normal((3, DIM))) * 0.6
        self.lesion_types = normalize_rows(self.rng.standard_normal((4, DIM))) * 1.2

    def study(self, protocol: int, lesion_type: int) -> dict:
        first = int(self.rng.integers(4, LEVELS - LESION_SLICES - 4))
        lesion = slice(first, first + LESION_SLICES)
        noise = 0.3 * self.rng.standard_normal((LEVELS, DIM)) / np.sqrt(DIM) * 4
        slices = self.anatomy + self.protocols[protocol] + noise
        slices[lesion] += self.lesion_types[lesion_type]
        rois = np.zeros_like(slices)
        rois[lesion] = (
            self.lesion_types[lesion_type] + 0.4 * self.rng.standard_normal((LESION_SLICES, DIM)) / np.sqrt(DIM) * 4
        )
        return {
            "protocol": protocol,
            "lesion_type": lesion_type,
            "lesion_range": (first, first + LESION_SLICES - 1),
            "slices": slices.astype(np.float32),
            "rois": rois.astype(np.float32),
            "lesions": [
                lesion_with(
                    volume_ml=2.0 + 3.0 * lesion_type + protocol,
                    loculi=1 + lesion_type % 2,
                    space=SPACES[lesion_type],
                    first_slice=first,
                    last_slice=first + LESION_SLICES - 1,
                )
            ],
        }


def lesion_with(**descriptors) -> Lesion:
    """A lesion with the given descriptors (the others: plausible constants)."""
    values = {"label": 1, "voxel_count": 100, "volume_ml": 1.0, "longest_axial_diameter_mm": 10.0,
              "core_mean_hu": 20.0, "core_sd_hu": 5.0, "loculi": 1, "first_slice": 0, "last_slice": 0}
    return Lesion(**{**values, **descriptors})


@pytest.fixture(scope="module")
def cohort_index(tmp_path_factory):
    cohort = Cohort()
    index = CaseIndex.open(tmp_path_factory.mktemp("cohort"), hnsw_m=16, ef_construction=100)
    studies = {}
    for protocol in range(3):
        for lesion_type in range(4):
            for replicate in range(2):
                uid = f"1.3.{protocol}.{lesion_type}.{replicate}"
                study = cohort.study(protocol, lesion_type)
                index.replace_study(
                    StudyRecord(uid, study_description=f"protocol {protocol}"),
                    [SliceRecord(i, f"{uid}.{i}") for i in range(LEVELS)],
                    study["slices"],
                    study["rois"],
                    study["lesions"],
                )
                studies[uid] = study
    yield cohort, index, studies
    index.close()


def relevant(studies, key, value):
    return {uid for uid, study in studies.items() if study[key] == value}


def queries(cohort, count=6):
    return [cohort.study(protocol=i % 3, lesion_type=i % 4) for i in range(count)]


def test_slice_wise_knn_finds_the_same_lesion_type(cohort_index):
    cohort, index, studies = cohort_index
    query = cohort.study(protocol=0, lesion_type=2)
    first, last = query["lesion_range"]
    hits = index.search_slices(query["slices"][first : last + 1], k=5, query_slice_indices=range(first, last + 1))
    same_type = relevant(studies, "lesion_type", 2)
    precision = np.mean([precision_at_k([h.study_uid for h in row], same_type, 5) for row in hits])
    assert precision >= 0.8
    assert [row[0].query_slice_index for row in hits] == list(range(first, last + 1))


@pytest.mark.parametrize("rerank", [False, True])
def test_volume_query_ranks_studies_of_the_same_protocol(cohort_index, rerank):
    cohort, index, studies = cohort_index
    runs = []
    for query in queries(cohort):
        results = index.search_studies(query["slices"], k=5, top=8, rerank=rerank)
        same_protocol = relevant(studies, "protocol", query["protocol"])
        ranked = [hit.study_uid for hit in results]
        assert recall_at_k(ranked, same_protocol, 8) >= 0.75
        assert ranked[0] in same_protocol
        runs.append((ranked, same_protocol))
        assert [hit.rank for hit in results] == list(range(1, len(results) + 1))
        assert results[0].mode == ("slice:late_interaction" if rerank else "slice:count")
    assert mean_average_precision(runs) >= 0.8


def test_count_based_ranking_orders_by_hits(cohort_index):
    cohort, index, _ = cohort_index
    query = cohort.study(protocol=1, lesion_type=1)
    results = index.search_studies(query["slices"], k=5, top=24, rerank=False)
    counts = [hit.hit_count for hit in results]
    assert counts == sorted(counts, reverse=True)
    assert sum(counts) == LEVELS * 5  # every retrieved slice is one hit of some study
    assert results[0].score == pytest.approx(counts[0] / (LEVELS * 5))
    assert results[0].late_interaction_score is None
    assert len(results[0].best_slices) == counts[0]


def test_late_interaction_score_is_eq_5_on_the_stored_embeddings(cohort_index):
    cohort, index, _ = cohort_index
    query = cohort.study(protocol=2, lesion_type=0)
    (best,) = index.search_studies(query["slices"], k=5, top=1)
    _, candidate = index.study_embeddings(best.study_uid)
    similarity = normalize_rows(query["slices"]) @ candidate.T
    assert best.late_interaction_score == pytest.approx(similarity.max(axis=1).sum(), rel=1e-5)
    assert best.score == pytest.approx(best.late_interaction_score / LEVELS, rel=1e-5)
    # eq. 6: the L slices with the largest column maxima, best first.
    column_max = similarity.max(axis=0)
    assert [pair[1] for pair in best.best_slices] == np.argsort(-column_max, kind="stable")[:15].tolist()


@pytest.mark.parametrize("rerank", [False, True])
def test_region_query_finds_the_lesion_type_and_localises_it(cohort_index, rerank):
    cohort, index, studies = cohort_index
    ratios, runs = [], []
    for query in queries(cohort):
        results = index.search_studies(
            query["slices"],
            slice_range=query["lesion_range"],
            k=10,
            top=len(studies),
            rerank=rerank,
            localization_l=LESION_SLICES,
        )
        same_type = relevant(studies, "lesion_type", query["lesion_type"])
        ranked = [hit.study_uid for hit in results]
        runs.append((ranked, same_type))
        assert ranked[0] in same_type
        top = results[0]
        first, last = studies[top.study_uid]["lesion_range"]
        retrieved = [slice_index for _, slice_index, _ in top.best_slices]
        region = range(first, last + 1)
        ratios.append(localization_ratio(retrieved, region, None if not rerank else LESION_SLICES))
        query_first, query_last = query["lesion_range"]
        assert all(query_first <= q <= query_last for q, _, _ in top.best_slices)
    assert mean_average_precision(runs) >= 0.8
    assert np.mean(ratios) >= 0.75


def test_roi_query_searches_the_roi_index(cohort_index):
    cohort, index, studies = cohort_index
    for query in queries(cohort, 4):
        results = index.search_studies(query["rois"], space="roi", k=5, top=4, localization_l=LESION_SLICES)
        same_type = relevant(studies, "lesion_type", query["lesion_type"])
        assert precision_at_k([hit.study_uid for hit in results], same_type, 4) >= 0.75
        top = results[0]
        first, last = studies[top.study_uid]["lesion_range"]
        assert all(first <= s <= last for _, s, _ in top.best_slices)  # ROI rows exist only there
        assert top.mode == "roi:late_interaction"


@pytest.mark.parametrize("options", [{}, {"rerank": False}, {"space": "roi"}, {"use_descriptors": True}])
def test_the_query_study_is_never_returned(cohort_index, options):
    _, index, studies = cohort_index
    for uid in list(studies)[::5]:
        results = index.similar_studies(uid, top=30, k=20, **options)
        assert results and uid not in {hit.study_uid for hit in results}


def test_similar_studies_by_region_of_an_indexed_study(cohort_index):
    _, index, studies = cohort_index
    uid = "1.3.1.3.0"
    results = index.similar_studies(uid, slice_range=studies[uid]["lesion_range"], top=2)
    assert results[0].study_uid == "1.3.1.3.1"  # same protocol and lesion type
    assert results[0].lesions[0].space == SPACES[3]
    assert results[0].study.study_description == "protocol 1"
    query_slice, matched_slice, similarity = results[0].best_slices[0]
    assert studies[uid]["lesion_range"][0] <= query_slice <= studies[uid]["lesion_range"][1]
    assert 0 <= matched_slice < LEVELS and -1.0 <= similarity <= 1.0


@pytest.mark.parametrize(
    ("filters", "check"),
    [
        (["loculi>=2"], lambda lesion: lesion.loculi >= 2),
        (["volume_ml > 5"], lambda lesion: lesion.volume_ml > 5),
        (["space=Parapharyngeal"], lambda lesion: lesion.space == "parapharyngeal"),
        (
            ["space!=parapharyngeal", "loculi<2"],
            lambda lesion: lesion.space != "parapharyngeal" and lesion.loculi < 2,
        ),
    ],
)
def test_descriptor_post_filters(cohort_index, filters, check):
    cohort, index, _ = cohort_index
    query = cohort.study(protocol=0, lesion_type=0)
    results = index.search_studies(query["slices"], k=10, top=24, filters=filters)
    assert results
    assert all(any(check(lesion) for lesion in hit.lesions) for hit in results)


def test_mixed_score_blends_image_and_descriptor_similarity(cohort_index):
    cohort, index, _ = cohort_index
    query = cohort.study(protocol=2, lesion_type=1)
    wanted = {"space": "submandibular", "loculi": 1, "volume_ml": 8.0}
    only_descriptors = index.search_studies(query["slices"], k=10, top=5, query_descriptors=wanted, image_weight=0.0)
    assert only_descriptors[0].lesions[0].space == "submandibular"
    assert only_descriptors[0].score == only_descriptors[0].descriptor_score
    blended = index.search_studies(query["slices"], k=10, top=10, query_descriptors=wanted, image_weight=0.6)
    for hit in blended:
        assert hit.score == pytest.approx(0.6 * hit.image_score + 0.4 * hit.descriptor_score)
        assert hit.mode == "slice:late_interaction+descriptors"
    assert [hit.score for hit in blended] == sorted((hit.score for hit in blended), reverse=True)
    image_only = index.search_studies(query["slices"], k=10, top=10)
    with_full_weight = index.search_studies(query["slices"], k=10, top=10, query_descriptors=wanted, image_weight=1.0)
    assert [h.study_uid for h in with_full_weight] == [h.study_uid for h in image_only]
    with pytest.raises(ValueError, match="image_weight"):
        index.search_studies(query["slices"], query_descriptors=wanted, image_weight=1.5)


# -- pure building blocks -------------------------------------------------------------------


def test_hit_table_counts_and_breaks_ties_by_similarity_then_uid():
    hits = [
        SliceHit(0, "b", 1, "", 0.9),
        SliceHit(1, "b", 2, "", 0.8),
        SliceHit(0, "a", 5, "", 0.95),
        SliceHit(1, "a", 6, "", 0.75),
        SliceHit(2, "c", 0, "", 0.5),
        SliceHit(3, "d", 0, "", 0.5),
    ]
    table = count_based_ranking(hits)
    assert [(row.study_uid, row.hit_count) for row in table] == [("b", 2), ("a", 2), ("c", 1), ("d", 1)]
    assert table[1].hits == [(0, 5, 0.95), (1, 6, 0.75)]


def test_late_interaction_on_a_hand_computed_example():
    query = np.array([[1.0, 0.0], [0.0, 1.0]])
    candidate = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    score, best = late_interaction(query, candidate, [10, 11], [0, 1, 2], localization_l=2)
    assert score == pytest.approx(1.0 + 1.0)  # each query slice has an identical candidate slice
    assert best == [(10, 0, pytest.approx(1.0)), (11, 2, pytest.approx(1.0))]


def test_filter_parsing_and_same_lesion_semantics():
    assert LesionFilter.parse(" loculi >= 2 ") == LesionFilter("loculi", ">=", 2.0)
    assert LesionFilter.parse("space=Retropharyngeal").value == "retropharyngeal"
    lesions = [lesion_with(loculi=3, volume_ml=1.0), lesion_with(loculi=1, volume_ml=10.0)]
    filters = [LesionFilter.parse("loculi>=2"), LesionFilter.parse("volume_ml>5")]
    assert study_passes(lesions, filters[:1]) and study_passes(lesions, filters[1:])
    assert not study_passes(lesions, filters)  # no single lesion satisfies both
    assert not study_passes([], filters[:1]) and study_passes([], [])
    for bad, message in [
        ("loculi", "cannot parse"),
        ("size>3", "unknown lesion descriptor"),
        ("loculi>=many", "needs a number"),
        ("space>a", "only"),
    ]:
        with pytest.raises(ValueError, match=message):
            LesionFilter.parse(bad)


def test_descriptor_similarity_and_mixed_score():
    lesions = [lesion_with(volume_ml=10.0, loculi=2, space="parapharyngeal", core_mean_hu=20.0)]
    assert descriptor_similarity({"volume_ml": 10.0, "space": "PARAPHARYNGEAL"}, lesions) == 1.0
    assert descriptor_similarity({"volume_ml": 5.0}, lesions) == pytest.approx(0.5)
    assert descriptor_similarity({"core_mean_hu": 70.0, "loculi": 1}, lesions) == pytest.approx((0.5 + 0.5) / 2)
    assert descriptor_similarity({"volume_ml": 5.0}, []) == 0.0
    assert mixed_score(0.8, 0.2, 0.7) == pytest.approx(0.62)


def test_metrics_on_known_rankings():
    ranked = ["a", "x", "b", "y", "c"]
    assert recall_at_k(ranked, {"a", "b", "c"}, 3) == pytest.approx(2 / 3)
    assert precision_at_k(ranked, {"a", "b", "c"}, 5) == pytest.approx(3 / 5)
    assert precision_at_k(["a"], {"a"}, 4) == pytest.approx(1 / 4)  # eq. 3 divides by K
    assert average_precision(ranked, {"a", "b", "c"}) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    assert average_precision(["x", "a"], {"a", "z"}) == pytest.approx((1 / 2) / 2)
    assert mean_average_precision([(["a"], {"a"}), (["x"], {"a"})]) == pytest.approx(0.5)
    assert knn_recall(np.array([[1, 2, 3], [4, 5, -1]]), np.array([[3, 2, 1], [4, 6, 7]]), 3) == pytest.approx(4 / 6)


def test_localization_ratio_eq_2_and_eq_7():
    # The paper's eq. 2 example: 12 of the 48 slices hit in the top volume contain the region.
    hit_slices = list(range(48))
    assert localization_ratio(hit_slices, set(range(12))) == pytest.approx(0.25)
    # eq. 2 divides by the hit count: a slice hit by two query slices counts twice
    assert localization_ratio([1, 1, 2, 9], {1, 2}) == pytest.approx(3 / 4)
    assert localization_ratio([1, 1, 2, 9], {1, 2}, distinct_hits=True) == pytest.approx(2 / 3)  # the option
    best_first = [5, 6, 7, 40, 41] + list(range(20, 30))
    assert localization_ratio(best_first, set(range(10)), 15) == pytest.approx(3 / 15)
    assert localization_ratio(best_first, set(range(10)), 3) == 1.0
    assert localization_ratio([5, 6], set(range(10)), 15) == pytest.approx(2 / 15)  # eq. 7 divides by L

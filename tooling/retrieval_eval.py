"""Retrieval evaluation of the case index on a cohort with known answers.

``python -m tooling.retrieval_eval [--weights PATH] [--cases N] [--seed S] [--out DIR] [--cohort NPZ]``

The protocol is Khun Jush et al. 2024 (slice-wise, volume-based, region-based and localized
retrieval; count-based ranking with and without late-interaction re-ranking; localization
ratio, eq. 2 and eq. 7 with L = 15) and Lee & Kim (Precision@K per organ, eq. 3-4; ROI
embeddings). Every number comes from the real :class:`index.store.CaseIndex` (FAISS HNSW +
SQLite) and the real retrieval modes.

Package boundary
----------------
``index`` never runs a model. The cohort (studies, segmenter embeddings, predicted masks,
ground truth) is produced by :mod:`tooling.cohort` into an ``.npz`` file that this module
reads with plain numpy. With ``--cohort NPZ`` the evaluation only reads that file. Without
it the CLI is a one-shot convenience: it imports :mod:`tooling.cohort` *lazily, inside*
:func:`main`, builds ``DIR/cohort.npz`` and then evaluates it; nothing else in this module
imports ``models`` or ``torch``. The cohort holds the masks as the node keeps them (after the
plausibility rules) and each kept lesion's deep neck space and side from the node's anatomy.

Cohort (see :mod:`tooling.cohort`)
---------------------------------
* **Abscess studies**: real head-and-neck CT with 1-2 inserted abscesses of known deep neck
  space, volume and loculi. Each study is indexed as the node indexes a study: slice
  embeddings, ROI embeddings (pooled over the *predicted* mask, kept on the slices that hold a
  plausible lesion) and the lesion descriptors of
  :func:`index.lesions.measure_lesions` on the predicted mask after the plausibility rules,
  each with the deep neck space and side the node's anatomy gave it (never the ground truth).
* **Organ studies**: augmented, z-cropped copies of the TotalSegmentator-labelled real CT of
  DATA.md (neck-chest and abdomen), indexed with their slice embeddings, in a second index.

Relevance (per query type, as the paper defines it per class)
-------------------------------------------------------------
Abscess queries are anchored on one ground-truth lesion (its class) or, for whole-volume
queries, on every lesion of the query study (one evaluation per distinct class). Protocol
(default ``other-host``, as the seed keeps its query cases out of its database): a query
study searches an index holding only the studies of the *other* host CTs, so no augmented copy
of its own scan can answer; ``--protocol any-study`` (the earlier variant) searches every
other study. Four relevance definitions are evaluated, each giving its own table set:

* ``space``: a study (slice) is relevant when it has a lesion in the same deep neck space
  (a slice: when it shows such a lesion). Classes: the deep neck spaces.
* ``loculi``: same loculi class (unilocular / multiloculated).
* ``size``: same size class (small < 3 ml <= medium < 6 ml <= large).
* ``space+loculi``: same space *and* loculi class on one lesion (the natural target of the
  mixed, descriptor-weighted queries).

Organ queries (class = a coarse organ): a study is relevant when it contains the organ, a
slice when it shows it (at least ``min_organ_pixels`` labelled pixels). Two variants
(:data:`ORGAN_VARIANTS`): ``any copy`` lets the other augmented copies of the query's own CT
answer (near-duplicates: an easy upper bound); ``other scan`` removes them, so only the other
real CT can answer (the neck-chest CT reaches the upper abdomen, so many organs are shared).

Retrieval modes (rows of the tables)
------------------------------------
* ``slice-wise``: every query slice (abscess: the lesion's slices; organ: up to
  ``MAX_QUERY_SLICES`` slices showing the organ) retrieves its ``k`` = 10 nearest slices
  (eq. 1); items are slices.
* ``volume``: the whole query study, hit table of the single most similar slice per query
  slice (eq. 1, ``--knn`` 1) and count-based ranking (sec. 2.4.1); with re-ranking: late
  interaction (eq. 5) over every study with a hit (no cap).
* ``region``: the smallest slice range that contains the query lesion / organ (sec. 2.4.2);
  count-based and re-ranked. Localization (sec. 2.4.3) is scored on the top-1 study.
* ``ROI``: abscess: the query lesion's ROI embeddings (encoder features pooled over the
  ground-truth mask, the region a reader would draw) searched in the ROI index (pooled over
  the predicted masks). Organ: organ-mask-pooled query embeddings (Lee & Kim's ROI embedding
  selector) searched in the slice index (slice-wise and region).
* ``random (baseline)``: the other studies in random order, each with L random slices as its
  matched slices (Lee & Kim's "Random" row): the chance level of every column.
* ``mixed``: the region query plus the query lesion's ground-truth descriptors (space,
  loculi, volume, diameter) blended into the score (``w = 0.7`` image, 0.3 descriptors).

Metrics (columns)
-----------------
* ``R@K``: recall as in Khun Jush et al.: the share of queries with at least one relevant
  item among the top K (a true positive when a relevant volume is retrieved).
* ``mAP``: mean of :func:`index.metrics.average_precision` over the full returned ranking
  (study modes; relevant studies that were never retrieved count 0). Slice-wise: AP over the
  10 retrieved slices normalised by ``min(|relevant|, 10)``.
* ``P@K``: :func:`index.metrics.precision_at_k` (Lee & Kim eq. 3; eq. 4 averages classes).
* ``LR``: localization ratio of the top-1 study (:func:`index.metrics.localization_ratio`):
  eq. 2 without re-ranking (its hits that show the region over its hit count, the paper's
  12/48), eq. 7 with re-ranking (of its L = 15 best slices, those showing the region, over L); the region is the retrieved study's ground-truth abscess slices (any lesion) /
  the slices showing the organ.
* ``LocR@1``: localized recall (sec. 2.4.3): the top-1 study is relevant *and* at least one of
  its matched slices shows the relevant lesion / organ.

Every metric is averaged over the queries of a class; the summary rows give the mean and the
standard deviation over classes (the "Average" and "STD" of the seeds' tables). Queries whose
class has no relevant item left in the index are skipped and counted.
"""

from __future__ import annotations

import argparse
import re
import json
import logging
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from index.metrics import average_precision, localization_ratio, precision_at_k
from index.lesions import Lesion, measure_lesions
from index.retrieval import DEFAULT_IMAGE_WEIGHT, HIT_TABLE_K, LOCALIZATION_L
from index.records import SliceRecord, StudyRecord
from index.store import CaseIndex

__all__ = [
    "METRICS",
    "ORGAN_VARIANTS",
    "PHANTOM_RELEVANCE",
    "Cohort",
    "evaluate",
    "format_report",
    "load_cohort",
    "main",
]

RECALL_KS = (1, 5, 10)
PRECISION_KS = (1, 3, 5, 10)
METRICS = (*(f"R@{k}" for k in RECALL_KS), "mAP", *(f"P@{k}" for k in PRECISION_KS), "LR", "LocR@1")
"""Columns of every table."""
PHANTOM_RELEVANCE = ("space", "loculi", "size", "space+loculi")
"""Relevance definitions of the abscess queries (see the module docstring)."""
SLICE_K = 10
"""Neighbours per query slice in slice-wise mode."""
DEFAULT_KNN = HIT_TABLE_K
"""Neighbours per query slice for the hit table of the study modes (1, the paper's; larger
values are an option of the CLI)."""
PROTOCOLS = ("other-host", "any-study")
"""Who may answer an abscess query: studies of other host CTs only (default), or any other study."""
MAX_QUERY_SLICES = 10
"""Organ slice-wise queries: at most this many evenly spaced slices per (study, organ)."""

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- cohort file


@dataclass
class PhantomStudy:
    """One abscess study of the cohort file (see :mod:`tooling.cohort` for the layout)."""

    study_uid: str
    record: dict[str, Any]
    slice_embeddings: np.ndarray
    roi_embeddings: np.ndarray
    predicted_mask: np.ndarray
    predicted_hu: np.ndarray
    gt_labels: np.ndarray
    lesion_roi: dict[int, tuple[np.ndarray, np.ndarray]]
    """label -> (slice indices, ROI embeddings pooled over the ground-truth lesion mask)."""

    @property
    def lesions(self) -> list[dict[str, Any]]:
        """Ground-truth lesion records (space, loculi, volume, classes, slices)."""
        return self.record["lesions"]


@dataclass
class OrganStudy:
    """One organ-labelled study of the cohort file."""

    study_uid: str
    record: dict[str, Any]
    slice_embeddings: np.ndarray
    organ_roi: dict[str, tuple[np.ndarray, np.ndarray]]
    """organ -> (slice indices, embeddings pooled over the organ mask)."""

    @property
    def organ_slices(self) -> dict[str, list[int]]:
        """organ -> slice indices that show it."""
        return self.record["organ_slices"]


@dataclass
class Cohort:
    """A cohort file in memory: its manifest, abscess studies and organ studies."""

    manifest: dict[str, Any]
    phantoms: list[PhantomStudy]
    organs: list[OrganStudy]


def load_cohort(path: str | Path) -> Cohort:
    """Read a cohort ``.npz`` written by ``python -m tooling.cohort`` (numpy only).

    Raises:
        ValueError: If the file is not a cohort file of a known format version.
    """
    with np.load(path, allow_pickle=False) as data:
        if "manifest" not in data:
            raise ValueError(
                f"{path} is not a retrieval cohort file (no manifest); make one with python -m tooling.cohort"
            )
        manifest = json.loads(str(data["manifest"]))
        if manifest.get("format_version") != 1:
            raise ValueError(f"{path}: unknown cohort format version {manifest.get('format_version')!r}")
        phantoms = []
        for record in manifest["phantoms"]:
            prefix = f"phantom_{record['index']}"
            predicted = data[f"{prefix}_pred_mask"]
            hu = np.full(predicted.shape, -1024.0, dtype=np.float32)
            hu[predicted] = data[f"{prefix}_pred_hu"]
            rois = {
                lesion["label"]: (
                    data[f"{prefix}_lesion_{lesion['label']}_slices"],
                    data[f"{prefix}_lesion_{lesion['label']}_roi"],
                )
                for lesion in record["lesions"]
            }
            phantoms.append(
                PhantomStudy(
                    study_uid=record["study_uid"],
                    record=record,
                    slice_embeddings=data[f"{prefix}_slice"],
                    roi_embeddings=data[f"{prefix}_roi"],
                    predicted_mask=predicted,
                    predicted_hu=hu,
                    gt_labels=data[f"{prefix}_gt_labels"],
                    lesion_roi=rois,
                )
            )
        organs = []
        for record in manifest["organs"]:
            prefix = f"organ_{record['index']}"
            rois = {
                organ: (data[f"{prefix}_roi_{organ}_slices"], data[f"{prefix}_roi_{organ}"])
                for organ in record["organ_slices"]
            }
            organs.append(OrganStudy(record["study_uid"], record, data[f"{prefix}_slice"], rois))
    return Cohort(manifest, phantoms, organs)


# --------------------------------------------------------------------------- query results


@dataclass
class Evaluated:
    """One scored query: its class and its metric values (None: not applicable)."""

    mode: str
    cls: str
    values: dict[str, float | None]


@dataclass
class StudyRun:
    """A study-level query: the ranking and, per retrieved study, its matched slices."""

    query_study: str
    ranked: list[str]
    matched: dict[str, list[int]]
    localize: bool
    rerank: bool


@dataclass
class SliceRun:
    """A slice-wise query: the retrieved (study, slice) pairs, best first."""

    query_study: str
    ranked: list[tuple[str, int]]


@dataclass
class Table:
    """Per-class metric means of one retrieval mode, plus query counts."""

    mode: str
    rows: dict[str, dict[str, float | None]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, tuple[float | None, float | None]]:
        """metric -> (mean over classes, std over classes)."""
        out: dict[str, tuple[float | None, float | None]] = {}
        for metric in METRICS:
            values = [row[metric] for row in self.rows.values() if row.get(metric) is not None]
            out[metric] = (float(np.mean(values)), float(np.std(values))) if values else (None, None)
        return out


def _hit_at(ranked: Sequence[Any], relevant: set[Any], k: int) -> float:
    return float(any(item in relevant for item in ranked[:k]))


def _ranking_metrics(ranked: Sequence[Any], relevant: set[Any], ap_normaliser: int | None = None) -> dict[str, float]:
    values: dict[str, float] = {f"R@{k}": _hit_at(ranked, relevant, k) for k in RECALL_KS}
    if ap_normaliser is None:
        values["mAP"] = average_precision(ranked, relevant)
    else:
        found, total = 0, 0.0
        for rank, item in enumerate(ranked, start=1):
            if item in relevant:
                found += 1
                total += found / rank
        values["mAP"] = total / ap_normaliser if ap_normaliser else 0.0
    for k in PRECISION_KS:
        values[f"P@{k}"] = precision_at_k(ranked, relevant, k)
    return values


def _study_metrics(
    run: StudyRun,
    relevant: set[str],
    region_of: Callable[[str], set[int]],
    relevant_region_of: Callable[[str], set[int]],
    localization_l: int,
) -> dict[str, float | None]:
    values: dict[str, float | None] = dict(_ranking_metrics(run.ranked, relevant))
    values["LR"] = values["LocR@1"] = None
    if run.localize:
        if run.ranked:
            top = run.ranked[0]
            matched = run.matched.get(top, [])
            values["LR"] = localization_ratio(matched, region_of(top), localization_l if run.rerank else None)
            values["LocR@1"] = float(top in relevant and bool(set(matched) & relevant_region_of(top)))
        else:
            values["LR"] = values["LocR@1"] = 0.0
    return values


def _tables(evaluated: Iterable[Evaluated]) -> dict[str, Table]:
    grouped: dict[str, dict[str, list[dict[str, float | None]]]] = defaultdict(lambda: defaultdict(list))
    for item in evaluated:
        grouped[item.mode][item.cls].append(item.values)
    tables = {}
    for mode, classes in grouped.items():
        table = Table(mode)
        for cls in sorted(classes):
            runs = classes[cls]
            row: dict[str, float | None] = {}
            for metric in METRICS:
                values = [run[metric] for run in runs if run.get(metric) is not None]
                row[metric] = float(np.mean(values)) if values else None
            table.rows[cls], table.counts[cls] = row, len(runs)
        tables[mode] = table
    return tables


def _random_run(
    query_study: str, candidates: dict[str, int], rng: np.random.Generator, localization_l: int
) -> StudyRun:
    """The random baseline (as Lee & Kim's "Random"): a random order of the candidate studies and,
    for each, ``L`` random slices as its "best" slices (scored with eq. 7)."""
    ranked = [uid for uid in candidates if uid != query_study]
    ranked = [ranked[i] for i in rng.permutation(len(ranked))]
    matched = {
        uid: rng.choice(candidates[uid], size=min(localization_l, candidates[uid]), replace=False).tolist()
        for uid in ranked
    }
    return StudyRun(query_study, ranked, matched, True, True)


def _study_hits_to_run(hits: Sequence[Any], query_study: str, localize: bool, rerank: bool) -> StudyRun:
    matched = {hit.study_uid: [slice_index for _, slice_index, _ in hit.best_slices] for hit in hits}
    return StudyRun(query_study, [hit.study_uid for hit in hits], matched, localize, rerank)


# --------------------------------------------------------------------------- abscess cohort


def _lesion_key(lesion: dict[str, Any], definition: str) -> str:
    if definition == "space":
        return lesion["space"]
    if definition == "loculi":
        return lesion["loculi_class"]
    if definition == "size":
        return lesion["size_class"]
    if definition == "space+loculi":
        return f"{lesion['space']}+{lesion['loculi_class']}"
    raise ValueError(f"unknown relevance definition {definition!r}; use one of {PHANTOM_RELEVANCE}")


def _as_the_node_indexes(study: PhantomStudy) -> tuple[list[Lesion], np.ndarray]:
    """What the node indexes for the study: the lesions of its kept mask with the deep neck space
    and side the node's anatomy gave them (never the ground truth), and its ROI embeddings."""
    if not study.predicted_mask.any():
        return [], study.roi_embeddings
    lesions = measure_lesions(study.predicted_mask, study.predicted_hu, tuple(study.record["spacing_mm"]))
    located = study.record.get("predicted_locations", [])
    return [lesion.located(*location) for lesion, location in zip(lesions, located)], study.roi_embeddings


def _index_phantoms(index: CaseIndex, studies: Sequence[PhantomStudy],
                    indexed: dict[str, tuple[list[Lesion], np.ndarray]]) -> None:
    for study in studies:
        lesions, roi = indexed[study.study_uid]
        index.replace_study(
            StudyRecord(
                study.study_uid,
                patient_id=study.record["case_id"],
                modalities=("CT",),
                extra={"host": study.record["host"]},
            ),
            [SliceRecord(z) for z in range(len(study.slice_embeddings))],
            study.slice_embeddings,
            roi,
            lesions,
        )


def evaluate_phantoms(
    cohort: Cohort, workdir: Path, knn: int = DEFAULT_KNN, localization_l: int = LOCALIZATION_L,
    protocol: str = "other-host",
) -> dict[str, Any]:
    """Run every abscess query mode on the abscess studies and score them per relevance definition.

    Args:
        cohort: The loaded cohort.
        workdir: Folder for the temporary case index.
        knn: Neighbours per query slice in the study modes.
        localization_l: L of eq. 7.
        protocol: one of :data:`PROTOCOLS` (who may answer a query).

    Returns:
        ``tables`` (definition -> mode -> :class:`Table`), ``skipped`` (definition -> number
        of queries without a relevant item), ``sanity`` (self-retrieval checks), ``indexed``
        (per-study predicted lesion counts and ROI vector counts).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    studies = cohort.phantoms
    host_of = {study.study_uid: study.record["host"] for study in studies}
    index = CaseIndex.open(workdir / "abscess-index")
    without_host: dict[str, CaseIndex] = {}
    try:
        indexed_as = {study.study_uid: _as_the_node_indexes(study) for study in studies}
        measured = {uid: lesions for uid, (lesions, _) in indexed_as.items()}
        _index_phantoms(index, studies, indexed_as)
        if protocol == "other-host":
            for host in sorted(set(host_of.values())):
                without_host[host] = CaseIndex.open(workdir / f"abscess-index-without-{host}")
                _index_phantoms(without_host[host], [s for s in studies if host_of[s.study_uid] != host], indexed_as)

        def searched(uid: str) -> CaseIndex:
            return without_host.get(host_of[uid], index)

        def answerable(uid: str) -> set[str]:
            return {other for other in host_of if other != uid
                    and (protocol == "any-study" or host_of[other] != host_of[uid])}

        top = len(studies)
        lesion_slices = {s.study_uid: {lesion["label"]: set(lesion["slices"]) for lesion in s.lesions} for s in studies}
        abscess_slices = {uid: set().union(*parts.values()) if parts else set() for uid, parts in lesion_slices.items()}

        # -- run every query once ------------------------------------------------------------
        slice_runs: list[tuple[SliceRun, dict[str, Any]]] = []
        study_runs: list[tuple[str, StudyRun, list[dict[str, Any]]]] = []
        sanity_volume, sanity_region = [], []
        rng = np.random.default_rng(0)
        slice_counts = {study.study_uid: len(study.slice_embeddings) for study in studies}
        for study in studies:
            uid = study.study_uid
            # slice-wise: every ground-truth lesion slice
            for lesion in study.lesions:
                rows = np.asarray(lesion["slices"], dtype=np.int64)
                hits = searched(uid).search_slices(
                    study.slice_embeddings[rows], SLICE_K, query_slice_indices=rows.tolist(), exclude_study_uid=uid
                )
                for row_hits in hits:
                    ranked = [(hit.study_uid, hit.slice_index) for hit in row_hits]
                    slice_runs.append((SliceRun(uid, ranked), lesion))
            # volume: the whole study (every class of its lesions)
            for rerank in (False, True):
                hits = searched(uid).search_studies(
                    study.slice_embeddings,
                    k=knn,
                    top=top,
                    rerank=rerank,
                    exclude_study_uid=uid,
                    localization_l=localization_l,
                )
                study_runs.append(("volume", _study_hits_to_run(hits, uid, False, rerank), study.lesions))
            for lesion in study.lesions:
                first, last = min(lesion["slices"]), max(lesion["slices"])
                roi_rows, roi_vectors = study.lesion_roi[lesion["label"]]
                descriptors = {
                    key: lesion[key] for key in ("space", "loculi", "volume_ml", "longest_axial_diameter_mm")
                }
                for rerank in (False, True):
                    common = {
                        "k": knn,
                        "top": top,
                        "rerank": rerank,
                        "exclude_study_uid": uid,
                        "localization_l": localization_l,
                    }
                    hits = searched(uid).search_studies(study.slice_embeddings, slice_range=(first, last), **common)
                    study_runs.append(("region", _study_hits_to_run(hits, uid, True, rerank), [lesion]))
                    hits = searched(uid).search_studies(roi_vectors, space="roi", query_slice_indices=roi_rows, **common)
                    study_runs.append(("ROI", _study_hits_to_run(hits, uid, True, rerank), [lesion]))
                    hits = searched(uid).search_studies(
                        study.slice_embeddings,
                        slice_range=(first, last),
                        query_descriptors=descriptors,
                        image_weight=DEFAULT_IMAGE_WEIGHT,
                        **common,
                    )
                    study_runs.append(("mixed", _study_hits_to_run(hits, uid, True, rerank), [lesion]))
                candidates = {other: slice_counts[other] for other in sorted(answerable(uid))}
                study_runs.append(("random", _random_run(uid, candidates, rng, localization_l), [lesion]))
                # sanity: the study itself is not excluded; with k = 1 every query slice finds itself
                hits = index.search_studies(
                    study.slice_embeddings, slice_range=(first, last), k=1, top=top, rerank=False
                )
                run = _study_hits_to_run(hits, uid, True, False)
                sanity_region.append(
                    localization_ratio(run.matched.get(uid, []), lesion_slices[uid][lesion["label"]])
                    if run.ranked and run.ranked[0] == uid
                    else 0.0
                )
            hits = index.search_studies(study.slice_embeddings, k=1, top=top, rerank=False)
            sanity_volume.append(float(bool(hits) and hits[0].study_uid == uid))

        # -- score them per relevance definition --------------------------------------------
        tables: dict[str, dict[str, Table]] = {}
        skipped: dict[str, int] = {}
        for definition in PHANTOM_RELEVANCE:
            relevant_studies: dict[str, set[str]] = defaultdict(set)
            relevant_slices: dict[str, set[tuple[str, int]]] = defaultdict(set)
            class_region: dict[tuple[str, str], set[int]] = defaultdict(set)
            for study in studies:
                for lesion in study.lesions:
                    key = _lesion_key(lesion, definition)
                    relevant_studies[key].add(study.study_uid)
                    relevant_slices[key].update((study.study_uid, z) for z in lesion["slices"])
                    class_region[(study.study_uid, key)].update(lesion["slices"])
            evaluated: list[Evaluated] = []
            skipped[definition] = 0
            for run, lesion in slice_runs:
                key = _lesion_key(lesion, definition)
                allowed = answerable(run.query_study)
                relevant = {item for item in relevant_slices[key] if item[0] in allowed}
                if not relevant:
                    skipped[definition] += 1
                    continue
                values: dict[str, float | None] = dict(
                    _ranking_metrics(run.ranked, relevant, ap_normaliser=min(len(relevant), SLICE_K))
                )
                values["LR"] = values["LocR@1"] = None
                evaluated.append(Evaluated("slice-wise", key, values))
            for mode, run, lesions in study_runs:
                label = (
                    "random (baseline)" if mode == "random" else f"{mode} ({'re-ranked' if run.rerank else 'count'})"
                )
                for key in sorted({_lesion_key(lesion, definition) for lesion in lesions}):
                    relevant = relevant_studies[key] & answerable(run.query_study)
                    if not relevant:
                        skipped[definition] += 1
                        continue
                    values = _study_metrics(
                        run,
                        relevant,
                        lambda uid: abscess_slices[uid],
                        lambda uid, key=key, regions=class_region: regions.get((uid, key), set()),
                        localization_l,
                    )
                    evaluated.append(Evaluated(label, key, values))
            tables[definition] = _tables(evaluated)
        indexed = {
            "predicted_lesions": sum(len(v) for v in measured.values()),
            "studies_with_predicted_lesion": sum(bool(v) for v in measured.values()),
            "predicted_lesions_with_space": sum(1 for v in measured.values() for les in v if les.space),
            "roi_vectors": index.vector_count("roi"),
            "slice_vectors": index.vector_count("slice"),
            "ground_truth_lesions": sum(len(s.lesions) for s in studies),
            "lesion_slices": sum(len(abscess_slices[s.study_uid]) for s in studies),
        }
        sanity = {
            "self_volume_R@1": float(np.mean(sanity_volume)) if sanity_volume else None,
            "self_region_LR_count": float(np.mean(sanity_region)) if sanity_region else None,
        }
    finally:
        index.close()
        for other in without_host.values():
            other.close()
    return {"tables": tables, "skipped": skipped, "sanity": sanity, "indexed": indexed, "protocol": protocol}


# --------------------------------------------------------------------------- organ cohort


ORGAN_VARIANTS = ("any copy", "other scan")
"""Organ evaluation variants: results may come from any other study (``any copy``: other
augmented copies of the *same* real CT count, an easy near-duplicate setting), or only from
studies of the *other* real CT (``other scan``: the query is searched in an index without the
copies of its own CT; organs seen in one CT only are skipped)."""


def _organ_index(directory: Path, studies: Sequence[OrganStudy]) -> CaseIndex:
    index = CaseIndex.open(directory)
    for study in studies:
        index.replace_study(
            StudyRecord(study.study_uid, study_description=study.record["source"], modalities=("CT",)),
            [SliceRecord(z) for z in range(len(study.slice_embeddings))],
            study.slice_embeddings,
        )
    return index


def evaluate_organs(
    cohort: Cohort, workdir: Path, knn: int = DEFAULT_KNN, localization_l: int = LOCALIZATION_L
) -> dict[str, Any]:
    """Organ-region queries on the TotalSegmentator-labelled studies (class = organ).

    Both :data:`ORGAN_VARIANTS` are run. ``any copy`` searches one index of every organ
    study (the query's own study excluded); ``other scan`` searches, for a query from one
    real CT, an index holding only the studies of the other real CT(s).

    Returns:
        ``tables`` (variant -> mode -> :class:`Table`), ``skipped`` (variant -> queries
        without a relevant item), ``organs`` (organ -> studies that show it).
    """
    studies = cohort.organs
    if not studies:
        return {"tables": {}, "skipped": {}, "organs": {}}
    shows: dict[str, set[str]] = defaultdict(set)
    organ_slices = {study.study_uid: {o: set(s) for o, s in study.organ_slices.items()} for study in studies}
    for study in studies:
        for organ in study.organ_slices:
            shows[organ].add(study.study_uid)
    sources = sorted({study.record["source"] for study in studies})
    indexes: dict[tuple[str, str], CaseIndex] = {}
    try:
        indexes[("any copy", "")] = _organ_index(workdir / "organ-index", studies)
        for name in sources:
            others = [study for study in studies if study.record["source"] != name]
            if others:
                indexes[("other scan", name)] = _organ_index(workdir / f"organ-index-not-{name}", others)
        tables: dict[str, dict[str, Table]] = {}
        skipped: dict[str, int] = {}
        rng = np.random.default_rng(0)
        slice_count = {study.study_uid: len(study.slice_embeddings) for study in studies}
        for variant in ORGAN_VARIANTS:
            evaluated: list[Evaluated] = []
            skipped[variant] = 0
            for study in studies:
                uid, name = study.study_uid, study.record["source"]
                index = indexes.get((variant, "" if variant == "any copy" else name))
                eligible = {s.study_uid for s in studies if variant == "any copy" or s.record["source"] != name}
                for organ, slices in sorted(study.organ_slices.items()):
                    relevant_studies = (shows[organ] & eligible) - {uid}
                    if index is None or not relevant_studies:
                        skipped[variant] += 1
                        continue
                    relevant_slices = {(other, z) for other in relevant_studies for z in organ_slices[other][organ]}
                    roi_rows, roi_vectors = study.organ_roi[organ]
                    picks = np.unique(
                        np.linspace(0, len(slices) - 1, min(MAX_QUERY_SLICES, len(slices))).round().astype(int)
                    )
                    rows = np.asarray(slices, dtype=np.int64)[picks]
                    queries = (("slice-wise", study.slice_embeddings[rows]), ("ROI slice-wise", roi_vectors[picks]))
                    for mode, vectors in queries:
                        for row_hits in index.search_slices(vectors, SLICE_K, exclude_study_uid=uid):
                            ranked = [(hit.study_uid, hit.slice_index) for hit in row_hits]
                            values: dict[str, float | None] = dict(
                                _ranking_metrics(
                                    ranked, relevant_slices, ap_normaliser=min(len(relevant_slices), SLICE_K)
                                )
                            )
                            values["LR"] = values["LocR@1"] = None
                            evaluated.append(Evaluated(mode, organ, values))
                    region_of = lambda other, organ=organ: organ_slices[other].get(organ, set())
                    run = _random_run(uid, {u: slice_count[u] for u in eligible}, rng, localization_l)
                    evaluated.append(
                        Evaluated(
                            "random (baseline)",
                            organ,
                            _study_metrics(run, relevant_studies, region_of, region_of, localization_l),
                        )
                    )
                    for rerank in (False, True):
                        suffix = "re-ranked" if rerank else "count"
                        common = {
                            "k": knn,
                            "top": len(studies),
                            "rerank": rerank,
                            "exclude_study_uid": uid,
                            "localization_l": localization_l,
                        }
                        region = index.search_studies(
                            study.slice_embeddings, slice_range=(min(slices), max(slices)), **common
                        )
                        roi = index.search_studies(roi_vectors, query_slice_indices=roi_rows, **common)
                        for mode, hits in ((f"region ({suffix})", region), (f"ROI region ({suffix})", roi)):
                            run = _study_hits_to_run(hits, uid, True, rerank)
                            evaluated.append(
                                Evaluated(
                                    mode,
                                    organ,
                                    _study_metrics(run, relevant_studies, region_of, region_of, localization_l),
                                )
                            )
            tables[variant] = _tables(evaluated)
    finally:
        for index in indexes.values():
            index.close()
    return {"tables": tables, "skipped": skipped, "organs": {o: sorted(s) for o, s in shows.items()}}


# --------------------------------------------------------------------------- report


def _cell(value: float | None, spread: float | None = None) -> str:
    if value is None:
        return "—"
    return f"{value:.3f}" if spread is None else f"{value:.3f} ± {spread:.3f}"


def _summary_table(tables: dict[str, Table], mode_order: Sequence[str]) -> list[str]:
    lines = [
        "| Retrieval mode | " + " | ".join(METRICS) + " | classes | queries |",
        "|---|" + "---|" * (len(METRICS) + 2),
    ]
    for mode in mode_order:
        if mode not in tables:
            continue
        table = tables[mode]
        summary = table.summary()
        cells = [_cell(*summary[metric]) for metric in METRICS]
        lines.append(f"| {mode} | " + " | ".join(cells) + f" | {len(table.rows)} | {sum(table.counts.values())} |")
    return lines


def _class_table(table: Table, first_column: str, metrics: Sequence[str] = METRICS) -> list[str]:
    lines = [f"| {first_column} | " + " | ".join(metrics) + " | queries |", "|---|" + "---|" * (len(metrics) + 1)]
    for cls, row in table.rows.items():
        lines.append(f"| {cls} | " + " | ".join(_cell(row[m]) for m in metrics) + f" | {table.counts[cls]} |")
    summary = table.summary()
    lines.append("| **Average** | " + " | ".join(_cell(summary[m][0]) for m in metrics) + " | |")
    lines.append("| **STD** | " + " | ".join(_cell(summary[m][1]) for m in metrics) + " | |")
    return lines


PHANTOM_MODES = (
    "random (baseline)",
    "slice-wise",
    "volume (count)",
    "volume (re-ranked)",
    "region (count)",
    "region (re-ranked)",
    "ROI (count)",
    "ROI (re-ranked)",
    "mixed (count)",
    "mixed (re-ranked)",
)
ORGAN_MODES = (
    "random (baseline)",
    "slice-wise",
    "ROI slice-wise",
    "region (count)",
    "region (re-ranked)",
    "ROI region (count)",
    "ROI region (re-ranked)",
)


def format_report(result: dict[str, Any]) -> str:
    """The markdown report of :func:`evaluate`: summary tables per relevance definition and per-class tables."""
    info = result["segmenter"]
    lines = [
        "# Retrieval evaluation",
        "",
        (
            f"Weights: **{info['name']} v{info['version']}**{' (demo weights, not for clinical use)' if info['demo'] else ''}"
            f" — {info['description']}; input {info['input_size']}, window {info['window']}, "
            f"embedding dim {info['embedding_dim']}."
        ),
        (
            f"Cohort: {result['cohort']['phantom_studies']} abscess studies "
            f"({result['cohort']['phantom_lesions']} inserted lesions), {result['cohort']['organ_studies']} organ studies; "
            f"seed {result['cohort']['seed']}. Hit table: k = {result['settings']['knn']} neighbours per query slice; "
            f"slice-wise: {SLICE_K} neighbours; L = {result['settings']['localization_l']}."
        ),
        (
            "R@K: share of queries with a relevant item in the top K (Khun Jush et al.); mAP over the returned ranking; "
            "P@K (Lee & Kim eq. 3); LR: localization ratio of the top-1 study (eq. 2 count-based, eq. 7 re-ranked); "
            "LocR@1: top-1 relevant and localized. Summary cells: mean ± std over classes."
        ),
        (
            f"Protocol: `{result['settings']['protocol']}`"
            + (" — an abscess query is answered only by studies of the other host CTs (no augmented copy of its own "
               "scan is in the database it searches), as the seed keeps its query cases out of its database."
               if result['settings']['protocol'] == "other-host" else " — any other study may answer.")
        ),
        "",
        "Remaining deviations from Khun Jush et al. and why:",
        "",
        "- Embeddings: the node's own VM-UNet encoder (demo weights, trained on phantoms) instead of the seed's "
        "pre-trained 2D models: the node indexes what it computes anyway.",
        "- Data: phantom abscesses in three real host CTs and two organ-labelled real CTs instead of TotalSegmentator's "
        "1,204 volumes and its official split: no other labelled CT ships in the registries this project can reach; "
        "the host-wise protocol plays the role of the split.",
        "- Classes: deep neck space, loculi and size for the abscess studies (organs only for the organ cohort).",
        "- Slice-wise rows retrieve 10 neighbours so that P@K and mAP are defined; their R@1 is the seed's "
        "one-slice baseline.",
        "- The random baseline and P@K come from Lee & Kim (the third seed); the mixed rows from AbscessHeNe's "
        "retrieval prototype.",
        "- Eq. 7 divides by L also when a study has fewer than L slices (the paper assumes L <= m).",
        "",
    ]
    abscess = result["abscess"]
    lines += [
        (
            f"Indexed: {abscess['indexed']['slice_vectors']} slice vectors, {abscess['indexed']['roi_vectors']} ROI vectors, "
            f"{abscess['indexed']['predicted_lesions']} predicted lesions in "
            f"{abscess['indexed']['studies_with_predicted_lesion']} studies "
            f"({abscess['indexed']['ground_truth_lesions']} inserted). Sanity (own study not excluded): "
            f"self volume R@1 = {_cell(abscess['sanity']['self_volume_R@1'])}, "
            f"self region LR (count, k = 1) = {_cell(abscess['sanity']['self_region_LR_count'])}."
        ),
        (
            "ROI queries: encoder features pooled over the query lesion's ground-truth mask, searched in the ROI "
            "index (pooled over the predicted masks). Mixed queries: the region query plus the query lesion's "
            "ground-truth space, loculi, volume and diameter against the descriptors measured on the predicted "
            f"masks (image weight {result['settings']['image_weight']})."
        ),
        "",
    ]
    for definition in PHANTOM_RELEVANCE:
        tables = abscess["tables"][definition]
        lines += [
            f"## Abscess studies — relevance: same {definition}",
            "",
            f"Queries skipped (no relevant item left): {abscess['skipped'][definition]}.",
            "",
        ]
        if tables:
            lines += _summary_table(tables, PHANTOM_MODES) + [""]
        else:
            lines += ["No class of this definition has a relevant study in the cohort (use more --cases).", ""]
    lines += ["## Abscess studies — per deep neck space (relevance: same space)", ""]
    for mode in PHANTOM_MODES:
        if mode in abscess["tables"]["space"]:
            lines += [f"### {mode}", ""] + _class_table(abscess["tables"]["space"][mode], "Deep neck space") + [""]
    organs = result.get("organs")
    if organs and organs["tables"]:
        for variant in ORGAN_VARIANTS:
            tables = organs["tables"][variant]
            lines += [
                f"## Organ-region queries (TotalSegmentator-labelled CT) — results from: {variant}",
                "",
                "Relevance: the study (slice) shows the same organ. "
                + (
                    "Other augmented copies of the query's own CT are allowed (near-duplicates)."
                    if variant == "any copy"
                    else "Copies of the query's own CT are removed: only the other real CT can answer."
                ),
                f"Queries skipped (organ in no other eligible study): {organs['skipped'][variant]}.",
                "",
            ]
            lines += _summary_table(tables, ORGAN_MODES) + [""]
            precision = [f"P@{k}" for k in PRECISION_KS]
            for mode in ("slice-wise", "ROI slice-wise"):
                if mode in tables:
                    lines += [f"### P@K per organ — {mode}, {variant} (Lee & Kim)", ""]
                    lines += _class_table(tables[mode], "Organ", precision) + [""]
            region_metrics = ["R@1", "mAP", "LR", "LocR@1"]
            for mode in ("region (count)", "region (re-ranked)"):
                if mode in tables:
                    lines += [f"### Per organ — {mode}, {variant}", ""]
                    lines += _class_table(tables[mode], "Organ", region_metrics) + [""]
    lines += [
        f"Runtime: evaluation {result['seconds']} s"
        + (f", cohort build {result['cohort']['build_seconds']} s" if result["cohort"].get("build_seconds") else "")
        + "."
    ]
    return "\n".join(lines) + "\n"


def _tables_json(tables: dict[str, Table]) -> dict[str, Any]:
    return {
        mode: {
            "classes": table.rows,
            "queries": table.counts,
            "summary": {m: {"mean": mean, "std": std} for m, (mean, std) in table.summary().items()},
        }
        for mode, table in tables.items()
    }


def to_json(result: dict[str, Any]) -> dict[str, Any]:
    """The result of :func:`evaluate` as plain JSON data."""
    out = {key: value for key, value in result.items() if key not in ("abscess", "organs")}
    abscess = result["abscess"]
    out["abscess"] = {
        **{k: v for k, v in abscess.items() if k != "tables"},
        "tables": {d: _tables_json(t) for d, t in abscess["tables"].items()},
    }
    organs = result.get("organs") or {"tables": {}}
    out["organs"] = {
        **{k: v for k, v in organs.items() if k != "tables"},
        "tables": {variant: _tables_json(t) for variant, t in organs["tables"].items()},
    }
    return out


def evaluate(
    cohort_path: str | Path,
    knn: int = DEFAULT_KNN,
    localization_l: int = LOCALIZATION_L,
    workdir: str | Path | None = None,
    protocol: str = "other-host",
) -> dict[str, Any]:
    """Evaluate a cohort file: index it into temporary case indexes and run every query mode.

    Args:
        cohort_path: ``.npz`` from ``python -m tooling.cohort``.
        knn: Neighbours per query slice for the hit table of the study modes.
        localization_l: L of eq. 7.
        workdir: Folder for the temporary indexes (default: a fresh temporary folder, removed after).
        protocol: who may answer an abscess query (:data:`PROTOCOLS`).

    Returns:
        ``segmenter`` (info), ``cohort`` (counts, seed), ``settings``, ``abscess`` (see
        :func:`evaluate_phantoms`), ``organs`` (see :func:`evaluate_organs`), ``seconds``.
    """
    started = time.perf_counter()
    cohort = load_cohort(cohort_path)
    with tempfile.TemporaryDirectory(prefix="retrieval-eval-") as temporary:
        folder = Path(workdir) if workdir is not None else Path(temporary)
        abscess = evaluate_phantoms(cohort, folder, knn, localization_l, protocol)
        organs = evaluate_organs(cohort, folder, knn, localization_l)
    return {
        "segmenter": cohort.manifest["segmenter"],
        "cohort": {
            "phantom_studies": len(cohort.phantoms),
            "phantom_lesions": sum(len(s.lesions) for s in cohort.phantoms),
            "organ_studies": len(cohort.organs),
            "seed": cohort.manifest["settings"]["seed"],
            "settings": cohort.manifest["settings"],
            "build_seconds": cohort.manifest.get("seconds"),
            "lesions": [
                {
                    "study_uid": s.study_uid,
                    "host": s.record["host"],
                    **{k: les[k] for k in ("label", "space", "volume_ml", "loculi", "size_class", "loculi_class")},
                    "first_slice": min(les["slices"]),
                    "last_slice": max(les["slices"]),
                }
                for s in cohort.phantoms
                for les in s.lesions
            ],
        },
        "settings": {
            "knn": knn,
            "protocol": protocol,
            "localization_l": localization_l,
            "slice_k": SLICE_K,
            "image_weight": DEFAULT_IMAGE_WEIGHT,
        },
        "abscess": abscess,
        "organs": organs,
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line (see the module docstring). Prints the markdown tables; writes .md and .json to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cohort",
        type=Path,
        help="precomputed cohort .npz (python -m tooling.cohort); "
        "without it the cohort is built here first with --weights",
    )
    parser.add_argument("--weights", type=Path, help="segmenter checkpoint (default: the node's default WeightsPath)")
    parser.add_argument("--tiny-random", action="store_true", help="random tiny network (development only)")
    parser.add_argument("--cases", type=int, default=24, help="abscess phantom studies (one-shot build)")
    parser.add_argument("--organ-copies", type=int, default=3, help="copies per organ-labelled CT (one-shot build)")
    parser.add_argument("--seed", type=int, default=0, help="cohort seed (one-shot build)")
    parser.add_argument(
        "--out", type=Path, default=Path(".cache/retrieval-eval"), help="output folder (default: .cache/retrieval-eval)"
    )
    parser.add_argument("--knn", type=int, default=DEFAULT_KNN, help="neighbours per query slice for the hit table")
    parser.add_argument("--localization-l", type=int, default=LOCALIZATION_L, help="L of eq. 7")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="other-host",
                        help="abscess queries: answered by studies of other host CTs only (default) or by any other study")
    parser.add_argument("--markdown", type=Path, help="also write the report into this Markdown file's retrieval section")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    cohort_path = args.cohort
    if cohort_path is None:
        # One-shot path: the model-running half lives in tooling.cohort (imported only here).
        import torch

        from tooling.cohort import build_cohort, load_segmenter

        torch.set_num_threads(1)
        try:
            segmenter = load_segmenter(args.weights, tiny_random=args.tiny_random)
        except FileNotFoundError as error:
            parser.error(str(error))
        cohort_path = args.out / "cohort.npz"
        build_cohort(
            segmenter,
            cohort_path,
            cases=args.cases,
            seed=args.seed,
            organ_copies=args.organ_copies,
            progress=lambda line: print(line, file=sys.stderr),
        )
    result = evaluate(cohort_path, knn=args.knn, localization_l=args.localization_l, protocol=args.protocol)
    report = format_report(result)
    print(report)
    if args.markdown:
        from tooling.segmentation_eval import write_section

        shown = "python -m tooling.retrieval_eval " + " ".join(argv if argv is not None else sys.argv[1:])
        write_section(args.markdown, "retrieval-eval", shown, re.sub(r"^(#+) ", r"#\1 ", report, flags=re.MULTILINE))
    (args.out / "retrieval_eval.md").write_text(report)
    (args.out / "retrieval_eval.json").write_text(json.dumps(to_json(result), indent=1))
    return result


if __name__ == "__main__":
    main()

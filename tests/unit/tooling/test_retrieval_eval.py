"""Retrieval evaluation end to end: tiny cohort (tooling.cohort) -> python -m tooling.retrieval_eval tables.

Real parts: phantoms inserted into real head-and-neck CT, the organ-labelled real CT of DATA.md
(registry downloads), a tiny random VM-UNet run through the real Segmenter, the real CaseIndex.
The numbers of a random network are meaningless; the test checks the table structure, the
metric ranges and answers that the cohort's construction fixes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tooling.retrieval_eval import METRICS, ORGAN_VARIANTS, PHANTOM_MODES, PHANTOM_RELEVANCE, load_cohort
from tooling.retrieval_eval import main as evaluate_main
from tooling.cohort import SIZE_CLASSES_ML, build_cohort, tiny_random_segmenter
from tooling.phantoms import HOSTS


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        folder = tmp_path_factory.mktemp("retrieval-eval")
        cohort = folder / "cohort.npz"
        manifest = build_cohort(tiny_random_segmenter(seed=0), cohort, cases=4, seed=1, organ_copies=2, max_size=128)
        result = evaluate_main(["--cohort", str(cohort), "--out", str(folder / "out")])
    finally:
        torch.set_num_threads(threads)
    return {"folder": folder, "cohort": cohort, "manifest": manifest, "result": result}


def _all_values(tables_json: dict) -> list[float]:
    values = []
    for table in tables_json.values():
        for row in table["classes"].values():
            values += [value for value in row.values() if value is not None]
        for cell in table["summary"].values():
            values += [value for value in (cell["mean"], cell["std"]) if value is not None]
    return values


def test_cohort_file_holds_the_seeded_ground_truth(evaluated: dict) -> None:
    cohort = load_cohort(evaluated["cohort"])
    assert len(cohort.phantoms) == 4 and len(cohort.organs) == 4
    for study in cohort.phantoms:
        assert study.record["host"] in HOSTS and 1 <= len(study.lesions) <= 2
        n_slices = study.slice_embeddings.shape[0]
        assert study.gt_labels.shape[0] == n_slices == study.predicted_mask.shape[0]
        norms = np.linalg.norm(study.slice_embeddings, axis=1)
        assert np.allclose(norms, 1.0, atol=1e-4)
        for lesion in study.lesions:
            assert lesion["space"] in HOSTS[study.record["host"]].spaces
            low, high = SIZE_CLASSES_ML
            expected = "small" if lesion["volume_ml"] < low else "medium" if lesion["volume_ml"] < high else "large"
            assert lesion["size_class"] == expected
            assert lesion["loculi_class"] == ("multiloculated" if lesion["loculi"] >= 2 else "unilocular")
            # The lesion's slices are exactly those where its ground-truth label is present.
            shown = np.flatnonzero((study.gt_labels == lesion["label"]).any(axis=(1, 2)))
            assert shown.tolist() == lesion["slices"] and shown.size > 0
            rows, vectors = study.lesion_roi[lesion["label"]]
            assert rows.tolist() == lesion["slices"] and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    sources = {study.record["source"] for study in cohort.organs}
    assert sources == {"neck_chest", "abdomen"}
    for study in cohort.organs:
        organs = set(study.organ_slices)
        if study.record["source"] == "neck_chest":
            assert {"thyroid_gland", "trachea", "esophagus", "common_carotid_artery", "vertebrae"} <= organs
            assert "gallbladder" not in organs  # the chest CT reaches the upper abdomen, not the gallbladder
        else:
            assert {"liver", "spleen", "kidney", "gallbladder", "vertebrae", "costal_cartilages"} <= organs
            assert not {"thyroid_gland", "trachea", "carpal"} & organs


def test_tables_have_every_metric_in_range(evaluated: dict) -> None:
    out = evaluated["folder"] / "out"
    report = (out / "retrieval_eval.md").read_text()
    data = json.loads((out / "retrieval_eval.json").read_text())
    header = "| Retrieval mode | " + " | ".join(METRICS) + " | classes | queries |"
    # one per relevance definition + one per organ variant
    assert report.count(header) == len(PHANTOM_RELEVANCE) + len(ORGAN_VARIANTS)
    for mode in PHANTOM_MODES[1:]:  # every retrieval mode; the random baseline is checked apart
        assert re.search(rf"^\| {re.escape(mode)} \| \d\.\d{{3}}", report, re.MULTILINE), mode
        assert mode in data["abscess"]["tables"]["space"]
    assert "P@K per organ — slice-wise, any copy (Lee & Kim)" in report
    values = []
    for definition in PHANTOM_RELEVANCE:
        values += _all_values(data["abscess"]["tables"][definition])
    for variant in ORGAN_VARIANTS:
        values += _all_values(data["organs"]["tables"][variant])
    assert values and all(0.0 <= value <= 1.0 for value in values)
    region = data["abscess"]["tables"]["space"]["region (re-ranked)"]["summary"]
    assert all(region[metric]["mean"] is not None for metric in METRICS)
    assert data["abscess"]["tables"]["space"]["volume (count)"]["summary"]["LR"]["mean"] is None  # no region
    organ_pk = data["organs"]["tables"]["any copy"]["slice-wise"]["classes"]
    assert {"thyroid_gland", "gallbladder", "vertebrae"} <= set(organ_pk)


def test_known_answers_are_found(evaluated: dict) -> None:
    result = evaluated["result"]
    # Without excluding the query's own study, it must come first, and its hit slices are the lesion's.
    assert result["abscess"]["sanity"] == {"self_volume_R@1": 1.0, "self_region_LR_count": 1.0}
    # Thyroid and gallbladder each exist in one source CT only: their relevant studies are that source's copies,
    # and a region query finds the other copy of the same real CT first.
    shows = result["organs"]["organs"]
    cohort = load_cohort(evaluated["cohort"])
    source_of = {study.study_uid: study.record["source"] for study in cohort.organs}
    assert {source_of[uid] for uid in shows["thyroid_gland"]} == {"neck_chest"}
    assert {source_of[uid] for uid in shows["gallbladder"]} == {"abdomen"}
    region = result["organs"]["tables"]["any copy"]["region (count)"].rows
    assert region["thyroid_gland"]["R@1"] == 1.0 and region["gallbladder"]["R@1"] == 1.0
    # Seen by one CT only, they cannot be asked across scans; shared organs (vertebrae) can.
    other_scan = result["organs"]["tables"]["other scan"]["region (count)"].rows
    assert "thyroid_gland" not in other_scan and "gallbladder" not in other_scan and "vertebrae" in other_scan
    # A space is a class of the table exactly when at least two studies have a lesion there.
    studies_per_space: dict[str, int] = {}
    for study in cohort.phantoms:
        for space in {lesion["space"] for lesion in study.lesions}:
            studies_per_space[space] = studies_per_space.get(space, 0) + 1
    expected = {space for space, count in studies_per_space.items() if count >= 2}
    assert set(result["abscess"]["tables"]["space"]["region (count)"].rows) == expected


def test_cohort_rejects_a_foreign_file(tmp_path: Path) -> None:
    np.savez(tmp_path / "other.npz", values=np.zeros(3))
    with pytest.raises(ValueError, match="not a retrieval cohort"):
        load_cohort(tmp_path / "other.npz")

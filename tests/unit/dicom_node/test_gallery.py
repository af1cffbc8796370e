"""The similar-case gallery on a real case index and service: thumbnails drawn with the overlay,
opaque per-user references, the access policy and pseudonymisation (no real UID in a URL)."""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dicom_node.config import NodeConfig
from dicom_node.similar.gallery import OVERLAY_RGB, Gallery, ThumbnailReferences, render_thumbnail
from dicom_node.similar.query import open_index
from dicom_node.similar.service import SimilarCaseService
from index.records import SliceRecord, StudyRecord

SLICES = 6


def decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def test_a_thumbnail_shows_the_ct_in_the_soft_tissue_window_and_the_overlay():
    slice_hu = np.tile(np.linspace(-400, 400, 100, dtype=np.float32), (80, 1))  # 80 rows x 100 columns
    mask = np.zeros((80, 100), bool)
    mask[20:60, 30:70] = True
    picture = decode(render_thumbnail(slice_hu, mask, size=200))
    assert picture.shape == (160, 200, 3)  # the longest side is the thumbnail size, the aspect kept
    assert picture[80, 5][0] == picture[80, 5][1] == picture[80, 5][2]  # outside the mask: grey
    assert picture[10, 5].tolist() == [0, 0, 0] and picture[10, 195].tolist() == [255, 255, 255]  # -400 / +400 HU
    outline = (picture == OVERLAY_RGB).all(axis=-1)
    assert outline[40, 60] and outline[118, 100] and not outline[80, 100]  # the mask's border, not its inside
    inside = picture[80, 100]
    assert inside[0] > inside[1] + 60 and inside[0] > inside[2]  # tinted with the overlay colour
    plain = decode(render_thumbnail(slice_hu, None, size=200))
    assert (plain[..., 0] == plain[..., 1]).all()  # no mask: no colour at all


def test_references_resolve_for_their_user_only_and_expire():
    references = ThumbnailReferences(lifetime_seconds=0.3, capacity=2)
    token = references.issue("radiologist", "1.2.3", "1.2.3.4")
    assert len(token) >= 24 and "1.2.3" not in token
    assert references.resolve(token, "radiologist") == ("1.2.3", "1.2.3.4")
    assert references.resolve(token, "clerk") is None and references.resolve("guess", "radiologist") is None
    references.issue("radiologist", "1.2.3", "1.2.3.5")
    references.issue("radiologist", "1.2.3", "1.2.3.6")  # over capacity: the oldest goes
    assert references.resolve(token, "radiologist") is None
    late = references.issue("radiologist", "1.2.3", "1.2.3.7")
    time.sleep(0.4)
    assert references.resolve(late, "radiologist") is None


class ArraySlices:
    """Slices and masks of the indexed studies, from arrays (the e2e test reads them from Orthanc)."""

    def __init__(self, volumes: dict[str, np.ndarray], masks: dict[str, np.ndarray]) -> None:
        self.volumes, self.masks = volumes, masks

    def slice_hu(self, study_uid: str, sop_instance_uid: str) -> np.ndarray:
        return self.volumes[study_uid][int(sop_instance_uid.rsplit(".", 1)[1])]

    def mask(self, study_uid: str, sop_instance_uid: str) -> np.ndarray | None:
        return self.masks[study_uid][int(sop_instance_uid.rsplit(".", 1)[1])]


def gallery_for(tmp_path: Path, pseudonymize: bool) -> tuple[Gallery, ArraySlices]:
    config = NodeConfig.from_section({
        "IndexDirectory": str(tmp_path / "index"), "JobsDatabase": str(tmp_path / "jobs.sqlite"),
        "LogDirectory": str(tmp_path / "logs"), "PseudonymSecretPath": str(tmp_path / "secret"),
        "PseudonymizeSimilarCases": pseudonymize, "AllowedSimilarCasesUsers": ["radiologist"]})
    rng = np.random.default_rng(3)
    base = rng.normal(size=(SLICES, 16)).astype(np.float32)
    volumes, masks = {}, {}
    with open_index(config.index_directory) as index:
        for number in range(4):
            study_uid = f"1.2.7.{number}"
            index.replace_study(
                StudyRecord(study_uid, series_uid=f"1.2.8.{number}", patient_id=f"MRN-{number}",
                            patient_name=f"Doe^Pat{number}", study_description="CT NECK"),
                [SliceRecord(i, f"{study_uid}.{i}") for i in range(SLICES)],
                base + 0.2 * rng.normal(size=(SLICES, 16)).astype(np.float32))
            volumes[study_uid] = rng.normal(40, 80, size=(SLICES, 32, 32)).astype(np.float32)
            masks[study_uid] = np.zeros((SLICES, 32, 32), bool)
            masks[study_uid][:, 10:20, 8 + number:18 + number] = True
    slices = ArraySlices(volumes, masks)
    return Gallery(SimilarCaseService(config), slices), slices


def thumbnail(gallery: Gallery, url: str, user: str = "radiologist") -> tuple[int, dict]:
    return gallery.thumbnail(url.rsplit("/", 1)[1], user)


def test_the_gallery_lists_ranked_cases_with_their_slice_pairs(tmp_path: Path):
    gallery, slices = gallery_for(tmp_path, pseudonymize=False)
    status, body = gallery.answer("1.2.7.0", {"k": "3", "pairs": "2", "mode": "study"}, "radiologist")
    assert status == 200, body
    assert [case["rank"] for case in body["cases"]] == [1, 2, 3] and body["query"]["k"] == 3
    assert body["pseudonymized"] is False and body["query"]["viewer_url"].endswith("=1.2.7.0")
    first = body["cases"][0]
    assert first["patient_id"].startswith("MRN-") and first["viewer_url"] == f"/ohif/viewer?StudyInstanceUIDs={first['study_uid']}"
    assert len(first["pairs"]) == 2 and first["score"] >= body["cases"][1]["score"]
    pair = first["pairs"][0]
    status, png = thumbnail(gallery, pair["matched_thumbnail"])
    assert status == 200
    expected = render_thumbnail(slices.slice_hu(first["study_uid"], f"{first['study_uid']}.{pair['matched_slice']}"),
                                slices.mask(first["study_uid"], f"{first['study_uid']}.{pair['matched_slice']}"))
    assert base64.b64decode(png["png"]) == expected  # the matched slice of the matched study, overlay drawn
    status, query_png = thumbnail(gallery, pair["query_thumbnail"])
    assert status == 200 and query_png["png"] != png["png"]

    assert thumbnail(gallery, pair["matched_thumbnail"], user="clerk")[0] == 403  # the policy, again
    assert gallery.answer("1.2.7.0", {}, "clerk")[0] == 403
    assert gallery.answer("1.2.7.0", {"pairs": "9"}, "radiologist")[0] == 400
    assert gallery.answer("1.2.9.9", {}, "radiologist")[0] == 404
    assert gallery.thumbnail("not-a-reference", "radiologist")[0] == 404


def test_a_pseudonymised_gallery_names_no_real_study_not_even_in_its_urls(tmp_path: Path):
    gallery, _ = gallery_for(tmp_path, pseudonymize=True)
    status, body = gallery.answer("1.2.7.0", {"k": "3", "pairs": "3", "mode": "study"}, "radiologist")
    assert status == 200 and body["pseudonymized"] is True
    shown = json.dumps(body["cases"])
    for secret in ("1.2.7.1", "1.2.7.2", "1.2.7.3", "1.2.8.", "MRN-", "Doe^"):
        assert secret not in shown, secret
    assert all(case["viewer_url"] is None for case in body["cases"])
    for case in body["cases"]:
        for pair in case["pairs"]:
            status, png = thumbnail(gallery, pair["matched_thumbnail"])
            assert status == 200 and len(base64.b64decode(png["png"])) > 100
    audit = [json.loads(line) for line in (tmp_path / "logs" / "audit.jsonl").read_text().splitlines()]
    assert audit[-1]["outcome"] == "answered" and audit[-1]["count"] == 3  # the admin's trail has the real UIDs
    assert set(audit[-1]["result_study_uids"]) <= {"1.2.7.1", "1.2.7.2", "1.2.7.3"}


@pytest.mark.parametrize("pairs", ["0", "x", "6"])
def test_bad_pairs_are_refused(tmp_path: Path, pairs: str):
    gallery, _ = gallery_for(tmp_path, pseudonymize=False)
    status, body = gallery.answer("1.2.7.0", {"pairs": pairs}, "radiologist")
    assert status == 400 and "pairs" in body["error"]

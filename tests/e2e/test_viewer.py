"""The radiologist's view: the node's own OHIF (served by Orthanc at /ohif/) shows our SEG over the CT.

Drives Debian's headless Chromium through viewer/check_overlay.mjs (playwright-core, no browser
download). The expectation (where our mask is) comes from the SEG that the node stored; what is
checked is the rendered page: the study browser lists the series, OHIF lists the segment, and the
pixels under the overlay change on the slice where the mask is largest and stay as they are where
there is no mask. Screenshots are kept under runtime/test-artifacts/viewer/.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image
from scipy import ndimage

from tooling.convert import write_series
from tooling import demo
from dicom_node.config import CHECKOUT

ARTIFACTS = CHECKOUT / "runtime" / "test-artifacts" / "viewer"
README_SCREENSHOT = CHECKOUT / "docs" / "screenshots" / "ohif-seg-overlay.png"


def viewer_url(node, study_uid: str) -> str:
    """Where a radiologist opens a study in the node's OHIF."""
    return f"{node.url}/ohif/viewer?StudyInstanceUIDs={study_uid}"


@pytest.fixture(scope="module")
def demo_study(node, tmp_path_factory, sample):
    """The demo's head-and-neck CT sent to the node with storescu; its finished job and its SEG."""
    sample("ct_head")
    datasets, inserted = demo.demo_study()
    directory = tmp_path_factory.mktemp("demo_ct")
    write_series(datasets, directory)
    sent = node.storescu(directory, calling_aet="DEMO_PACS")
    assert sent.returncode == 0, sent.stderr
    study_uid = datasets[0].StudyInstanceUID
    job = node.wait_for_job(study_uid, timeout=600)
    assert job["state"] in ("done", "skipped"), job
    found = node.http.post(node.url + "/tools/find", json={
        "Level": "Instance", "Query": {"StudyInstanceUID": study_uid, "Modality": "SEG"}}, timeout=30).json()
    assert len(found) == 1, found
    seg = hd.seg.segread(io.BytesIO(node.http.get(f"{node.url}/instances/{found[0]}/file", timeout=60).content))
    return datasets, seg, job, inserted


def pixel_world(ds, row: float, column: float) -> list[float]:
    """Patient coordinates (mm) of the centre of pixel (row, column) of a slice."""
    position = np.array([float(v) for v in ds.ImagePositionPatient])
    cosines = np.array([float(v) for v in ds.ImageOrientationPatient])
    row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
    return list(position + cosines[:3] * column_spacing * column + cosines[3:] * row_spacing * row)


def slice_points(ds, point_rc: tuple[int, int]) -> dict[str, list[float]]:
    """The lesion point and three pixel centres that fix the image-to-page mapping."""
    return {"lesion": pixel_world(ds, *point_rc), "origin": pixel_world(ds, 0, 0),
            "next_column": pixel_world(ds, 0, 1), "next_row": pixel_world(ds, 1, 0)}


def page_mask(mask: np.ndarray, placed: dict, shape: tuple[int, int]) -> np.ndarray:
    """Our mask of one slice as the page pixels it should cover (nearest image pixel)."""
    origin, column, row = (np.array(placed["page"][k]) for k in ("origin", "next_column", "next_row"))
    to_page = np.column_stack([row - origin, column - origin])  # (x, y) per (row, column) step
    ys, xs = np.mgrid[0:shape[0], 0:shape[1]]
    offsets = np.stack([xs + 0.5 - origin[0], ys + 0.5 - origin[1]], axis=-1)
    rows_cols = offsets @ np.linalg.inv(to_page).T
    r = np.rint(rows_cols[..., 0]).astype(int)
    c = np.rint(rows_cols[..., 1]).astype(int)
    inside = (r >= 0) & (r < mask.shape[0]) & (c >= 0) & (c < mask.shape[1])
    covered = np.zeros(shape, dtype=bool)
    covered[inside] = mask[r[inside], c[inside]]
    return covered


def colour_at(image: np.ndarray, xy: list[float]) -> np.ndarray:
    """Mean RGB of the 3x3 page pixels around a point."""
    x, y = int(xy[0]), int(xy[1])
    return image[y - 1:y + 2, x - 1:x + 2, :3].reshape(-1, 3).astype(float).mean(axis=0)


def test_demo_reports_the_inserted_abscess_in_its_space_and_little_else(node, demo_study):
    """The radiologist's first look: the measurement SR lists the inserted abscess with its deep
    neck space and side (right parapharyngeal), and at most one other lesion."""
    datasets, _, job, inserted = demo_study
    lesions = job["result"]["lesions"]
    z, y, x = inserted["center_zyx"]
    found = [lesion for lesion in lesions if lesion["first_slice"] <= z <= lesion["last_slice"]
             and np.hypot(lesion["centroid_zyx"][1] - y, lesion["centroid_zyx"][2] - x) < 15]
    assert found, f"the inserted abscess (slice {z}) is not among the reported lesions {lesions}"
    assert (found[0]["space"], found[0]["side"]) == ("parapharyngeal", "right") == (inserted["space"], inserted["side"])
    assert len(lesions) <= 2, f"{len(lesions)} lesions reported: {lesions}"
    sr_id = job["result"]["measurements"]["orthanc_id"]
    sr = pydicom.dcmread(io.BytesIO(node.http.get(f"{node.url}/instances/{sr_id}/file", timeout=60).content))
    text = str(sr)
    assert "Parapharyngeal space" in text and "Right" in text
    assert "Candidates removed: core attenuation not fluid" in text


def test_ohif_shows_our_seg_over_the_ct(node, demo_study, tmp_path, browser_driver):
    started = time.monotonic()
    datasets, seg, _, _ = demo_study
    study_uid = datasets[0].StudyInstanceUID

    # The expectation, from the SEG the node stored: the slice where our mask is largest, a point
    # deep inside it, and a slice where that point has no mask (one without any mask if there is).
    masks = np.stack([
        seg.get_pixels_by_source_instance([ds.SOPInstanceUID], combine_segments=True, skip_overlap_checks=True)[0]
        for ds in datasets]) > 0
    areas = masks.reshape(len(masks), -1).sum(axis=1)
    assert areas.max() > 0, "the node's SEG is empty: nothing to overlay"
    largest = int(areas.argmax())
    depth = ndimage.distance_transform_edt(masks[largest])
    empty = [z for z in range(len(masks)) if areas[z] == 0]
    if empty:  # the deepest point of the largest mask, and the nearest slice without any mask
        point = tuple(int(v) for v in np.unravel_index(depth.argmax(), depth.shape))
        without = min(empty, key=lambda z: abs(z - largest))
    else:  # every slice has mask: a point deep in the mask here and far from it on another slice
        clearance = np.stack([ndimage.distance_transform_edt(~m) for m in masks])
        clearance[largest] = 0
        score = np.minimum(depth, clearance.max(axis=0))
        point = tuple(int(v) for v in np.unravel_index(score.argmax(), score.shape))
        without = int(clearance[(slice(None), *point)].argmax())
        assert score[point] >= 2, "no point is inside the mask on one slice and clear of it on another"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*.png"):
        old.unlink()
    description = seg.SeriesDescription
    job = {"url": viewer_url(node, study_uid), "segDescription": description, "outDir": str(ARTIFACTS),
           "credentials": {"username": node.credentials[0], "password": node.credentials[1]},
           "slices": [{"name": f"{name}-slice{z:03d}", "sopInstanceUid": datasets[z].SOPInstanceUID,
                       "points": slice_points(datasets[z], point)}
                      for name, z in (("largest-mask", largest), ("no-mask", without))]}
    result = browser_driver("check_overlay.mjs", job, tmp_path)
    (ARTIFACTS / "result.json").write_text(json.dumps(result, indent=1))

    # Listed: every series of the study (CT, our SEG, our SRs) shows in OHIF's study browser.
    series = [node.http.get(f"{node.url}/series/{s}", timeout=30).json()["MainDicomTags"]
              for s in node.http.get(f"{node.url}/studies/{seg_study_id(node, study_uid)}", timeout=30).json()["Series"]]
    for tags in series:
        assert tags.get("Modality") in result["studyBrowserText"], tags
        if tags.get("SeriesDescription"):
            assert tags["SeriesDescription"] in result["studyBrowserText"], tags
    # OHIF took the SEG: it holds it as a segmentation with our segment, and lists the segment.
    segment_labels = [label for s in result["segmentations"] for label in s["segments"]]
    assert segment_labels == ["Abscess"], result["segmentations"]
    assert "Abscess" in result["afterLoadText"].splitlines(), "segment not listed in the segmentation panel"

    largest_shot, without_shot = result["slices"]
    for shot, z in ((largest_shot, largest), (without_shot, without)):
        assert datasets[z].SOPInstanceUID in shot["currentImageId"], shot

    def pictures(shot):
        return (np.asarray(Image.open(shot["screenshots"]["shown"]).convert("RGB")).astype(int),
                np.asarray(Image.open(shot["screenshots"]["hidden"]).convert("RGB")).astype(int))

    # Rendered on the slice where our mask is largest: the lesion point changes colour with the
    # overlay, and what changes on the whole viewport is where our mask is.
    shown, hidden = pictures(largest_shot)
    change = np.abs(colour_at(shown, largest_shot["page"]["lesion"]) - colour_at(hidden, largest_shot["page"]["lesion"]))
    assert change.sum() > 40, f"overlay does not change the lesion point (RGB change {change})"
    x0, y0, width, height = (int(round(v)) for v in largest_shot["canvas"])
    changed = (np.abs(shown - hidden).max(axis=-1) > 25)[y0:y0 + height, x0:x0 + width]
    expected = page_mask(masks[largest], largest_shot, shown.shape[:2])[y0:y0 + height, x0:x0 + width]
    assert changed.sum() > 0
    precision = (changed & ndimage.binary_dilation(expected, iterations=3)).sum() / changed.sum()
    core = ndimage.binary_erosion(expected, iterations=2)
    recall = (changed & core).sum() / max(core.sum(), 1)
    assert precision > 0.9, f"{precision:.2f} of the overlay's pixels lie outside our mask"
    assert core.sum() == 0 or recall > 0.9, f"only {recall:.2f} of our mask is drawn"

    # Not rendered where there is no mask: the same point keeps its colour on the other slice.
    shown, hidden = pictures(without_shot)
    change = np.abs(colour_at(shown, without_shot["page"]["lesion"]) - colour_at(hidden, without_shot["page"]["lesion"]))
    assert change.sum() < 10, f"overlay changes a point without mask (RGB change {change})"
    if areas[without] == 0:
        changed = (np.abs(shown - hidden).max(axis=-1) > 25)[y0:y0 + height, x0:x0 + width]
        assert changed.sum() < 0.001 * changed.size, f"{changed.sum()} pixels change on a slice without mask"

    if os.environ.get("ABSCESS_UPDATE_SCREENSHOTS"):
        README_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(largest_shot["screenshots"]["shown"], README_SCREENSHOT)
    print(f"viewer check: {time.monotonic() - started:.0f} s; screenshots in {ARTIFACTS}")


def seg_study_id(node, study_uid: str) -> str:
    """Orthanc's id of a study."""
    return node.http.post(node.url + "/tools/lookup", data=study_uid, timeout=30).json()[0]["ID"]

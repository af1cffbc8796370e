"""The operator's and the radiologist's view, against the real Orthanc with our plugin and workers:
the queue dashboard and the similar-case gallery driven by headless Chromium (viewer/check_ui.mjs),
/abscess-node/metrics parsed by prometheus-client, webhooks received by a local HTTP server, /ohif/.

One node for the module: the demo study (real CT, inserted abscess), three phantom studies (real
CT, other inserted abscesses), a study that fails (a slice without PixelSpacing) and a job held
running by a worker "on another machine" (this test process, through the job store's lease).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from types import SimpleNamespace

import numpy as np
import pytest
import requests
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from dicom_node.config import CHECKOUT
from dicom_node.jobs import open_job_store
from tooling import demo
from tooling.convert import StudyInfo, volume_to_ct_series, write_series
from tooling.orthanc_harness import ADMIN, OrthancProcess, scratch_node_configuration, wait_until
from tooling.phantoms import make_case
from tooling.webhook_receiver import WebhookReceiver

ARTIFACTS = CHECKOUT / "runtime" / "test-artifacts" / "ui"
SCREENSHOTS = CHECKOUT / "docs" / "screenshots"
CLERK = ("clerk", "clerk-password-not-on-the-list")  # authenticated, not in AllowedSimilarCasesUsers
PHANTOM_SEEDS = (21, 22, 23)
K = 3
EXTERNAL_WORKER = "worker-on-another-machine"


def scrape(node: OrthancProcess) -> dict[tuple[str, tuple], float]:
    """``curl /abscess-node/metrics``, parsed by prometheus-client: (sample name, sorted labels) -> value."""
    answer = node.http.get(node.url + "/abscess-node/metrics", timeout=30)
    assert answer.status_code == 200 and answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(answer.text) for sample in family.samples}


def worker_pid(node: OrthancProcess) -> int:
    found = subprocess.run(["pgrep", "-f", f"worker --settings {node.directory / 'work' / 'worker-0'}.settings.json"],
                           capture_output=True, text=True)
    (pid,) = found.stdout.split()
    return int(pid)


def orthanc_id(node: OrthancProcess, study_uid: str) -> str:
    return node.http.post(node.url + "/tools/lookup", data=study_uid, timeout=30).json()[0]["ID"]


def phantom_study(seed: int) -> list:
    """A phantom patient: the real head-and-neck CT (augmented) with another inserted abscess, 24 slices."""
    case = make_case(seed, host="ct_head", n_lesions=1, augment=True)
    first = max(0, int(case.lesions[0]["center_zyx"][0]) - 12)
    return volume_to_ct_series(case.volume_hu[first:first + 24], case.spacing_mm, uid_seed=f"ui-phantom-{seed}",
                               info=StudyInfo(patient_name=f"Phantom^Patient{seed}", patient_id=f"UI-{seed}",
                                              study_description=f"CT NECK phantom {seed}", accession_number=f"UIACC{seed}"))


@pytest.fixture(scope="module")
def receiver():
    """The hospital's webhook endpoint."""
    with WebhookReceiver() as server:
        yield server


@pytest.fixture(scope="module")
def ui_node(tmp_path_factory, weights_path, forward_scp, receiver, ct_crop, sample, browser_driver):
    """The node with a done demo study, three done phantom studies, a failed study and a running job."""
    sample("ct_head")
    directory = tmp_path_factory.mktemp("ui-node")
    config = scratch_node_configuration(
        directory, {"WeightsPath": str(weights_path), "ChunkSlices": 32, "ForwardTo": ["forward"], "SimilarCasesTopK": K,
                    "AllowedSimilarCasesUsers": [ADMIN], "NotificationBackoffSeconds": 1,
                    "Notifications": [{"Url": receiver.url, "On": ["failed", "done"]}],
                    # 24-slice phantoms and crops show no whole neck; the demo weights mark a third
                    # or less of these phantoms' abscesses (under the default 1 mL, some of it rim, so
                    # the core reads up to 70 HU), and the pages need lesions to show: the rules'
                    # defaults are tested in test_neck_rules.py and the unit tests
                    "SeriesRules": {"RequireNeckCoverage": False},
                    "LesionRules": {"MinVolumeMl": 0.5, "CoreHuRange": [-10, 100]}},
        DicomModalities={"forward": ["FORWARD_SCP", "127.0.0.1", forward_scp["port"]]})
    config["RegisteredUsers"][CLERK[0]] = CLERK[1]
    node = OrthancProcess(config, directory).start()
    held = None
    try:
        metrics_at_start = scrape(node)
        studies = {"demo": demo.demo_study()[0], **{f"phantom-{seed}": phantom_study(seed) for seed in PHANTOM_SEEDS}}
        broken = volume_to_ct_series(ct_crop(12), (2.5, 1.0, 1.0), uid_seed="ui-broken",
                                     info=StudyInfo(patient_name="Broken^Slice", patient_id="UI-BROKEN"))
        del broken[5].PixelSpacing
        studies["broken"] = broken
        for name, datasets in studies.items():
            write_series(datasets, directory / "studies" / name)
        node.storescu(directory / "studies")
        jobs = {name: node.wait_for_job(datasets[0].StudyInstanceUID, timeout=600) for name, datasets in studies.items()}
        assert jobs["broken"]["state"] == "failed", jobs["broken"]
        for name in ("demo", *(f"phantom-{seed}" for seed in PHANTOM_SEEDS)):
            assert jobs[name]["state"] == "done", jobs[name]
            assert jobs[name]["result"]["lesion_voxels"] > 0, (name, jobs[name]["result"]["plausibility"])

        # Our own SEG/SRs make each study stable again: let those re-runs end, then hold one job
        # running from "another machine" (this process claims it through the job store's lease,
        # as a remote worker would) while the node's own worker is stopped for a moment.
        quiet_since = [time.monotonic()]

        def quiet() -> bool:
            counts = node.get("/abscess-node/jobs/counts")["jobs"]
            if counts["queued"] or counts["running"]:
                quiet_since[0] = time.monotonic()
            return time.monotonic() - quiet_since[0] > 3

        wait_until(quiet, 300, "the queue to stay empty")
        store = open_job_store(directory / "jobs.sqlite")
        worker = worker_pid(node)
        os.kill(worker, signal.SIGSTOP)
        try:
            running_study = studies["phantom-21"][0].StudyInstanceUID
            queued = node.http.post(f"{node.url}/abscess-node/studies/{orthanc_id(node, running_study)}/process",
                                    timeout=30).json()
            running, held = store.claim(EXTERNAL_WORKER, lease_seconds=600)
            assert running["id"] == queued["id"]
            store.update(held, stage="segment")
        finally:
            os.kill(worker, signal.SIGCONT)
        yield SimpleNamespace(node=node, studies=studies, jobs=jobs, running=store.get(running["id"]),
                              metrics_at_start=metrics_at_start, directory=directory)
    finally:
        if held is not None:
            open_job_store(directory / "jobs.sqlite").finish(held, "skipped", error="released by the test's external worker")
        node.stop()


def keep_screenshot(source: str, name: str) -> None:
    """The README's screenshots come from this test (ABSCESS_UPDATE_SCREENSHOTS=1)."""
    if os.environ.get("ABSCESS_UPDATE_SCREENSHOTS"):
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, SCREENSHOTS / name)


def test_metrics_parse_and_move_after_jobs(ui_node):
    before, after = ui_node.metrics_at_start, scrape(ui_node.node)
    processed = 1 + len(PHANTOM_SEEDS)

    def grown(name: str, labels: tuple = ()) -> float:
        return after.get((name, labels), 0.0) - before.get((name, labels), 0.0)

    assert grown("abscess_node_jobs_finished_total", (("state", "done"),)) == processed
    assert grown("abscess_node_jobs_finished_total", (("state", "failed"),)) == 1
    assert after[("abscess_node_jobs", (("state", "running"),))] == 1
    for stage in ("download", "segment", "index", "store"):
        assert grown("abscess_node_stage_seconds_count", (("stage", stage),)) >= processed, stage
    assert grown("abscess_node_stage_seconds_sum", (("stage", "segment"),)) > 0
    assert grown("abscess_node_study_to_seg_seconds_count", (("source", "live"),)) == processed
    slices = sum(len(ui_node.studies[name]) for name in ("demo", *(f"phantom-{seed}" for seed in PHANTOM_SEEDS)))
    assert after[("abscess_node_index_studies", ())] == processed
    assert after[("abscess_node_index_vectors", (("space", "slice"),))] == slices
    assert after[("abscess_node_index_vectors", (("space", "roi"),))] > 0
    assert not [key for key in after if key[0] == "abscess_node_forward_failures_total"]  # every forward went through


def test_the_webhook_receiver_gets_one_call_per_finished_job(ui_node, receiver):
    node = ui_node.node

    def notified_jobs() -> list[dict]:
        return [job for job in node.get("/abscess-node/jobs", limit=200) if job["state"] in ("done", "failed")]

    wait_until(lambda: {job["id"] for job in notified_jobs()} <= {body["job_id"] for body in receiver.bodies},
               60, "a webhook call for every done and failed job")
    calls: dict[int, list[dict]] = {}
    for body in receiver.bodies:
        calls.setdefault(body["job_id"], []).append(body)
    finished = {job["id"]: job for job in notified_jobs()}
    assert set(calls) == set(finished), "a call for a job that is neither done nor failed (skipped, running)"
    for job_id, bodies in calls.items():
        assert len(bodies) == 1, f"job {job_id}: {len(bodies)} calls"
        assert bodies[0]["state"] == finished[job_id]["state"] and bodies[0]["study_uid"] == finished[job_id]["study_uid"]
    failed = calls[ui_node.jobs["broken"]["id"]][0]
    assert failed["event"] == "job.failed" and "PixelSpacing (0028,0030)" in failed["error"]
    text = json.dumps(receiver.bodies)
    for secret in ("Demo^HeadNeck", "Phantom^", "Broken^Slice", "UI-21", "UI-BROKEN", "UIACC21"):
        assert secret not in text, secret


def test_ohif_root_opens_the_viewer(ui_node):
    node = ui_node.node
    root = node.http.get(node.url + "/ohif/", timeout=30)
    assert root.status_code == 200 and root.headers["Content-Type"].startswith("text/html")
    assert root.content == node.http.get(node.url + "/ohif/index.html", timeout=30).content
    assert 'window.PUBLIC_URL="/ohif/"' in root.text and "/ohif/app-config.js" in root.text


def test_unauthenticated_access_is_refused(ui_node):
    node = ui_node.node
    demo_id = orthanc_id(node, ui_node.studies["demo"][0].StudyInstanceUID)
    for method, path in (("GET", "/abscess-node/ui/"), ("GET", "/abscess-node/ui/similar.html"),
                         ("GET", "/abscess-node/metrics"), ("GET", "/abscess-node/jobs/counts"),
                         ("GET", f"/abscess-node/studies/{demo_id}/gallery"), ("GET", "/abscess-node/thumbnails/abc"),
                         ("POST", f"/abscess-node/jobs/{ui_node.jobs['broken']['id']}/retry"), ("GET", "/ohif/")):
        assert requests.request(method, node.url + path, timeout=10).status_code == 401, path
    # and an authenticated POST without the JSON content type (what a cross-site form would send) changes nothing
    forged = node.http.post(f"{node.url}/abscess-node/jobs/{ui_node.jobs['broken']['id']}/retry",
                            data="x=1", headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=10)
    assert forged.status_code == 415


def test_dashboard_shows_jobs_and_retries_the_failed_one(ui_node, tmp_path, browser_driver):
    node, jobs = ui_node.node, ui_node.jobs
    done, failed, running = jobs["demo"], jobs["broken"], ui_node.running
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    result = browser_driver("check_ui.mjs", {"mode": "dashboard", "url": node.url + "/abscess-node/ui/", "ohifUrl": node.url + "/ohif/",
                         "credentials": {"username": node.credentials[0], "password": node.credentials[1]},
                         "outDir": str(ARTIFACTS), "expand": [running["id"], failed["id"], done["id"]],
                         "retry": failed["id"]}, tmp_path)
    (ARTIFACTS / "dashboard-result.json").write_text(json.dumps(result, indent=1))
    shown = {int(job_id): fields for job_id, fields in result["jobs"].items()}

    # done: the chosen series and why, seconds per stage, attempts, the forward per destination, links
    page = shown[done["id"]]
    assert page["state"] == "done" and "done" in page["row"]
    assert done["series_uid"] in page["details"] and done["selection"]["why"] in page["details"]
    for stage in done["timings"]:
        assert re.search(rf"{stage}\s+\d+\.\d+ s", page["details"]), stage
    assert "attempts (1)" in page["details"].lower() and "forward: sent after 1 attempt(s)" in page["details"]
    assert any(f"/ohif/viewer?StudyInstanceUIDs={done['study_uid']}" in link for link in page["links"])
    assert any(f"/app/explorer.html#study?uuid={done['orthanc_study_id']}" in link for link in page["links"])
    assert any(f"similar.html?study={done['orthanc_study_id']}" in link for link in page["links"])
    assert page["actions"] == ["rerun"]
    # failed: its error text and attempt; the action is retry
    page = shown[failed["id"]]
    assert page["state"] == "failed" and "PixelSpacing (0028,0030)" in page["row"] + page["details"]
    assert "attempt 1" in page["details"] and page["actions"] == ["retry"]
    # running: its worker and stage
    page = shown[running["id"]]
    assert page["state"] == "running" and "segment" in page["row"] and EXTERNAL_WORKER in page["details"]
    assert "running (1)" in result["tabs"] and "failed (1)" in result["tabs"]

    # retry (confirmed in a dialog) queued the failed study again, as a new job
    assert result["dialogs"] and "Queue study" in result["dialogs"][0]
    retried = node.get(f"/abscess-node/jobs/{result['retried']['id']}")
    assert retried["reason"] == "retry" and retried["study_uid"] == failed["study_uid"] and retried["id"] > failed["id"]
    assert node.get(f"/abscess-node/jobs/{failed['id']}")["state"] == "failed"
    assert f"re-queued as #{retried['id']}" in result["failedRowAfterRetry"]

    assert result["anonymousStatus"] == 401
    assert result["ohif"]["status"] == 200 and result["ohif"]["text"]  # /ohif/ renders OHIF's study list
    assert not result["outsideRequests"], result["outsideRequests"]
    assert not [error for error in result["consoleErrors"] if "Content Security Policy" in error]
    keep_screenshot(result["screenshot"], "dashboard.png")


def has_overlay(picture: np.ndarray) -> int:
    """Pixels of the overlay's orange (the CT is grey: R = G = B)."""
    return int(((picture[..., 0] > 200) & (picture[..., 1] < 140) & (picture[..., 2] < 90)).sum())


def test_gallery_of_the_demo_study(ui_node, tmp_path, browser_driver):
    node = ui_node.node
    demo_uid = ui_node.studies["demo"][0].StudyInstanceUID
    demo_id = orthanc_id(node, demo_uid)
    before = scrape(node).get(("abscess_node_similar_query_seconds_count", (("route", "rest"),)), 0.0)
    answer = node.http.get(f"{node.url}/abscess-node/studies/{demo_id}/gallery", params={"mode": "roi", "k": K},
                           timeout=120).json()
    thumbnail_urls = [pair[key] for case in answer["cases"] for pair in case["pairs"]
                      for key in ("query_thumbnail", "matched_thumbnail")]
    assert thumbnail_urls and not [url for url in thumbnail_urls if re.search(r"\d+\.\d+\.\d+", url)]  # no UID in a URL

    out = ARTIFACTS / "gallery"
    shutil.rmtree(out, ignore_errors=True)
    result = browser_driver("check_ui.mjs", {"mode": "gallery", "url": f"{node.url}/abscess-node/ui/similar.html?study={demo_id}&mode=roi&k={K}",
                         "credentials": {"username": node.credentials[0], "password": node.credentials[1]},
                         "refusedCredentials": {"username": CLERK[0], "password": CLERK[1]}, "cases": len(answer["cases"]),
                         "outDir": str(out)}, tmp_path)
    (out / "result.json").write_text(json.dumps(result, indent=1))
    # at most K: the studies holding the nearest ROI slice of some query ROI slice (one-neighbour hit table)
    assert 1 <= len(answer["cases"]) <= K
    assert [card["rank"] for card in result["cards"]] == list(range(1, len(answer["cases"]) + 1))
    phantom_uids = {ui_node.studies[f"phantom-{seed}"][0].StudyInstanceUID for seed in PHANTOM_SEEDS}
    for card in result["cards"]:
        assert re.search(r"score \d\.\d{3} · roi", card["text"]) and "lesion" in card["text"] and "ml" in card["text"]
        assert any(f"/ohif/viewer?StudyInstanceUIDs={uid}" in link for link in card["links"] for uid in phantom_uids)
        (pair,) = card["pairs"]
        assert "query slice" in pair["text"] and "matched slice" in pair["text"]
        query, matched = (Image.open(pair["screenshots"][role]).convert("RGB") for role in ("query", "matched"))
        assert query.width == matched.width == 256  # as laid out on the page (the slices' aspects may differ)
        difference = np.abs(np.asarray(query.resize((256, 256)), int) - np.asarray(matched.resize((256, 256)), int))
        assert difference.mean() > 5, "the query and the matched slice look the same"
        assert has_overlay(np.asarray(query, int)) > 10 and has_overlay(np.asarray(matched, int)) > 10, "no overlay"
    assert result["refusedCards"] == 0 and "not allowed" in result["refusedNotice"]
    assert not result["outsideRequests"], result["outsideRequests"]
    after = scrape(node)[("abscess_node_similar_query_seconds_count", (("route", "rest"),))]
    assert after >= before + 2  # this JSON request and the admin's page (a refusal is audited, not timed)
    keep_screenshot(result["screenshot"], "gallery.png")

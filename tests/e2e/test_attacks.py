"""The node under attack, with real parts: unsafe configurations refused at start, a pixel bomb,
patient identity kept out of logs and job errors, DICOM TLS for C-STORE and similar-case C-FIND."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from dicom_node.config import CHECKOUT
from dicom_node.private_files import write_private_file
from tooling.convert import StudyInfo, volume_to_ct_series, write_series
from tooling.orthanc_harness import OrthancProcess, free_port, scratch_node_configuration

PHI = StudyInfo(patient_name="Zyxwq^Qwertzia", patient_id="PHI-7734521", patient_birth_date="19451231",
                accession_number="ACCPHI998877", study_description="CT NECK PHI TEST")
PHI_VALUES = ("Zyxwq", "Qwertzia", "PHI-7734521", "19451231", "ACCPHI998877")


def test_unsafe_http_configurations_keep_the_node_from_starting(tmp_path: Path):
    for name, overrides, expected in (
        ("open", {"RemoteAccessAllowed": True, "AuthenticationEnabled": False},
         "RemoteAccessAllowed is true while AuthenticationEnabled is false"),
        ("nopassword", {"RegisteredUsers": {"admin": "${ABSCESS_NODE_UNSET_VARIABLE_FOR_THE_TEST}"}},
         "RegisteredUsers.admin has an empty or short password"),
    ):
        config = scratch_node_configuration(tmp_path / name, {"WorkerCount": 0}, **overrides)
        node = OrthancProcess(config, tmp_path / name, credentials=("admin", "whatever-it-is"))
        with pytest.raises(RuntimeError) as refused:
            node.start(timeout=30)
        node.stop()
        assert "refusing to start" in str(refused.value) and expected in str(refused.value)


def send(node: OrthancProcess, datasets: list[pydicom.Dataset], directory: Path) -> str:
    write_series(datasets, directory)
    node.storescu(directory)
    return datasets[0].StudyInstanceUID


def test_pixel_bomb_fails_fast_and_the_node_keeps_working(start_node, ct_crop, tmp_path):
    node = start_node("bomb")
    datasets = volume_to_ct_series(ct_crop(12), (2.5, 1.0, 1.0), uid_seed="pixel-bomb")
    datasets[5].Rows = datasets[5].Columns = 30000  # a 1.8 GB slice declared by an 8 kB file
    job = node.wait_for_job(send(node, datasets, tmp_path / "bomb"), timeout=300)
    assert job["state"] == "failed"
    assert "30000 x 30000 pixels, more than SeriesRules.MaxPixelsPerSlice=1048576" in job["error"]
    assert datasets[5].SOPInstanceUID in job["error"]
    healthy = volume_to_ct_series(ct_crop(12), (2.5, 1.0, 1.0), uid_seed="after-the-bomb")
    assert node.wait_for_job(send(node, healthy, tmp_path / "healthy"), timeout=300)["state"] == "done"


def test_patient_identity_stays_out_of_logs_and_job_errors(start_node, ct_crop, tmp_path):
    node = start_node("phi")
    good = volume_to_ct_series(ct_crop(12), (2.5, 1.0, 1.0), uid_seed="phi-good", info=PHI)
    assert node.wait_for_job(send(node, good, tmp_path / "good"), timeout=300)["state"] == "done"
    broken = volume_to_ct_series(ct_crop(12), (2.5, 1.0, 1.0), uid_seed="phi-broken", info=PHI)
    del broken[4].PixelSpacing
    failed = node.wait_for_job(send(node, broken, tmp_path / "broken"), timeout=300)
    assert failed["state"] == "failed" and broken[4].SOPInstanceUID in failed["error"]
    served = json.dumps(node.get("/abscess-node/jobs"))
    logs = {path.name: path.read_text(errors="replace") for path in (node.directory / "logs").glob("*") if path.is_file()}
    assert {"worker-0.log", "similar-service.log"} <= set(logs)
    for value in PHI_VALUES:
        assert value.lower() not in served.lower(), f"{value} in the jobs API"
        for name, text in logs.items():
            assert value.lower() not in text.lower(), f"{value} in {name}"


def make_certificates(directory: Path) -> dict[str, Path]:
    """A test CA, a server certificate for 127.0.0.1 and a client certificate (openssl)."""
    directory.mkdir(parents=True, exist_ok=True)

    def run(*arguments: str) -> None:
        subprocess.run(["openssl", *arguments], check=True, capture_output=True, cwd=directory, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=abscess-node test CA",
        "-keyout", "ca.key", "-out", "ca.crt")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.csr")
        (directory / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
            "-extfile", f"{name}.ext", "-out", f"{name}.crt")
    return {name: directory / name for name in ("ca.crt", "server.key", "server.crt", "client.key", "client.crt")}


def tls_find(port: int, called: str, certificates: dict[str, Path], study_uid: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["findscu", "-v", "-S", "+tls", str(certificates["client.key"]), str(certificates["client.crt"]),
         "+cf", str(certificates["ca.crt"]), "-aet", "VIEWER", "-aec", called, "127.0.0.1", str(port),
         "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}", "-k", "PatientID"],
        capture_output=True, text=True, timeout=120)


def test_dicom_tls_store_and_similar_case_find(start_node, ct_crop, tmp_path):
    certificates = make_certificates(tmp_path / "pki")
    node = start_node(
        "tls", {"AllowedSimilarCasesAets": ["VIEWER"]},
        DicomTlsEnabled=True, DicomTlsCertificate=str(certificates["server.crt"]),
        DicomTlsPrivateKey=str(certificates["server.key"]), DicomTlsTrustedCertificates=str(certificates["ca.crt"]),
        DicomTlsRemoteCertificateRequired=True, DicomModalities={"viewer": ["VIEWER", "127.0.0.1", free_port()]})
    studies = []
    for seed, z0 in (("tls-a", 0), ("tls-b", 30)):
        datasets = volume_to_ct_series(ct_crop(12, z0=z0), (2.5, 1.0, 1.0), uid_seed=seed)
        write_series(datasets, tmp_path / seed)
        plain = subprocess.run(["storescu", "-aet", "PACS", "-aec", node.aet, "+sd", "+r", "127.0.0.1",
                                str(node.dicom_port), str(tmp_path / seed)], capture_output=True, text=True, timeout=120)
        assert plain.returncode != 0 or "Store Failed" in plain.stderr or "failed" in plain.stderr.lower()
        sent = subprocess.run(
            ["storescu", "+tls", str(certificates["client.key"]), str(certificates["client.crt"]),
             "+cf", str(certificates["ca.crt"]), "-aet", "PACS", "-aec", node.aet, "+sd", "+r", "127.0.0.1",
             str(node.dicom_port), str(tmp_path / seed)], capture_output=True, text=True, timeout=120)
        assert sent.returncode == 0 and "Store Failed" not in sent.stderr, sent.stderr
        studies.append(datasets[0].StudyInstanceUID)
    for study_uid in studies:
        assert node.wait_for_job(study_uid, timeout=300)["state"] == "done"
    found = tls_find(node.dicom_port, "ABSCESS_SIMILAR", certificates, studies[0])
    assert found.returncode == 0 and "Received Final Find Response (Success)" in found.stderr, found.stderr
    assert studies[1] in found.stderr and found.stderr.count("Find Response") >= 2

    # the standalone similar-cases AE over TLS (pynetdicom ssl_context), on 127.0.0.1 by default
    port = free_port()
    password_file = node.directory / "admin-password"
    write_private_file(password_file, node.credentials[1])
    process = subprocess.Popen(
        [sys.executable, "-m", "dicom_node", "serve", "--config", str(node.directory / "orthanc.json"), "--port", str(port),
         "--aet", "SIMILAR_TLS", "--orthanc-password-file", str(password_file),
         "--tls-certificate", str(certificates["server.crt"]), "--tls-private-key", str(certificates["server.key"]),
         "--tls-trusted-certificates", str(certificates["ca.crt"])],
        cwd=str(CHECKOUT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            answered = tls_find(port, "SIMILAR_TLS", certificates, studies[0])
            if answered.returncode == 0:
                break
            time.sleep(1.0)
        assert "Received Final Find Response (Success)" in answered.stderr, answered.stderr
        assert studies[1] in answered.stderr
        plain = AE(ae_title="VIEWER")
        plain.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        association = plain.associate("127.0.0.1", port, ae_title="SIMILAR_TLS")
        assert not association.is_established  # no TLS, no association
    finally:
        process.terminate()
        process.wait(10)

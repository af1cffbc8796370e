"""Similar-case C-FIND, its REST twin and the standalone AE, against the real Orthanc fixture.

Three small real-CT studies (crops of the head-and-neck CT) are processed once per module; the
queries use dcmtk's findscu/movescu/dsrdump and pynetdicom SCUs, as a viewer or PACS would.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification

from dicom_node.config import CHECKOUT
from dicom_node.private_files import write_private_file
from dicom_node.similar.request import PRIVATE_CREATOR, PRIVATE_GROUP
from tooling.convert import StudyInfo, volume_to_ct_series, write_series
from tooling.dciodvfy import assert_valid
from tooling.orthanc_harness import OrthancProcess, free_port, scratch_node_configuration

SIMILAR_AET = "ABSCESS_SIMILAR"
VIEWER = "VIEWER"
STRANGER = "STRANGER"  # known to Orthanc (may C-FIND), not allowed similar cases
CLERK = "clerk"  # an HTTP user Orthanc knows, not in AllowedSimilarCasesUsers


STUDIES = [
    ("sim-a", 0, StudyInfo(patient_name="Doe^Alice", patient_id="SIM-A", study_date="20200105", accession_number="ACCN-A",
                           study_description="CT NECK A", patient_sex="F")),
    ("sim-b", 4, StudyInfo(patient_name="Doe^Bob", patient_id="SIM-B", study_date="20210610", accession_number="ACCN-B",
                           study_description="CT NECK B", patient_sex="M")),
    ("sim-c", 40, StudyInfo(patient_name="Roe^Carol", patient_id="SIM-C", study_date="20220301", accession_number="ACCN-C",
                            study_description="ct neck c", patient_sex="F")),
]


@pytest.fixture(scope="module")
def similar_node(tmp_path_factory, weights_path, ct_crop):
    """Our Orthanc (K=2, VIEWER allowed) holding three processed studies and one MR study."""
    directory = tmp_path_factory.mktemp("similar-node")
    viewer_port = free_port()
    config = scratch_node_configuration(
        directory, {"WeightsPath": str(weights_path), "ChunkSlices": 32, "SimilarCasesTopK": 2,
                    "AllowedSimilarCasesAets": [VIEWER], "SimilarCasesAet": SIMILAR_AET,
                    "SeriesRules": {"RequireNeckCoverage": False}},  # the studies are 64 x 64 crops
        DicomAet="ABSCESS_NODE",
        DicomModalities={"viewer": [VIEWER, "127.0.0.1", viewer_port], "stranger": [STRANGER, "127.0.0.1", 1]})
    config["RegisteredUsers"][CLERK] = "clerk-password-not-on-the-list"  # authenticated, not allowed similar cases
    node = OrthancProcess(config, directory).start()
    studies = {}
    try:
        for seed, z0, info in STUDIES:
            datasets = volume_to_ct_series(ct_crop(12, z0=z0), (2.5, 1.0, 1.0), info=info, uid_seed=seed)
            write_series(datasets, directory / seed)
            studies[seed] = datasets
        mr = volume_to_ct_series(ct_crop(3), (2.5, 1.0, 1.0), uid_seed="sim-mr",
                                 info=StudyInfo(patient_name="DOE^DAN", patient_id="SIM-D", study_date="20190101",
                                                study_description="MR HEAD", accession_number="ACCN-D"))
        for ds in mr:
            ds.Modality = "MR"
        write_series(mr, directory / "sim-mr")
        studies["sim-mr"] = mr
        node.storescu([directory / seed for seed in studies])
        for seed, datasets in studies.items():
            job = node.wait_for_job(datasets[0].StudyInstanceUID, timeout=600)
            assert job["state"] == ("skipped" if seed == "sim-mr" else "done"), job
        node.viewer_port = viewer_port
        node.studies = studies
        yield node
    finally:
        node.stop()


def private(dataset: Dataset, offset: int):
    """Value of our private element (block found by its creator)."""
    block = dataset.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    return dataset[block.get_tag(offset)].value


def c_find(port: int, identifier: Dataset, called: str = SIMILAR_AET, calling: str = VIEWER) -> list[tuple[Dataset, Dataset | None]]:
    """Every response (status, identifier) of one pynetdicom C-FIND."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established
    try:
        return list(assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind))
    finally:
        assoc.release()


def study_query(study_uid: str, k: int | None = None, mode: str | None = None, filters: list[str] | None = None,
                store_report: bool = False) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_uid
    for keyword in ("PatientName", "PatientID", "StudyDate", "StudyDescription", "AccessionNumber", "ModalitiesInStudy",
                    "RetrieveAETitle"):
        setattr(identifier, keyword, "")
    if k or mode or filters or store_report:
        block = identifier.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
        if store_report:
            block.add_new(0x24, "CS", "YES")
        if k:
            block.add_new(0x20, "IS", str(k))
        if mode:
            block.add_new(0x12, "LO", mode)
        if filters:
            block.add_new(0x21, "LO", filters)
    return identifier


def findscu(node, *keys: str, calling: str = VIEWER, called: str = SIMILAR_AET, out: Path, root: str = "-S") -> tuple[subprocess.CompletedProcess, list[Dataset]]:
    """dcmtk findscu; the responses it extracted (-X), in arrival order."""
    out.mkdir(parents=True, exist_ok=True)
    command = ["findscu", "-v", root, "-aet", calling, "-aec", called, "-X", "-od", str(out), "127.0.0.1",
               str(node.dicom_port)] + [arg for key in keys for arg in ("-k", key)]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
    return done, [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def private_or_none(dataset: Dataset, offset: int):
    """Value of our private element, or None when the answer does not carry it."""
    try:
        return private(dataset, offset)
    except KeyError:
        return None


def instance_count(node) -> int:
    return int(node.get("/statistics")["CountInstances"])


def test_findscu_study_query_gives_ranked_answers(similar_node, tmp_path):
    query_uid = similar_node.studies["sim-a"][0].StudyInstanceUID
    before = instance_count(similar_node)
    done, answers = findscu(
        similar_node, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={query_uid}", "PatientName", "PatientID",
        "StudyDate", "StudyDescription", "AccessionNumber", "ModalitiesInStudy", "RetrieveAETitle",
        f"(0041,0010)={PRIVATE_CREATOR}", out=tmp_path)
    assert done.returncode == 0, done.stderr
    (tmp_path / "findscu.log").write_text(done.stderr)
    # at most SimilarCasesTopK: the studies that hold the nearest slice of some query slice (the
    # hit table of Khun Jush et al. with one neighbour per query slice)
    assert 1 <= len(answers) <= 2
    ranks = [int(private(a, 0x10)) for a in answers]
    scores = [float(private(a, 0x11)) for a in answers]
    assert ranks == list(range(1, len(answers) + 1)) and scores == sorted(scores, reverse=True)
    others = {ds[0].StudyInstanceUID: ds[0] for seed, ds in similar_node.studies.items() if seed in ("sim-b", "sim-c")}
    assert {a.StudyInstanceUID for a in answers} <= set(others)
    for answer in answers:
        source = others[answer.StudyInstanceUID]
        assert answer.PatientID == source.PatientID and str(answer.PatientName) == str(source.PatientName)
        assert answer.StudyDate == source.StudyDate and answer.AccessionNumber == source.AccessionNumber
        assert answer.StudyDescription == source.StudyDescription
        assert "CT" in answer.ModalitiesInStudy and "SEG" in answer.ModalitiesInStudy
        assert answer.RetrieveAETitle == "ABSCESS_NODE" and answer.QueryRetrieveLevel == "STUDY"
        assert private(answer, 0x12) == "study"
    assert len({private_or_none(a, 0x13) for a in answers}) == 1  # the pipeline's SR for all, or none
    assert "Received Final Find Response (Success)" in done.stderr
    assert instance_count(similar_node) == before  # a query is a read: nothing stored


def test_default_study_query_reuses_the_pipeline_report(similar_node):
    """The default query (STUDY level, default K and mode) points at the SR the pipeline wrote: nothing is stored."""
    jobs = [similar_node.wait_for_job(datasets[0].StudyInstanceUID)
            for seed, datasets in similar_node.studies.items() if seed != "sim-mr"]
    latest = max(jobs, key=lambda job: job["id"])  # indexed last: its report can list both others
    listed = [item["study_uid"] for item in latest["result"]["similar_studies"]]
    assert 1 <= len(listed) <= 2  # those the one-neighbour hit table reaches
    before = similar_node.get("/statistics")["CountInstances"]
    answers = [i for s, i in c_find(similar_node.dicom_port, study_query(latest["study_uid"])) if s.Status == 0xFF00]
    assert [answer.StudyInstanceUID for answer in answers] == listed
    assert {private(answer, 0x13) for answer in answers} == {latest["result"]["similar_cases"]["sop_instance_uid"]}
    assert similar_node.get("/statistics")["CountInstances"] == before


def retrieve_sr(node, sr_uid: str, study_uid: str, directory: Path) -> Path:
    """C-MOVE the SR from Orthanc with dcmtk's movescu (its own storage SCP as destination)."""
    directory.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(  # noqa: PLW1510
        ["movescu", "-v", "-S", "-aet", VIEWER, "-aec", node.aet, "-aem", VIEWER, "--port", str(node.viewer_port),
         "-od", str(directory), "127.0.0.1", str(node.dicom_port), "-k", "QueryRetrieveLevel=IMAGE",
         "-k", f"StudyInstanceUID={study_uid}", "-k", f"SOPInstanceUID={sr_uid}"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    files = [p for p in directory.iterdir() if p.is_file()]
    assert len(files) == 1, done.stderr
    return files[0]


def test_asked_for_sr_is_retrieved_with_movescu_valid_and_pseudonymised(similar_node, tmp_path):
    """Store Similar Cases Report = YES: an SR of the answers in the query study, naming the other
    patients only by keyed pseudonyms (SimilarCasesReport "pseudonymized", the default)."""
    query_uid = similar_node.studies["sim-a"][0].StudyInstanceUID
    responses = c_find(similar_node.dicom_port, study_query(query_uid, store_report=True))
    answers = [ident for status, ident in responses if status.Status == 0xFF00]
    sr_uid = private(answers[0], 0x13)
    path = retrieve_sr(similar_node, sr_uid, query_uid, tmp_path / "moved")
    assert_valid(path)
    sr = pydicom.dcmread(path)
    assert sr.SOPInstanceUID == sr_uid and sr.StudyInstanceUID == query_uid
    assert sr.ConceptNameCodeSequence[0].CodeMeaning == "Similar cases"
    dump = subprocess.run(["dsrdump", str(path)], check=False, capture_output=True, text=True, timeout=60)
    assert dump.returncode == 0, dump.stderr
    assert dump.stdout.count('CONTAINER:(,,"Similar case")') == len(answers)
    written = path.read_bytes()
    for answer in answers:  # the C-FIND caller is allowed to see them; the stored SR does not name them
        for value in (answer.StudyInstanceUID, answer.PatientID, str(answer.PatientName), answer.AccessionNumber):
            assert value.encode() not in written
    assert b"PID-" in written


def test_on_demand_sr_only_when_asked_and_idempotent(similar_node, tmp_path):
    query_uid = similar_node.studies["sim-a"][0].StudyInstanceUID
    before = instance_count(similar_node)
    plain = c_find(similar_node.dicom_port, study_query(query_uid, k=1, mode="study-count"))
    assert [hex(s.Status) for s, _ in plain] == ["0xff00", "0x0"]
    assert private_or_none(plain[0][1], 0x13) is None and instance_count(similar_node) == before
    responses = c_find(similar_node.dicom_port, study_query(query_uid, k=1, mode="study-count", store_report=True))
    answer = responses[0][1]
    assert int(private(answer, 0x10)) == 1 and private(answer, 0x12) == "study-count"
    sr_uid = private(answer, 0x13)
    assert instance_count(similar_node) == before + 1
    again = c_find(similar_node.dicom_port, study_query(query_uid, k=1, mode="study-count", store_report=True))
    assert private(again[0][1], 0x13) == sr_uid and instance_count(similar_node) == before + 1  # same query, same SR
    path = retrieve_sr(similar_node, sr_uid, query_uid, tmp_path / "moved")
    assert_valid(path)
    dump = subprocess.run(["dsrdump", str(path)], check=False, capture_output=True, text=True, timeout=60)
    assert dump.returncode == 0 and "study-count" in dump.stdout and answer.StudyInstanceUID not in dump.stdout


def test_image_and_seg_series_queries(similar_node):
    ct = similar_node.studies["sim-b"]
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "IMAGE"
    identifier.StudyInstanceUID = ct[0].StudyInstanceUID
    identifier.SeriesInstanceUID = ""
    identifier.SOPInstanceUID = ct[5].SOPInstanceUID
    responses = c_find(similar_node.dicom_port, identifier)
    assert responses[-1][0].Status == 0x0000
    answers = [i for s, i in responses if s.Status == 0xFF00]
    assert answers and all(a.QueryRetrieveLevel == "IMAGE" and a.SOPInstanceUID for a in answers)
    assert ct[0].StudyInstanceUID not in {a.StudyInstanceUID for a in answers}

    seg_series = similar_node.http.post(similar_node.url + "/tools/find", json={
        "Level": "Series", "Query": {"StudyInstanceUID": ct[0].StudyInstanceUID, "Modality": "SEG"}, "Expand": True},
        timeout=30).json()[0]["MainDicomTags"]["SeriesInstanceUID"]
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "SERIES"
    identifier.SeriesInstanceUID = seg_series
    responses = c_find(similar_node.dicom_port, identifier)
    assert responses[-1][0].Status == 0x0000, responses
    for status, answer in responses[:-1]:
        assert private(answer, 0x12) == "roi" and answer.QueryRetrieveLevel == "SERIES"


def test_refusal_and_failures_through_orthanc(similar_node):
    query_uid = similar_node.studies["sim-a"][0].StudyInstanceUID
    refused = c_find(similar_node.dicom_port, study_query(query_uid), calling=STRANGER)
    assert [s.Status for s, _ in refused] == [0xC000]  # orthanc-python 4.0 cannot send 0x0124
    malformed = Dataset()
    malformed.QueryRetrieveLevel = "STUDY"
    assert [s.Status for s, _ in c_find(similar_node.dicom_port, malformed)] == [0xC000]
    unknown = c_find(similar_node.dicom_port, study_query("1.2.3.4.5.6.7"))
    assert [s.Status for s, _ in unknown] == [0xC000]
    log = (similar_node.directory / "logs" / "similar-service.log").read_text()
    assert f"similar-cases C-FIND from {STRANGER}: status 0x0124" in log
    assert "Doe" not in log and "SIM-" not in log  # log lines: UIDs and AE titles only
    audit = [json.loads(line) for line in (similar_node.directory / "logs" / "audit.jsonl").read_text().splitlines()]
    assert {"route": "c-find", "caller": STRANGER, "outcome": "refused"}.items() <= audit_line(audit, STRANGER).items()
    answered = [line for line in audit if line["caller"] == VIEWER and line["outcome"] == "answered"]
    assert answered and all(line["count"] == len(line["result_study_uids"]) for line in answered)
    assert not any(value in json.dumps(audit) for value in ("Doe", "SIM-A", "ACCN-B"))  # no names, no IDs


def audit_line(lines: list[dict], caller: str) -> dict:
    """The last audit line of a caller."""
    return [line for line in lines if line["caller"] == caller][-1]


def similar_url(node, study_uid: str, report: bool = False) -> str:
    orthanc_id = node.http.post(node.url + "/tools/lookup", data=study_uid, timeout=30).json()[0]["ID"]
    return f"{node.url}/abscess-node/studies/{orthanc_id}/similar" + ("-report" if report else "")


def test_rest_twin_matches_c_find_and_never_writes(similar_node):
    query_uid = similar_node.studies["sim-a"][0].StudyInstanceUID
    url = similar_url(similar_node, query_uid)
    before = instance_count(similar_node)
    rest = similar_node.http.get(url, params={"k": 2}, timeout=120)
    assert rest.status_code == 200, rest.text
    answers = [i for s, i in c_find(similar_node.dicom_port, study_query(query_uid)) if s.Status == 0xFF00]
    body = rest.json()
    assert [r["study_uid"] for r in body["results"]] == [a.StudyInstanceUID for a in answers]
    assert [r["rank"] for r in body["results"]] == list(range(1, len(answers) + 1))
    assert (body["similar_cases_sr"] or {}).get("sop_instance_uid") == private_or_none(answers[0], 0x13)
    assert body["results"][0]["best_slices"] and "lesions" in body["results"][0]
    assert similar_node.http.get(url, params={"k": 2}, timeout=120).json() == body
    assert instance_count(similar_node) == before  # two GETs, nothing stored
    bad = similar_node.http.get(url, params={"k": 0}, timeout=60)
    assert bad.status_code == 400 and "0xA900" in bad.text
    filtered = similar_node.http.get(url, params={"StudyDate": "20210101-20211231"}, timeout=60).json()
    sim_b = similar_node.studies["sim-b"][0].StudyInstanceUID
    hit = [r["study_uid"] for r in body["results"]]
    assert [r["study_uid"] for r in filtered["results"]] == [uid for uid in hit if uid == sim_b]
    by_lesion = similar_node.http.get(url, params={"filters": "loculi>=1,volume_ml>0"}, timeout=60)  # URL-encoded >=
    assert by_lesion.status_code == 200 and by_lesion.json()["query"]["filters"] == ["loculi>=1", "volume_ml>0"]


def test_rest_answers_only_listed_users(similar_node):
    url = similar_url(similar_node, similar_node.studies["sim-b"][0].StudyInstanceUID)
    assert requests.get(url, timeout=30).status_code == 401  # Orthanc: no credentials, no answer
    assert requests.get(url, auth=("admin", "wrong password!"), timeout=30).status_code == 401
    clerk = requests.get(url, auth=(CLERK, similar_node.config["RegisteredUsers"][CLERK]), timeout=60)
    assert clerk.status_code == 403 and "not allowed" in clerk.json()["error"]
    assert requests.get(similar_node.url + "/abscess-node/jobs", timeout=30).status_code == 401
    audit = [json.loads(line) for line in (similar_node.directory / "logs" / "audit.jsonl").read_text().splitlines()]
    assert audit_line(audit, CLERK)["outcome"] == "refused" and audit_line(audit, "admin")["outcome"] == "answered"


def test_post_stores_the_report_once(similar_node):
    url = similar_url(similar_node, similar_node.studies["sim-b"][0].StudyInstanceUID, report=True)
    before = instance_count(similar_node)
    first = similar_node.http.post(url, json={"k": 1, "mode": "study-count"}, timeout=120)  # Orthanc drops POST query strings
    assert first.status_code == 200, first.text
    sr = first.json()["similar_cases_sr"]
    assert sr and instance_count(similar_node) == before + 1
    assert first.json()["query"]["k"] == 1 and first.json()["query"]["mode"] == "study-count"
    again = similar_node.http.post(url, json={"k": 1, "mode": "study-count"}, timeout=120).json()
    assert again["similar_cases_sr"] == sr and instance_count(similar_node) == before + 1
    assert similar_node.http.get(url, timeout=30).status_code == 405  # the report route takes POST only


def test_hostile_wildcard_answers_at_once(similar_node):
    url = similar_url(similar_node, similar_node.studies["sim-a"][0].StudyInstanceUID)
    started = time.monotonic()
    answer = similar_node.http.get(url, params={"StudyDescription": "*?" * 17}, timeout=60)
    elapsed = time.monotonic() - started
    assert answer.status_code == 200, answer.text
    assert elapsed < 10, f"{elapsed:.1f} s"  # Python's re took hours for this pattern on a long description
    print(f"hostile 34-character wildcard query answered in {elapsed:.3f} s")


def test_the_automatic_report_names_no_other_patient(similar_node):
    """Each processed study's similar-cases SR holds no other patient's ID, name, accession, UIDs."""
    ct_studies = {seed: datasets for seed, datasets in similar_node.studies.items() if seed != "sim-mr"}
    for seed, datasets in ct_studies.items():
        job = similar_node.wait_for_job(datasets[0].StudyInstanceUID)
        written = similar_node.http.get(f"{similar_node.url}{job['result']['similar_cases']['url']}/file", timeout=60).content
        for other_seed, others in ct_studies.items():
            if other_seed == seed:
                continue
            header = others[0]
            for value in (header.PatientID, str(header.PatientName), header.AccessionNumber, header.StudyInstanceUID,
                          header.SeriesInstanceUID):
                assert value.encode() not in written, (seed, value)
        listed = job["result"]["similar_studies"]
        assert written.count(b"PID-") >= len(listed)


@pytest.fixture(scope="module")
def standalone(similar_node):
    """``python -m dicom_node serve`` on the node's orthanc.json (the same index and job store)."""
    port = free_port()
    password_file = similar_node.directory / "admin-password"
    write_private_file(password_file, similar_node.credentials[1])
    process = subprocess.Popen(
        [sys.executable, "-m", "dicom_node", "serve", "--config", str(similar_node.directory / "orthanc.json"), "--port", str(port),
         "--aet", "SIMILAR_SA", "--orthanc-password-file", str(password_file)], cwd=str(CHECKOUT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ae = AE(ae_title=VIEWER)
    ae.add_requested_context(Verification)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assoc = ae.associate("127.0.0.1", port, ae_title="SIMILAR_SA")
        if assoc.is_established:
            assert assoc.send_c_echo().Status == 0x0000
            assoc.release()
            break
        time.sleep(0.5)
    else:
        process.kill()
        pytest.fail(f"standalone AE did not start: {process.communicate(timeout=5)[0]!r}")
    yield port
    process.terminate()
    process.wait(10)


def test_standalone_ae_gives_the_same_answers_and_precise_statuses(similar_node, standalone):
    query_uid = similar_node.studies["sim-a"][0].StudyInstanceUID
    via_orthanc = [i for s, i in c_find(similar_node.dicom_port, study_query(query_uid)) if s.Status == 0xFF00]
    direct = c_find(standalone, study_query(query_uid), called="SIMILAR_SA")
    pending = len(via_orthanc)
    assert pending >= 1 and [s.Status for s, _ in direct] == [0xFF00] * pending + [0x0000]
    assert [i.StudyInstanceUID for _, i in direct[:pending]] == [a.StudyInstanceUID for a in via_orthanc]
    assert [private(i, 0x11) for _, i in direct[:pending]] == [private(a, 0x11) for a in via_orthanc]
    assert all("SEG" in i.ModalitiesInStudy for _, i in direct[:pending])  # looked up in Orthanc, authenticated

    refused = c_find(standalone, study_query(query_uid), called="SIMILAR_SA", calling=STRANGER)
    assert refused[0][0].Status == 0x0124 and "not allowed" in refused[0][0].ErrorComment
    unknown = c_find(standalone, study_query("1.2.3.4.5.6.7"), called="SIMILAR_SA")
    assert unknown[0][0].Status == 0xC001 and "not indexed" in unknown[0][0].ErrorComment
    no_level = Dataset()
    no_level.StudyInstanceUID = query_uid
    assert c_find(standalone, no_level, called="SIMILAR_SA")[0][0].Status == 0xA900
    no_uid = Dataset()
    no_uid.QueryRetrieveLevel = "STUDY"
    status = c_find(standalone, no_uid, called="SIMILAR_SA")[0][0]
    assert status.Status == 0xA900 and status.OffendingElement == 0x0020000D
    bad_k = c_find(standalone, study_query(query_uid, k=500), called="SIMILAR_SA")[0][0]
    assert bad_k.Status == 0xA900 and "K" in bad_k.ErrorComment
    bad_filter = c_find(standalone, study_query(query_uid, filters=["nonsense>>"]), called="SIMILAR_SA")[0][0]
    assert bad_filter.Status == 0xA900


def test_deleting_a_study_erases_it_from_the_index(similar_node):
    """Runs last in this module: it removes from the node the study sim-a's query answers first
    (sim-b or sim-c: the one-neighbour hit table need not reach both)."""
    query = similar_url(similar_node, similar_node.studies["sim-a"][0].StudyInstanceUID)
    deleted_uid = similar_node.http.get(query, timeout=60).json()["results"][0]["study_uid"]
    (remaining_uid,) = {similar_node.studies[seed][0].StudyInstanceUID for seed in ("sim-b", "sim-c")} - {deleted_uid}
    orthanc_id = similar_node.http.post(similar_node.url + "/tools/lookup", data=deleted_uid, timeout=30).json()[0]["ID"]
    assert similar_node.http.delete(f"{similar_node.url}/studies/{orthanc_id}", timeout=60).ok
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = {r["study_uid"] for r in similar_node.http.get(query, timeout=60).json()["results"]}
        if deleted_uid not in found:
            break
        time.sleep(0.5)
    assert deleted_uid not in found, "the deleted study is still returned"
    answers = [i for s, i in c_find(similar_node.dicom_port, study_query(remaining_uid)) if s.Status == 0xFF00]
    assert deleted_uid not in {a.StudyInstanceUID for a in answers}
    audit = [json.loads(line) for line in (similar_node.directory / "logs" / "audit.jsonl").read_text().splitlines()]
    assert any(line["outcome"] == "erased" and line["query_study_uid"] == deleted_uid for line in audit)

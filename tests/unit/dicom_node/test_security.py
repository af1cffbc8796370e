"""Security and privacy building blocks, without Orthanc: matching, bounds, pseudonyms, policy,
audit, start-up checks, PHI redaction, header limits, erasure."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import random
import re
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset

from dicom_node import phi
from dicom_node.config import NodeConfig
from dicom_node.http_security import authenticated_user, body_arguments, orthanc_security_problems, query_arguments
from dicom_node.identity import is_uid
from dicom_node.jobs import open_job_store
from dicom_node.private_files import create_secret
from dicom_node.pseudonyms import Pseudonymizer
from dicom_node.series import InputError, read_geometry
from dicom_node.similar.erasure import erase_pending, reconcile
from dicom_node.similar.policy import AccessPolicy, AuditLog, Caller
from dicom_node.similar.query import SimilarCase, SlicePair, open_index
from dicom_node.similar.request import (
    IDENTIFIER_DOES_NOT_MATCH,
    PRIVATE_CREATOR,
    PRIVATE_GROUP,
    QueryError,
    parse_request,
    wildcard_match,
)
from index.records import SliceRecord, StudyRecord
from tooling.convert import volume_to_ct_series, write_series


def regex_reference(pattern: str, value: str) -> bool:
    translated = "".join({"*": ".*", "?": "."}.get(c, re.escape(c)) for c in pattern)
    return re.fullmatch(translated, value, flags=re.DOTALL) is not None


def test_wildcard_matching_agrees_with_the_regex_semantics():
    rng = random.Random(0)
    for _ in range(5000):
        pattern = "".join(rng.choice("ab*?") for _ in range(rng.randint(0, 9)))
        value = "".join(rng.choice("abc") for _ in range(rng.randint(0, 12)))
        assert wildcard_match(pattern, value) == regex_reference(pattern, value), (pattern, value)
    assert wildcard_match("CT*NECK*", "CT HALS NECK C+") and not wildcard_match("CT?NECK", "CT  NECK")


def test_hostile_wildcard_pattern_is_not_exponential():
    """17 ``*?`` pairs against a 64-character value: the regex needs hours, this a few thousand steps."""
    calls = 0
    original = wildcard_match.__globals__["_piece_at"]

    def counting(piece, value, start):
        nonlocal calls
        calls += 1
        return original(piece, value, start)

    wildcard_match.__globals__["_piece_at"] = counting
    try:
        assert wildcard_match("*?" * 17, "x" * 64)
        assert not wildcard_match("*?" * 17 + "y", "x" * 64)
        assert not wildcard_match("*?" * 32 + "*y", "x" * 64)
    finally:
        wildcard_match.__globals__["_piece_at"] = original
    assert calls < 64 * 70  # at most len(value) x len(pattern) piece comparisons


def identifier(**private_values) -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = "1.2.3"
    block = query.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    for offset, (vr, value) in private_values.items():
        block.add_new(int(offset[1:], 16), vr, value)
    return query


@pytest.mark.filterwarnings("ignore:The value length")
@pytest.mark.parametrize(("build", "message"), [
    (lambda: identifier(x21=("LO", [f"loculi>={i}" for i in range(9)])), "at most 8 filters"),
    (lambda: identifier(x21=("LO", ["volume_ml>" + "9" * 70])), "at most 8 filters of 64 characters"),
    (lambda: identifier(x20=("IS", "101")), "outside 1..100"),
    (lambda: identifier(x22=("IS", ["0", "999999"])), "slice range"),
    (lambda: identifier(x24=("CS", "MAYBE")), "must be YES or NO"),
])
def test_hostile_identifiers_are_refused_with_a900(build, message):
    with pytest.raises(QueryError, match=message) as raised:
        parse_request(build(), default_k=5)
    assert raised.value.status == IDENTIFIER_DOES_NOT_MATCH


@pytest.mark.filterwarnings("ignore:The value length")
def test_oversized_identifier_and_description_are_refused():
    query = identifier()
    query.StudyDescription = "*" * 65
    with pytest.raises(QueryError, match="longer than its VR allows"):
        parse_request(query, default_k=5)
    crowded = identifier()
    for element in range(0x1000, 0x1000 + 70):
        crowded.add_new((0x0009, element), "LO", "x")
    with pytest.raises(QueryError, match="more than 64 elements"):
        parse_request(crowded, default_k=5)
    assert parse_request(identifier(x24=("CS", "YES")), default_k=5).store_report


def test_pseudonyms_are_keyed_stable_and_not_an_unkeyed_hash(tmp_path: Path):
    secret = tmp_path / "secrets" / "pseudonym.key"
    assert create_secret(secret) and not create_secret(secret)  # created once
    assert oct(secret.stat().st_mode & 0o777) == "0o600"
    node = Pseudonymizer.from_file(secret)
    again = Pseudonymizer.from_file(secret)
    other = Pseudonymizer(b"another node's secret!")
    assert node.token("PID", "MRN-0042") == again.token("PID", "MRN-0042")
    assert node.token("PID", "MRN-0042") != other.token("PID", "MRN-0042")
    assert hashlib.sha256(b"PID:MRN-0042").hexdigest()[:12].upper() not in node.token("PID", "MRN-0042")
    study = StudyRecord("1.2.99991.1", series_uid="1.2.99991.2", patient_id="MRN-0042", patient_name="Doe^Jane",
                        patient_birth_date="19700101", accession_number="A77", study_date="20240101",
                        orthanc_study_id="abc")
    case = node.case(SimilarCase(1, 0.9, "study", study, (SlicePair(0, 3, "1.2.99991.3", 0.8),)))
    shown = case.study
    assert shown.patient_name == "" and shown.patient_birth_date == "" and shown.study_date == ""
    assert shown.patient_id.startswith("PID-") and shown.accession_number.startswith("ACC-")
    assert is_uid(shown.study_uid) and shown.study_uid != study.study_uid and shown.orthanc_study_id == ""
    assert case.best_slices[0].matched_sop_instance_uid not in ("", "1.2.99991.3")
    text = json.dumps(case.as_dict())
    for original in ("MRN-0042", "Doe", "19700101", "A77", "1.2.99991.", "20240101"):
        assert original not in text


def test_access_policy_and_audit_lines(tmp_path: Path):
    config = NodeConfig.from_section({"AllowedSimilarCasesAets": ["VIEWER"], "AllowedSimilarCasesUsers": ["radiologist"]})
    policy = AccessPolicy(config)
    assert policy.allows(Caller("c-find", "VIEWER")) and not policy.allows(Caller("c-find", "STRANGER"))
    assert policy.allows(Caller("rest", "radiologist")) and not policy.allows(Caller("rest", "clerk"))
    assert not policy.allows(Caller("rest", "")) and not policy.allows(Caller("rest", "VIEWER"))
    assert "authenticated user" in policy.refusal(Caller("rest", ""))
    audit = AuditLog(tmp_path)
    audit.record(Caller("rest", "radiologist"), "1.2.3", ["1.2.4", "1.2.5"], "answered")
    audit.record(Caller("c-find", "STRANGER"), "", [], "refused", policy.refusal(Caller("c-find", "STRANGER")))
    audit.close()
    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [(line["caller"], line["count"], line["outcome"]) for line in lines] == [
        ("radiologist", 2, "answered"), ("STRANGER", 0, "refused")]
    assert set(lines[0]) >= {"time", "route", "caller", "query_study_uid", "result_study_uids", "count"}


@pytest.mark.parametrize(("config", "problem"), [
    ({"RemoteAccessAllowed": True, "AuthenticationEnabled": False}, "RemoteAccessAllowed is true while AuthenticationEnabled"),
    ({"AuthenticationEnabled": True, "RegisteredUsers": {"admin": ""}}, "RegisteredUsers.admin has an empty or short"),
    ({"RemoteAccessAllowed": True, "RegisteredUsers": {"admin": "orthanc"}}, "RegisteredUsers.admin"),
])
def test_unsafe_orthanc_configurations_are_named(config, problem):
    assert any(problem in found for found in orthanc_security_problems(config))


def test_safe_orthanc_configurations_pass():
    assert orthanc_security_problems({"AuthenticationEnabled": True, "RegisteredUsers": {"admin": "x" * 24}}) == []
    assert orthanc_security_problems({"RemoteAccessAllowed": False, "AuthenticationEnabled": False}) == []


def test_query_arguments_are_url_decoded():
    assert query_arguments({"StudyDescription": "%2A%3FNECK+C%2B", "filters": "loculi%3E%3D2", "k": "3", "x": None}) == {
        "StudyDescription": "*?NECK C+", "filters": "loculi>=2", "k": "3"}


def test_post_parameters_come_from_a_json_body():
    json_headers = {"Content-Type": "application/json; charset=utf-8"}
    body = json.dumps({"k": 1, "mode": "study-count", "filters": ["loculi>=2", "space=parapharyngeal"],
                       "use_descriptors": True, "StudyDate": None}).encode()
    assert body_arguments(body, json_headers) == {"k": "1", "mode": "study-count", "use_descriptors": "true",
                                                  "filters": "loculi>=2,space=parapharyngeal"}
    assert body_arguments(body, {"Content-Type": "text/plain"}) == {}  # a cross-site form cannot set a query
    assert body_arguments(b"", json_headers) == {}
    for bad in (b"[1, 2]", b"{not json"):
        with pytest.raises(ValueError, match="JSON object|not JSON"):
            body_arguments(bad, json_headers)


def test_the_authenticated_user_is_read_from_basic_auth_only():
    basic = "Basic " + base64.b64encode(b"radiologist:s3cret:with:colons").decode()
    assert authenticated_user({"authorization": basic}) == "radiologist"
    assert authenticated_user({"Authorization": basic}) == "radiologist"
    assert authenticated_user({"authorization": "Bearer abc"}) == ""
    assert authenticated_user({"authorization": "Basic !!!not-base64"}) == ""
    assert authenticated_user({}) == ""


def test_phi_is_redacted_from_log_lines_tracebacks_warnings_and_errors(caplog):
    handler = logging.StreamHandler()
    handler.addFilter(phi.RedactingFilter())
    records = []
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("phi-test")
    logger.addHandler(handler)
    try:
        with phi.identifiers(phi.identifiers_of({"PatientName": "Zyxwq^Qwertz", "PatientID": "PHI-7734521",
                                                 "PatientBirthDate": "19451231", "AccessionNumber": "ACCPHI99"})):
            logger.warning("study of %s (id %s, born 19451231)", "ZYXWQ QWERTZ", "PHI-7734521")
            try:
                raise ValueError("Invalid value for VR PN: 'Zyxwq^Qwertz'")
            except ValueError:
                logger.exception("decode failed")
            assert phi.redact("accession ACCPHI99 of qwertz") == "accession [redacted] of [redacted]"
        assert phi.redact("Zyxwq") == "Zyxwq"  # the job is over: nothing registered any more
    finally:
        logger.removeHandler(handler)
    texts = [record.getMessage() + (record.exc_text or "") for record in records]
    assert texts and all(secret not in text.lower() for text in texts
                         for secret in ("zyxwq", "qwertz", "phi-7734521", "19451231"))


def test_pixel_bomb_and_multiframe_headers_fail_before_decoding(tmp_path: Path):
    datasets = volume_to_ct_series(np.zeros((4, 8, 8), np.float32), (2.5, 1.0, 1.0), uid_seed="bomb")
    datasets[2].Rows = datasets[2].Columns = 30000  # declared, never decoded
    paths = write_series(datasets, tmp_path / "bomb")
    with pytest.raises(InputError, match=r"declares 30000 x 30000 pixels, more than SeriesRules.MaxPixelsPerSlice=1048576"):
        read_geometry(paths, max_pixels_per_slice=1024 * 1024)
    datasets = volume_to_ct_series(np.zeros((4, 8, 8), np.float32), (2.5, 1.0, 1.0), uid_seed="frames")
    datasets[1].NumberOfFrames = 5000
    with pytest.raises(InputError, match="5000 frame"):
        read_geometry(write_series(datasets, tmp_path / "frames"), max_pixels_per_slice=1024 * 1024)


def test_erasure_removes_a_deleted_study_from_the_index(tmp_path: Path):
    config = NodeConfig.from_section({"IndexDirectory": str(tmp_path / "index"), "JobsDatabase": str(tmp_path / "j.sqlite"),
                                      "LogDirectory": str(tmp_path / "logs")})
    rng = np.random.default_rng(0)
    with open_index(config.index_directory) as index:
        for number in range(3):
            index.replace_study(StudyRecord(f"1.2.{number}", orthanc_study_id=f"orthanc-{number}"),
                                [SliceRecord(i) for i in range(6)], rng.normal(size=(6, 16)).astype(np.float32))
    store = open_job_store(config.jobs_database)
    audit = AuditLog(config.log_directory)
    store.request_erasure("orthanc-1")
    assert erase_pending(config, store, audit) == 1 and store.pending_erasures() == []
    assert reconcile(config, store, exists=lambda orthanc_id: orthanc_id != "orthanc-2") == 1
    assert erase_pending(config, store, audit) == 1
    with open_index(config.index_directory) as index:
        assert index.study_uids() == ["1.2.0"]
        hits = index.similar_studies("1.2.0", top=5)
    assert {hit.study_uid for hit in hits} <= {"1.2.0"} and not hits
    audit.close()
    erased = [json.loads(line) for line in (config.log_directory / "audit.jsonl").read_text().splitlines()]
    assert [(line["query_study_uid"], line["outcome"]) for line in erased] == [("1.2.1", "erased"), ("1.2.2", "erased")]


def test_the_service_pseudonymises_answers_and_audits_real_uids(tmp_path: Path):
    from dicom_node.similar.service import SimilarCaseService

    config = NodeConfig.from_section({
        "IndexDirectory": str(tmp_path / "index"), "JobsDatabase": str(tmp_path / "j.sqlite"),
        "LogDirectory": str(tmp_path / "logs"), "PseudonymSecretPath": str(tmp_path / "secret"),
        "PseudonymizeSimilarCases": True, "AllowedSimilarCasesUsers": ["radiologist"]})
    rng = np.random.default_rng(1)
    base = rng.normal(size=(6, 16)).astype(np.float32)
    with open_index(config.index_directory) as index:
        for number in range(3):
            index.replace_study(
                StudyRecord(f"1.2.7.{number}", patient_id=f"MRN-{number}", patient_name=f"Doe^Pat{number}",
                            accession_number=f"A-{number}"),
                [SliceRecord(i, f"1.2.7.{number}.{i}") for i in range(6)],
                base + 0.1 * rng.normal(size=(6, 16)).astype(np.float32))
    service = SimilarCaseService(config)
    request = parse_request(_study_identifier("1.2.7.0"), default_k=5)
    with pytest.raises(QueryError, match="user clerk is not allowed"):
        service.answer(request, Caller("rest", "clerk"))
    answer = service.answer(request, Caller("rest", "radiologist"))
    service.audit.close()
    assert len(answer.cases) == 2
    shown = json.dumps([case.as_dict() for case in answer.cases])
    for secret in ("MRN-1", "MRN-2", "Doe", "A-1", "1.2.7.1", "1.2.7.2"):
        assert secret not in shown
    audit = [json.loads(line) for line in (tmp_path / "logs" / "audit.jsonl").read_text().splitlines()]
    assert audit[0]["outcome"] == "refused" and audit[0]["caller"] == "clerk"
    assert sorted(audit[1]["result_study_uids"]) == ["1.2.7.1", "1.2.7.2"]  # the admin's trail names the real studies


def _study_identifier(study_uid: str) -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    return query

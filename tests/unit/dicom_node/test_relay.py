"""The relay between the plugin and the similar-cases service: one protocol, both ends, real sockets."""

from __future__ import annotations

import http.client
import json
import os
import threading
from pathlib import Path

import pytest

from dicom_node.private_files import read_private_file, write_private_file
from dicom_node.similar.relay import FindResponse, RelayClient, RelayServer, RelayUnavailable


@pytest.fixture
def relay(tmp_path: Path):
    """A running relay whose handlers record what they were asked."""
    asked: list[tuple] = []

    def find(tags, calling_aet):
        asked.append(("find", tags, calling_aet))
        return [FindResponse(0xFF00, None, b"DICM\x00\x01"), FindResponse(0x0000)]

    def similar(study_uid, params, user, store_report):
        asked.append(("similar", study_uid, params, user, store_report))
        return 404, {"error": "study not indexed"}

    address = tmp_path / "service.address"
    server = RelayServer(address, "s3cret", find, similar)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server, address, asked
    server.shutdown()
    server.server_close()


def test_find_and_similar_round_trip(relay):
    server, address, asked = relay
    client = RelayClient(address, "s3cret", timeout=10)
    responses = client.find([[0x0008, 0x0052, "STUDY"]], "VIEWER")
    assert responses == [FindResponse(0xFF00, None, b"DICM\x00\x01"), FindResponse(0x0000, None, None)]
    assert asked[0] == ("find", [[8, 82, "STUDY"]], "VIEWER")
    status, body = client.similar("1.2.3", {"k": "3"}, user="alice")
    assert status == 404 and body == {"error": "study not indexed"}
    assert asked[1] == ("similar", "1.2.3", {"k": "3"}, "alice", False)
    client.similar("1.2.3", {}, user="", store_report=True)
    assert asked[2] == ("similar", "1.2.3", {}, "", True)


def test_the_server_chooses_its_port_and_writes_it_owner_only(relay):
    server, address, _ = relay
    assert int(read_private_file(address)) == server.port
    assert oct(address.stat().st_mode & 0o777) == "0o600"


def test_a_wrong_or_malformed_token_is_answered_401(relay):
    server, address, asked = relay
    with pytest.raises(RelayUnavailable, match="HTTP 401"):
        RelayClient(address, "guess", timeout=10).find([], "VIEWER")
    for header in (b"Bearer \xff\xfe", b"Basic Zm9vOmJhcg==", b""):
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        connection.putrequest("GET", "/health")
        connection.putheader("Authorization", header)
        connection.endheaders()
        response = connection.getresponse()
        assert response.status == 401 and json.loads(response.read())["error"] == "missing or wrong token"
        connection.close()
    assert asked == []


def test_client_waits_for_a_restarting_service_then_gives_up(tmp_path: Path):
    client = RelayClient(tmp_path / "nobody.address", "s3cret", timeout=5)
    with pytest.raises(RelayUnavailable, match="unreachable"):
        client.find([], "VIEWER", wait_seconds=1.0)


def test_private_files_never_follow_a_symlink(tmp_path: Path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    link = tmp_path / "token"
    os.symlink(victim, link)
    write_private_file(link, "secret")
    assert victim.read_text() == "keep me"  # the link was replaced, its target untouched
    assert not link.is_symlink() and read_private_file(link) == "secret"
    assert oct(link.stat().st_mode & 0o777) == "0o600"
    os.symlink(victim, tmp_path / "other")
    with pytest.raises(OSError):
        read_private_file(tmp_path / "other")


def test_gallery_and_thumbnail_round_trip(tmp_path: Path):
    asked: list[tuple] = []

    def gallery(study_uid, params, user):
        asked.append(("gallery", study_uid, params, user))
        return 200, {"cases": []}

    def thumbnail(token, user):
        asked.append(("thumbnail", token, user))
        return (200, {"png": "iVBORw0KGgo="}) if token == "known" else (404, {"error": "unknown or expired thumbnail"})

    address = tmp_path / "service.address"
    server = RelayServer(address, "s3cret", lambda tags, aet: [], lambda *a: (404, {}), gallery, thumbnail)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = RelayClient(address, "s3cret", timeout=10)
        assert client.gallery("1.2.3", {"mode": "roi", "pairs": "2"}, "alice") == (200, {"cases": []})
        assert client.thumbnail("known", "alice") == (200, {"png": "iVBORw0KGgo="})
        assert client.thumbnail("other", "bob")[0] == 404
        assert asked == [("gallery", "1.2.3", {"mode": "roi", "pairs": "2"}, "alice"), ("thumbnail", "known", "alice"),
                         ("thumbnail", "other", "bob")]
        without = RelayServer(tmp_path / "plain.address", "s3cret", lambda tags, aet: [], lambda *a: (404, {}))
        threading.Thread(target=without.serve_forever, daemon=True).start()
        assert RelayClient(tmp_path / "plain.address", "s3cret", timeout=10).gallery("1.2.3", {}, "alice")[0] == 404
        without.shutdown()
        without.server_close()
    finally:
        server.shutdown()
        server.server_close()

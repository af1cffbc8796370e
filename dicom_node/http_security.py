"""The HTTP side of the node's security: Orthanc's authentication settings and the caller's name.

Loaded by the plugin inside Orthanc (standard library only). Orthanc itself authenticates
every HTTP request (``AuthenticationEnabled`` + ``RegisteredUsers``) before a plugin callback
runs; these helpers only refuse an unsafe configuration at start-up and read which user
Orthanc let in.
"""

from __future__ import annotations

import base64
import binascii
import json
import urllib.parse
from collections.abc import Mapping
from typing import Any

MIN_PASSWORD_LENGTH = 12
PASSWORD_VARIABLE = "ABSCESS_NODE_ADMIN_PASSWORD"
"""The environment variable the shipped ``orthanc.json`` takes the admin's password from."""


def orthanc_security_problems(orthanc_config: Mapping[str, Any]) -> list[str]:
    """What makes an Orthanc configuration unsafe to start, in words naming the keys (empty: fine).

    * ``RemoteAccessAllowed`` true with ``AuthenticationEnabled`` false: the REST API, the
      viewer and other patients' cases would be open to the network.
    * A ``RegisteredUsers`` password that is empty (an unset ``${...}`` variable) or shorter
      than :data:`MIN_PASSWORD_LENGTH` characters: no default or guessable password.
    """
    problems = []
    remote = bool(orthanc_config.get("RemoteAccessAllowed", False))
    authentication = orthanc_config.get("AuthenticationEnabled", remote)  # Orthanc's own default
    if remote and authentication is False:
        problems.append("RemoteAccessAllowed is true while AuthenticationEnabled is false: every HTTP route "
                        "(other patients' similar cases included) would be open to the network; set "
                        "AuthenticationEnabled to true and list users in RegisteredUsers")
    users = orthanc_config.get("RegisteredUsers") or {}
    if authentication and isinstance(users, Mapping):
        for user, password in users.items():
            if not isinstance(password, str) or len(password) < MIN_PASSWORD_LENGTH:
                problems.append(
                    f"RegisteredUsers.{user} has an empty or short password (fewer than {MIN_PASSWORD_LENGTH} "
                    f"characters); the shipped orthanc.json reads it from ${PASSWORD_VARIABLE}, which "
                    "`make install` writes into runtime/secrets/admin-password")
    return problems


def authenticated_user(headers: Mapping[str, str]) -> str:
    """The user name of an HTTP Basic ``Authorization`` header Orthanc accepted ("" if none).

    Orthanc has checked the password before the plugin sees the request; any other scheme
    (the workers' REST token, a bearer token) is not a user.
    """
    value = next((v for k, v in headers.items() if k.lower() == "authorization"), "")
    scheme, _, credentials = str(value).partition(" ")
    if scheme.lower() != "basic":
        return ""
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return ""
    return decoded.partition(":")[0]


def is_json_request(headers: Mapping[str, str]) -> bool:
    """Whether a state-changing request declares a JSON body (``Content-Type: application/json``).

    A page of another site can make the browser send a form or a plain-text POST with the
    user's stored credentials, but not one with this content type (that needs a CORS preflight,
    which Orthanc does not grant): requiring it on the dashboard's actions stops cross-site
    request forgery.
    """
    value = next((v for k, v in headers.items() if k.lower() == "content-type"), "")
    return str(value).split(";")[0].strip().lower() == "application/json"


def body_arguments(body: bytes | None, headers: Mapping[str, str]) -> dict[str, str]:
    """The parameters of a POST that sends them as a JSON object (``{"k": 1, "mode": "study-count"}``).

    Orthanc hands a plugin no query string on POST, so ``POST .../similar-report?k=1`` would
    silently answer the default query: its parameters travel in a JSON body instead. Values
    become the strings GET arguments would be (a list comma-separated); a body without the JSON
    content type gives no parameters.

    Raises:
        ValueError: the body declares JSON but is not a JSON object (the caller answers 400).
    """
    if not body or not is_json_request(headers):
        return {}
    try:
        parsed = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"the request body is not JSON ({error}); send the query as a JSON object") from None
    if not isinstance(parsed, dict):
        raise ValueError('send the query as a JSON object, e.g. {"k": 3, "mode": "study"}')
    return {str(key): _argument_text(value) for key, value in parsed.items() if value is not None}


def _argument_text(value: Any) -> str:
    """A JSON value as the GET argument it stands for (a list is comma-separated, as ``filters=``)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return ",".join(_argument_text(item) for item in value)
    return json.dumps(value)


def query_arguments(get: Mapping[str, Any] | None) -> dict[str, str]:
    """The GET arguments of a plugin REST call, URL-decoded (orthanc-python 4.0 hands them over raw:
    ``*?`` arrives as ``%2A%3F``)."""
    return {key: urllib.parse.unquote_plus(value) for key, value in (get or {}).items() if isinstance(value, str)}

"""Command line of the node: ``python -m dicom_node <command>`` (see ``--help``).

The plugin starts ``worker`` and ``serve`` itself (``WorkerCount`` workers and one similar-cases
service); an admin runs ``serve --config orthanc.json --port N`` for a standalone similar-cases
AE, and ``backfill`` to queue the studies an existing archive already holds.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="python -m dicom_node", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    worker = commands.add_parser("worker", help="claim and process jobs (started by the Orthanc plugin)")
    worker.add_argument("--settings", type=Path, required=True, help="settings file written by the plugin")
    worker.add_argument("--once", action="store_true", help="process at most one job, then exit")
    worker.add_argument("--log-file", type=Path, help="log here, rotated at 10 MB (5 files kept); default: stderr")
    init = commands.add_parser("init-secrets", help="create the admin's HTTP password and the pseudonym secret (make install)")
    init.add_argument("--directory", type=Path, default=None, help="where (default: runtime/secrets of the checkout)")
    serve = commands.add_parser("serve", help="similar-cases service: pynetdicom AE (C-ECHO, C-FIND) and/or the plugin's relay")
    source = serve.add_mutually_exclusive_group(required=True)
    source.add_argument("--settings", type=Path, help="settings file written by the plugin (as for `worker`)")
    source.add_argument("--config", type=Path, help="orthanc.json: its AbscessNode section, HttpPort and DicomAet")
    serve.add_argument("--port", type=int, default=0, help="DICOM port of the AE (0: no DICOM listener)")
    serve.add_argument("--aet", help="AE title of the AE (default: AbscessNode.SimilarCasesAet)")
    serve.add_argument("--log-file", type=Path, help="log here, rotated at 10 MB (5 files kept); default: stderr")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address the DICOM listener binds (default 127.0.0.1; 0.0.0.0 opens it to the network)")
    serve.add_argument("--tls-certificate", type=Path, help="DICOM TLS: this AE's certificate (PEM); TLS only when given")
    serve.add_argument("--tls-private-key", type=Path, help="DICOM TLS: the certificate's private key (PEM)")
    serve.add_argument("--tls-trusted-certificates", type=Path,
                       help="DICOM TLS: CA certificates of the clients (PEM); given: clients must present one")
    serve.add_argument("--relay-address-file", type=Path, help="run the plugin's relay; write its port here")
    serve.add_argument("--token-file", type=Path, help="file holding the relay's bearer token")
    serve.add_argument("--retrieve-aet", help="RetrieveAETitle of the answers (default: Orthanc's DicomAet)")
    backfill = commands.add_parser(
        "backfill", help="queue every matching study already in Orthanc (live studies still go first); resumable")
    backfill.add_argument("--config", type=Path, help="orthanc.json (default: the checkout's)")
    backfill.add_argument("--since", help="only studies whose StudyDate is on or after this date (2024-01-31)")
    backfill.add_argument("--modality", help="only studies holding a series of this modality (e.g. CT)")
    backfill.add_argument("--limit", type=int, help="queue at most N studies in this run")
    backfill.add_argument("--max-queued", type=int, default=4,
                          help="add a study only while fewer jobs than this wait (default 4): live studies never "
                               "queue behind the archive")
    backfill.add_argument("--no-wait", action="store_true", help="return once everything is queued")
    for option in (serve, backfill):
        option.add_argument("--orthanc-url", help="Orthanc REST URL with --config (default http://127.0.0.1:HttpPort)")
        option.add_argument("--orthanc-user", default="admin", help="HTTP user of Orthanc's REST API with --config")
        option.add_argument("--orthanc-password-file", type=Path,
                            help="file holding that user's password (default: runtime/secrets/admin-password)")
    args = parser.parse_args(argv)
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if getattr(args, "log_file", None):
        from logging.handlers import RotatingFileHandler

        args.log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers = [RotatingFileHandler(args.log_file, maxBytes=10 * 1024 * 1024, backupCount=5, encoding="utf-8")]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers)
    from dicom_node import phi

    phi.install()

    if args.command == "init-secrets":
        return _init_secrets(args.directory)
    if args.command == "worker":
        from dicom_node.config import WorkerSettings
        from dicom_node.private_files import read_private_file
        from dicom_node.worker import run_worker

        run_worker(WorkerSettings.from_json(read_private_file(args.settings)), once=args.once)
        return 0
    if args.command == "backfill":
        return _backfill(args)
    return _serve(args)


def _init_secrets(directory: Path | None) -> int:
    """``init-secrets``: the admin's password and the pseudonym secret, 0600, created once, never printed."""
    import secrets as random_secrets

    from dicom_node.config import CHECKOUT
    from dicom_node.http_security import PASSWORD_VARIABLE
    from dicom_node.private_files import create_secret, write_private_file

    directory = directory or CHECKOUT / "runtime" / "secrets"
    password_file = directory / "admin-password"
    if not password_file.exists():
        write_private_file(password_file, random_secrets.token_urlsafe(24))
        print(f"created the HTTP password of user admin in {password_file} (Orthanc reads it from ${PASSWORD_VARIABLE})")
    if create_secret(directory / "pseudonym.key"):
        print(f"created the pseudonym secret {directory / 'pseudonym.key'}")
    return 0


def _basic_authorization(user: str, password_file: Path | None) -> str | None:
    """``Basic ...`` for Orthanc's REST API from a password file (None when there is none)."""
    import base64

    from dicom_node.config import CHECKOUT
    from dicom_node.private_files import read_private_file

    password_file = password_file or CHECKOUT / "runtime" / "secrets" / "admin-password"
    if not password_file.exists():
        return None
    token = base64.b64encode(f"{user}:{read_private_file(password_file)}".encode()).decode()
    return f"Basic {token}"


def _from_orthanc_json(args: argparse.Namespace, path: Path) -> tuple[Any, str, str | None, dict[str, Any]]:
    """(NodeConfig, Orthanc URL, Authorization header, orthanc.json) of ``--config``-style options.

    Raises:
        ConfigError: the AbscessNode section is invalid.
    """
    from dicom_node.config import NodeConfig

    orthanc = json.loads(path.read_text())
    config = NodeConfig.from_section(orthanc.get("AbscessNode"), base_directory=path.resolve().parent)
    url = args.orthanc_url or f"http://127.0.0.1:{orthanc.get('HttpPort', 8042)}"
    return config, url, _basic_authorization(args.orthanc_user, args.orthanc_password_file), orthanc


def _backfill(args: argparse.Namespace) -> int:
    """``backfill``: queue the archive (see :mod:`dicom_node.backfill`), with a progress bar."""
    from dicom_node.backfill import RichProgress, backfill, parse_date
    from dicom_node.config import CHECKOUT, ConfigError
    from dicom_node.jobs import JobStore
    from dicom_node.orthanc_client import OrthancClient, OrthancError

    try:
        since = parse_date(args.since) if args.since else None
        config, url, authorization, _ = _from_orthanc_json(args, args.config or CHECKOUT / "orthanc.json")
    except (ValueError, ConfigError) as error:
        print(f"backfill: {error}", file=sys.stderr)
        return 2
    store = JobStore(config.jobs_database)
    try:
        with RichProgress() as progress:
            result = backfill(store, OrthancClient(url, authorization, timeout=60.0), progress, since=since,
                              modality=args.modality, limit=args.limit, max_queued=max(1, args.max_queued),
                              wait=not args.no_wait)
    except KeyboardInterrupt:
        print("backfill interrupted: the studies queued so far are processed; run the same command again to "
              "continue (studies that already have a job are skipped)", file=sys.stderr)
        return 130
    except OrthancError as error:
        print(f"backfill: {error}", file=sys.stderr)
        return 1
    ended = ", ".join(f"{count} {state}" for state, count in sorted(result.states.items())) or "none finished yet"
    print(f"backfill: {result.matching} matching studies in Orthanc, {result.already_known} already had a job, "
          f"{len(result.queued)} queued ({ended})")
    return 0


def _serve(args: argparse.Namespace) -> int:
    """``serve``: the similar-cases service (see :mod:`dicom_node.similar.dicom_ae`)."""
    from dicom_node.config import ConfigError, WorkerSettings
    from dicom_node.orthanc_client import OrthancClient
    from dicom_node.private_files import read_private_file
    from dicom_node.similar.dicom_ae import serve
    from dicom_node.similar.service import SimilarCaseService

    retrieve_aet = args.retrieve_aet
    if args.settings:
        settings = WorkerSettings.from_json(read_private_file(args.settings))
        config, url, authorization = settings.node, settings.orthanc_url, settings.authorization
        parent = os.getppid()

        def exit_with_parent() -> None:  # started by the plugin: go when Orthanc goes
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(0)

        threading.Thread(target=exit_with_parent, daemon=True).start()
    else:
        try:
            config, url, authorization, orthanc = _from_orthanc_json(args, args.config)
        except ConfigError as error:
            print(f"invalid configuration: {error}", file=sys.stderr)
            return 2
        retrieve_aet = retrieve_aet or orthanc.get("DicomAet", "ORTHANC")
    relay = None
    if args.relay_address_file:
        if not args.token_file:
            print("--relay-address-file needs --token-file", file=sys.stderr)
            return 2
        relay = (args.relay_address_file, read_private_file(args.token_file))
    tls = None
    if args.tls_certificate:
        from dicom_node.similar.dicom_ae import tls_context

        tls = tls_context(args.tls_certificate, args.tls_private_key, args.tls_trusted_certificates)
    service = SimilarCaseService(config, OrthancClient(url, authorization, timeout=60.0), retrieve_aet or "ORTHANC")
    serve(service, args.aet or config.similar_cases_aet, args.port, relay, args.host, tls)
    return 0


if __name__ == "__main__":
    sys.exit(main())

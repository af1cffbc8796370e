"""Command line of the node: ``python -m dicom_node <command>`` (see ``--help``)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="python -m dicom_node", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    worker = commands.add_parser("worker", help="claim and process jobs (started by the Orthanc plugin)")
    worker.add_argument("--settings", type=Path, required=True, help="settings file written by the plugin")
    worker.add_argument("--once", action="store_true", help="process at most one job, then exit")
    fetch = commands.add_parser("fetch-data", help="download the registry sample data into .cache/data")
    fetch.add_argument("names", nargs="*", help="sample names (default: all)")
    demo = commands.add_parser("demo", help="start the node and send it the sample head-and-neck CT (make demo)")
    demo.add_argument("--stop", action="store_true", help="stop the node the demo started")
    serve = commands.add_parser("serve", help="similar-cases service: pynetdicom AE (C-ECHO, C-FIND) + local JSON endpoint")
    source = serve.add_mutually_exclusive_group(required=True)
    source.add_argument("--settings", type=Path, help="settings file written by the plugin (as for `worker`)")
    source.add_argument("--config", type=Path, help="orthanc.json: its AbscessNode section, HttpPort and DicomAet")
    serve.add_argument("--port", type=int, default=0, help="DICOM port of the AE (0: no DICOM listener)")
    serve.add_argument("--aet", help="AE title of the AE (default: AbscessNode.SimilarCasesAet)")
    serve.add_argument("--host", default="0.0.0.0", help="address the DICOM listener binds (default 0.0.0.0)")
    serve.add_argument("--http-port", type=int, default=0, help="local JSON endpoint on 127.0.0.1 (for the plugin)")
    serve.add_argument("--token-file", type=Path, help="file holding the bearer token of the JSON endpoint")
    serve.add_argument("--retrieve-aet", help="RetrieveAETitle of the answers (default: Orthanc's DicomAet)")
    serve.add_argument("--orthanc-url", help="Orthanc REST URL with --config (default http://127.0.0.1:HttpPort)")
    convert = commands.add_parser("convert", help="NIfTI CT -> DICOM CT series")
    convert.add_argument("nifti", type=Path)
    convert.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.command == "worker":
        from dicom_node.config import WorkerSettings
        from dicom_node.worker import run_worker

        run_worker(WorkerSettings.read(args.settings), once=args.once)
    elif args.command == "serve":
        return _serve(args)
    elif args.command == "fetch-data":
        from dicom_node.sample_data import SAMPLES, fetch as fetch_sample

        for name in args.names or SAMPLES:
            print(f"{name}: {fetch_sample(name)}")
    elif args.command == "demo":
        from dicom_node import demo as demo_module

        return demo_module.stop() if args.stop else demo_module.run()
    elif args.command == "convert":
        from dicom_node.convert import nifti_to_ct_series, write_series

        paths = write_series(nifti_to_ct_series(args.nifti), args.out)
        print(f"{len(paths)} instances written to {args.out}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    """``serve``: the similar-cases service (see :mod:`dicom_node.scp`)."""
    import json
    import os
    import threading
    import time

    from dicom_node.cfind import SimilarCaseService
    from dicom_node.config import ConfigError, NodeConfig, WorkerSettings
    from dicom_node.orthanc_client import OrthancClient
    from dicom_node.scp import serve

    retrieve_aet = args.retrieve_aet
    if args.settings:
        settings = WorkerSettings.read(args.settings)
        config, url, authorization = settings.node, settings.orthanc_url, settings.authorization
        parent = os.getppid()

        def exit_with_parent() -> None:  # started by the plugin: go when Orthanc goes
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(0)

        threading.Thread(target=exit_with_parent, daemon=True).start()
    else:
        orthanc = json.loads(args.config.read_text())
        try:
            config = NodeConfig.from_section(orthanc.get("AbscessNode"), base_directory=args.config.resolve().parent)
        except ConfigError as error:
            print(f"invalid configuration: {error}", file=sys.stderr)
            return 2
        url = args.orthanc_url or f"http://127.0.0.1:{orthanc.get('HttpPort', 8042)}"
        authorization = None
        retrieve_aet = retrieve_aet or orthanc.get("DicomAet", "ORTHANC")
    token = args.token_file.read_text().strip() if args.token_file else ""
    service = SimilarCaseService(config, OrthancClient(url, authorization, timeout=60.0), retrieve_aet or "ORTHANC")
    serve(service, args.aet or config.similar_cases_aet, args.port, args.http_port, token, args.host)
    return 0


if __name__ == "__main__":
    sys.exit(main())

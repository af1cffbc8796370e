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
    convert = commands.add_parser("convert", help="NIfTI CT -> DICOM CT series")
    convert.add_argument("nifti", type=Path)
    convert.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.command == "worker":
        from dicom_node.config import WorkerSettings
        from dicom_node.worker import run_worker

        run_worker(WorkerSettings.read(args.settings), once=args.once)
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


if __name__ == "__main__":
    sys.exit(main())

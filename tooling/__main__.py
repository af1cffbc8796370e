"""Developer tooling: ``python -m tooling <command>`` (sample data, demo, conversion).

Not part of the installed node: these commands serve ``make demo``, the tests and the
benchmarks. Phantom datasets, cohorts and the retrieval evaluation have their own entry points
(``python -m tooling.phantoms``, ``python -m tooling.cohort``, ``python -m tooling.retrieval_eval``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="python -m tooling", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("fetch-data", help="download the registry sample data into .cache/data")
    fetch.add_argument("names", nargs="*", help="sample names (default: all)")
    demo = commands.add_parser("demo", help="start the node and send it the sample head-and-neck CT (make demo)")
    demo.add_argument("--stop", action="store_true", help="stop the node the demo started")
    convert = commands.add_parser("convert", help="NIfTI CT -> DICOM CT series")
    convert.add_argument("nifti", type=Path)
    convert.add_argument("out", type=Path)
    commands.add_parser("config-table", help="print the README's configuration table (generated from dicom_node.config)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "fetch-data":
        from tooling.sample_data import SAMPLES, fetch as fetch_sample

        for name in args.names or SAMPLES:
            print(f"{name}: {fetch_sample(name)}")
    elif args.command == "demo":
        from tooling import demo as demo_module

        return demo_module.stop() if args.stop else demo_module.run()
    elif args.command == "config-table":
        from tooling.readme import config_table

        print(config_table())
    elif args.command == "convert":
        from tooling.convert import nifti_to_ct_series, write_series

        paths = write_series(nifti_to_ct_series(args.nifti), args.out)
        print(f"{len(paths)} instances written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

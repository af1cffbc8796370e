"""Leave-one-host-out evaluation of the node's abscess segmentation, and of deep-neck-space location.

``segmentation``: phantom abscesses inserted into a real CT **whose host scan was not used in
training** (``--held-out-host``; the checkpoint's training hosts are read from its meta and a
host it saw is refused), run through the node's own path: :class:`models.segmenter.Segmenter`
on the whole series at its pixel spacing, :func:`models.anatomy.analyse_neck`, the default
plausibility rules (:func:`models.plausibility.filter_candidates`). Metrics, both conventions:

* **pooled DSC**: one Dice over every voxel of every case (the VM-UNet reference code's
  convention: false positives anywhere count);
* **per-slice DSC** and **mIoU**: mean over the slices whose ground truth has an abscess;
* **case 3-D Dice**: mean over cases of the Dice of the whole volume;
* **HD95** per lesion slice (mm): over detected slices only, and with misses penalised by the
  slice's diagonal; **NSD** with a tolerance of ``--nsd-tolerance`` mm (default 2 mm);
* **lesion sensitivity**: inserted abscesses overlapped by a kept lesion; **false lesions per
  case** on the phantoms;
* **false lesions per abscess-free real CT**: every real CT the project has, unaltered, through
  the same path; a series without a neck is skipped by the node (``RequireNeckCoverage``) and
  reports none.

``spaces``: phantoms of every deep neck space in every host, located by
:meth:`models.anatomy.NeckAnatomy.locate` from the inserted lesion's centroid: accuracy of the
space and of the side.

Both write a Markdown table to stdout and, with ``--markdown FILE``, into that file between
``<!-- <name>:start -->`` and ``<!-- <name>:end -->`` (the section is added when missing), so
``docs/evaluation.md`` is generated, not typed.

CLI::

    python -m tooling.segmentation_eval segmentation --checkpoint A.pt [--checkpoint B.pt]
        --held-out-host aorta_ct --cases 12 --seed 900 [--markdown docs/evaluation.md]
    python -m tooling.segmentation_eval spaces --cases 6 --seed 300 [--markdown docs/evaluation.md]
"""

from __future__ import annotations

import argparse
import collections
import math
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from scipy import ndimage

from models.anatomy import SPACES, analyse_neck
from models.plausibility import filter_candidates
from models.segmenter import Segmenter
from models.training.evaluate import segmentation_metrics
from models.weights import load_checkpoint, save_checkpoint
from tooling.convert import read_nifti
from tooling.phantoms import HOSTS, make_case
from tooling.sample_data import fetch

#: Abscess-free real CTs for the false-lesion count (the NIfTI samples; the DICOM chest CT too).
REAL_CTS = ("ct_head", "neck_chest_ct", "aorta_ct", "head_ct", "abdomen_ct", "rider_lung_ct")


def _real_ct(name: str) -> tuple[np.ndarray, tuple[float, float, float]]:
    if name == "rider_lung_ct":
        from dicom_node.series import read_geometry, read_hu

        geometry = read_geometry(sorted(p for p in fetch(name).glob("*.dcm")))
        return read_hu(geometry), geometry.spacing_mm
    nifti = read_nifti(fetch(name))
    return nifti.volume_hu, nifti.spacing_mm


def training_hosts(segmenter: Segmenter) -> list[str]:
    """Hosts the checkpoint was trained on (meta ``training.hosts``, or named in ``training.data``)."""
    training = segmenter.meta.get("training", {})
    if training.get("hosts"):
        return list(training["hosts"])
    text = str(training.get("data", ""))
    return [host for host in HOSTS if host in text]


def _predict(segmenter: Segmenter, volume_hu: np.ndarray, spacing: Sequence[float]):
    anatomy = analyse_neck(volume_hu, spacing)
    output = segmenter.run(volume_hu, pixel_spacing_mm=(spacing[1], spacing[2]))
    return anatomy, filter_candidates(output.probabilities > 0.5, volume_hu, spacing, anatomy)


def _lesion_count(mask: np.ndarray) -> tuple[np.ndarray, int]:
    return ndimage.label(mask, structure=np.ones((3, 3, 3), bool))


def evaluate_checkpoint(checkpoint: Path, held_out_host: str, cases: int, seed: int,
                        nsd_tolerance: float = 2.0, real_cts: Sequence[str] = REAL_CTS) -> dict[str, Any]:
    """Run one checkpoint on held-out-host phantoms and on the abscess-free real CTs.

    Args:
        checkpoint: the weights.
        held_out_host: a key of :data:`tooling.phantoms.HOSTS` the weights were not trained on.
        cases: phantom cases (one abscess each; case ``i`` has seed ``seed * 1000 + i``).
        seed: phantom seed.
        nsd_tolerance: NSD tolerance (mm).
        real_cts: the abscess-free real CTs (samples of :mod:`tooling.sample_data`).

    Raises:
        SystemExit: the checkpoint was trained on the held-out host.
    """
    segmenter = Segmenter.load(checkpoint, device="cpu")
    seen = training_hosts(segmenter)
    if held_out_host in seen:
        raise SystemExit(f"{checkpoint} was trained on {held_out_host} (hosts {seen}): not a held-out host")
    totals = collections.Counter()
    weighted = collections.defaultdict(float)
    case_dice, false_lesions_phantom = [], []
    detected_lesions = inserted_lesions = 0
    for index in range(cases):
        case = make_case(seed * 1000 + index, host=held_out_host)
        anatomy, plausible = _predict(segmenter, case.volume_hu, case.spacing_mm)
        prediction, truth = plausible.kept, case.mask
        totals["intersection"] += int((prediction & truth).sum())
        totals["predicted"] += int(prediction.sum())
        totals["truth"] += int(truth.sum())
        case_dice.append(2.0 * (prediction & truth).sum() / max(prediction.sum() + truth.sum(), 1))
        metrics = segmentation_metrics(torch.from_numpy(prediction)[:, None], torch.from_numpy(truth)[:, None],
                                       case.spacing_mm[1], nsd_tolerance)
        for key in ("lesion_slices", "detected", "empty_slices", "false_positive_slices"):
            totals[key] += metrics[key]
        if metrics["lesion_slices"]:
            for key in ("dsc", "miou", "hd95", "nsd"):
                weighted[key] += metrics[key] * metrics["lesion_slices"]
        if metrics["detected"] and math.isfinite(metrics["hd95_detected"]):
            weighted["hd95_detected"] += metrics["hd95_detected"] * metrics["detected"]
        labels, count = _lesion_count(prediction)
        hit_labels = set(np.unique(labels[truth])) - {0}
        false_lesions_phantom.append(count - len(hit_labels))
        for lesion_label in range(1, len(case.lesions) + 1):
            inserted_lesions += 1
            detected_lesions += bool((prediction & (case.labels == lesion_label)).any())
    real = {}
    for name in real_cts:
        volume, spacing = _real_ct(name)
        anatomy = analyse_neck(volume, spacing)
        if not anatomy.covers_neck:
            real[name] = {"skipped": True, "false_lesions": 0, "reason": anatomy.reason}
            continue
        _, plausible = _predict(segmenter, volume, spacing)
        real[name] = {"skipped": False, "false_lesions": _lesion_count(plausible.kept)[1],
                      "removed_by_rule": plausible.removed_by_rule()}
    lesion_slices, detected = totals["lesion_slices"], totals["detected"]
    return {
        "model": f"{segmenter.meta['name']} v{segmenter.meta['version']}",
        "params": sum(p.numel() for p in segmenter.model.parameters()),
        "trained_on": seen, "held_out_host": held_out_host, "cases": cases, "seed": seed,
        "pooled_dsc": 2.0 * totals["intersection"] / max(totals["predicted"] + totals["truth"], 1),
        "slice_dsc": weighted["dsc"] / max(lesion_slices, 1), "miou": weighted["miou"] / max(lesion_slices, 1),
        "case_dice": float(np.mean(case_dice)),
        "hd95_detected": weighted["hd95_detected"] / detected if detected else math.nan,
        "hd95_penalised": weighted["hd95"] / max(lesion_slices, 1),
        "nsd": weighted["nsd"] / max(lesion_slices, 1), "nsd_tolerance_mm": nsd_tolerance,
        "lesion_sensitivity": detected_lesions / max(inserted_lesions, 1),
        "lesions": f"{detected_lesions}/{inserted_lesions}",
        "false_lesions_per_phantom": float(np.mean(false_lesions_phantom)),
        "lesion_slices": lesion_slices, "detected_slices": detected,
        "false_positive_slices": f"{totals['false_positive_slices']}/{totals['empty_slices']}",
        "real_cts": real,
        "false_lesions_per_real_ct": float(np.mean([r["false_lesions"] for r in real.values()])),
    }


def store_metrics(checkpoint: Path, result: dict[str, Any], command: str) -> None:
    """Write an evaluation result into the checkpoint's meta (``metrics.held_out_host``)."""
    model, meta = load_checkpoint(checkpoint)
    meta.setdefault("metrics", {})["held_out_host"] = {
        key: value for key, value in result.items() if key not in ("model", "params")} | {"command": command}
    save_checkpoint(checkpoint, model, meta)


def segmentation_table(results: Sequence[dict[str, Any]]) -> str:
    """Markdown tables of :func:`evaluate_checkpoint` results (one row per checkpoint)."""
    first = results[0]
    lines = [
        f"Held-out host: `{first['held_out_host']}` ({first['cases']} phantom cases, seed {first['seed']}); "
        f"after the default plausibility rules; NSD tolerance {first['nsd_tolerance_mm']:g} mm; "
        "HD95 in mm per lesion slice.",
        "",
        "| model | params | trained on | pooled DSC | per-slice DSC | mIoU | case 3-D Dice | HD95 detected | "
        "HD95 misses penalised | NSD | lesion sensitivity | false lesions / phantom | "
        "false lesions / abscess-free real CT |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.2f} M | {', '.join(r['trained_on']) or '?'} | {r['pooled_dsc']:.3f} | "
            f"{r['slice_dsc']:.3f} | {r['miou']:.3f} | {r['case_dice']:.3f} | {r['hd95_detected']:.1f} | "
            f"{r['hd95_penalised']:.1f} | {r['nsd']:.3f} | {r['lesion_sensitivity']:.2f} ({r['lesions']}) | "
            f"{r['false_lesions_per_phantom']:.2f} | {r['false_lesions_per_real_ct']:.2f} |")
    lines += ["", "False lesions per abscess-free real CT (skipped: the node finds no neck in the series):", "",
              "| real CT | " + " | ".join(r["model"] for r in results) + " |",
              "|---|" + "---|" * len(results)]
    for name in first["real_cts"]:
        cells = []
        for r in results:
            entry = r["real_cts"][name]
            cells.append("skipped (no neck)" if entry["skipped"] else str(entry["false_lesions"]))
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def space_accuracy(cases: int, seed: int) -> dict[str, Any]:
    """Locate phantoms of every space in every host; count correct spaces and sides.

    A seed whose lesion cannot be placed in that host and space (no room in the anatomy) is
    left out and counted under ``unplaced``.
    """
    table: dict[tuple[str, str], list[int]] = {}
    unplaced = 0
    for host, spec in HOSTS.items():
        for space in spec.spaces:
            right_space = right_side = placed = 0
            for index in range(cases):
                try:
                    case = make_case(seed * 1000 + index, host=host, spaces=[space])
                except ValueError:
                    unplaced += 1
                    continue
                location = analyse_neck(case.volume_hu, case.spacing_mm).locate(ndimage.center_of_mass(case.mask))
                right_space += location.space == space
                right_side += location.side == case.lesions[0]["side"]
                placed += 1
            table[(host, space)] = [right_space, right_side, placed]
    return {"cases": cases, "seed": seed, "table": table, "unplaced": unplaced}


def spaces_table(result: dict[str, Any]) -> str:
    """Markdown table of :func:`space_accuracy`."""
    lines = [f"{result['cases']} phantoms per host and space (seed {result['seed']}; {result['unplaced']} that could "
             "not be placed left out), located from the inserted lesion's centroid by `models.anatomy`; cells: "
             "right space / phantoms.", "",
             "| host | " + " | ".join(SPACES) + " | all (space) | all (side) |",
             "|---|" + "---|" * (len(SPACES) + 2)]
    by_host = collections.defaultdict(dict)
    for (host, space), counts in result["table"].items():
        by_host[host][space] = counts
    grand = [0, 0, 0]
    for host, spaces in by_host.items():
        cells = [f"{spaces[s][0]}/{spaces[s][2]}" if s in spaces else "-" for s in SPACES]
        right = sum(c[0] for c in spaces.values())
        side = sum(c[1] for c in spaces.values())
        total = max(sum(c[2] for c in spaces.values()), 1)
        grand = [grand[0] + right, grand[1] + side, grand[2] + total]
        lines.append(f"| `{host}` | " + " | ".join(cells) + f" | {right / total:.2f} | {side / total:.2f} |")
    lines.append("| all | " + " | ".join(
        f"{sum(by_host[h][s][0] for h in by_host if s in by_host[h])}/"
        f"{sum(by_host[h][s][2] for h in by_host if s in by_host[h])}" for s in SPACES)
        + f" | {grand[0] / grand[2]:.2f} | {grand[1] / grand[2]:.2f} |")
    return "\n".join(lines)


def write_section(path: Path, name: str, command: str, body: str) -> None:
    """Replace (or append) the generated section ``name`` of a Markdown file."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    section = f"{start}\n_Generated by `{command}`._\n\n{body}\n{end}"
    text = path.read_text() if path.exists() else ""
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.DOTALL)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else (text.rstrip() + "\n\n" + section + "\n")
    path.write_text(text)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    seg = commands.add_parser("segmentation", help="leave-one-host-out segmentation metrics")
    seg.add_argument("--checkpoint", type=Path, action="append", required=True, help="checkpoint (repeatable)")
    seg.add_argument("--held-out-host", choices=sorted(HOSTS), default="aorta_ct")
    seg.add_argument("--cases", type=int, default=12)
    seg.add_argument("--seed", type=int, default=900)
    seg.add_argument("--nsd-tolerance", type=float, default=2.0, help="NSD tolerance (mm)")
    seg.add_argument("--store-metrics", action="store_true",
                     help="write the first checkpoint's results into its meta (metrics.held_out_host)")
    spaces = commands.add_parser("spaces", help="deep-neck-space location accuracy on phantoms")
    spaces.add_argument("--cases", type=int, default=6)
    spaces.add_argument("--seed", type=int, default=300)
    for command in (seg, spaces):
        command.add_argument("--markdown", type=Path, help="write the table into this Markdown file")
        command.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shown = "python -m tooling.segmentation_eval " + " ".join(
        str(a).replace(str(Path.cwd()) + "/", "") for a in (argv if argv is not None else sys.argv[1:]))
    if args.command == "segmentation":
        results = [evaluate_checkpoint(path, args.held_out_host, args.cases, args.seed, args.nsd_tolerance)
                   for path in args.checkpoint]
        if args.store_metrics:
            store_metrics(args.checkpoint[0], results[0], shown)
        body, name = segmentation_table(results), "segmentation-eval"
    else:
        body, name = spaces_table(space_accuracy(args.cases, args.seed)), "spaces-eval"
    print(body)
    if args.markdown:
        write_section(args.markdown, name, shown, body)


if __name__ == "__main__":
    main()

"""Evaluate a VM-UNet checkpoint on a dataset in the AbscessHeNe layout (the paper's Table I).

Columns, as in AbscessHeNe's Table I:

* **Params**: trainable parameters of the network.
* **FLOPs**: multiply-accumulate operations (MACs) of one forward pass at the checkpoint's
  input size, counted by ``thop`` over the network's convolution, linear and normalisation
  modules. The selective-scan recurrence itself (a function, not a module) is not in that
  count, so the number is a lower bound; it is labelled ``GMACs (thop)``.
* **DSC**, **mIoU**: :class:`monai.metrics.DiceMetric` and :class:`monai.metrics.MeanIoU` per
  slice, averaged over the slices whose ground truth has an abscess.
* **HD95**: :class:`monai.metrics.HausdorffDistanceMetric` (95th percentile) per slice, in mm
  when the pixel spacing is known (CSV column ``pixel_spacing_mm`` or ``dataset.json``), else
  in pixels; averaged over lesion slices. A lesion slice with an empty prediction has no
  surface distance; it scores the image diagonal (the largest possible distance), and the
  ``detected`` count says how many lesion slices had a prediction.
* **NSD**: :class:`monai.metrics.SurfaceDiceMetric` (normalised surface Dice) per slice with a
  tolerance of ``--nsd-tolerance`` (mm, or pixels without spacing), over lesion slices.

Also printed: the Dice pooled over all pixels of the split (false positives on lesion-free
slices count), the mean per-case 3D Dice, and the share of lesion-free slices with a false
positive. Predictions are thresholded at 0.5 on the PNG's own grid (the network's
probabilities are resized back, as :class:`models.segmenter.Segmenter` does).

CLI: ``python -m models.training.evaluate --checkpoint PATH --data DIR [--split test]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU, SurfaceDiceMetric, compute_dice

from models.training.data import image_to_channels, load_image, load_mask, pixel_spacing_mm, read_description, read_split
from models.preprocessing import input_spacing_of, normalise_input, to_model_grid, to_source_grid
from models.vmunet import VMUNet
from models.weights import load_checkpoint

__all__ = ["count_macs", "segmentation_metrics", "evaluate", "format_table", "main"]

TABLE_COLUMNS = ("Model", "Params", "FLOPs", "DSC", "mIoU", "HD95", "NSD")


def count_macs(model: VMUNet, input_size: int) -> int:
    """MACs of one ``[1, C, input_size, input_size]`` forward pass counted by thop (modules only)."""
    probe = copy.deepcopy(model).eval()
    images = torch.zeros(1, probe.config["input_channels"], input_size, input_size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # thop uses the deprecated distutils LooseVersion
        from thop import profile

        macs, _ = profile(probe, inputs=(images,), verbose=False)
    return int(macs)


def segmentation_metrics(predictions: torch.Tensor, targets: torch.Tensor,
                         spacing: float | Sequence[float] | None, nsd_tolerance: float = 2.0) -> dict[str, float]:
    """Per-slice MONAI metrics averaged over lesion slices (see the module docstring).

    Args:
        predictions: binary ``[N, 1, H, W]``.
        targets: binary ``[N, 1, H, W]``.
        spacing: pixel spacing in mm (one for all slices, or one per slice), or None for pixels.
        nsd_tolerance: NSD tolerance, in the unit of ``spacing`` (mm or pixels).

    Returns:
        ``dsc``, ``miou``, ``hd95``, ``hd95_detected`` (missed slices left out), ``nsd``,
        ``dice_pooled``, ``lesion_slices``,
        ``detected`` (lesion slices with a non-empty prediction), ``empty_slices``,
        ``false_positive_slices``.
    """
    predictions, targets = predictions.float(), targets.float()
    lesion = targets.flatten(1).sum(1) > 0
    predicted = predictions.flatten(1).sum(1) > 0
    result: dict[str, float] = {
        "lesion_slices": int(lesion.sum()), "detected": int((lesion & predicted).sum()),
        "empty_slices": int((~lesion).sum()), "false_positive_slices": int((~lesion & predicted).sum()),
        "dice_pooled": float(compute_dice(predictions[:, 0][None, None], targets[:, 0][None, None],
                                          include_background=True, ignore_empty=False).mean()),
    }
    if not lesion.any():
        return {**result, "dsc": math.nan, "miou": math.nan, "hd95": math.nan, "nsd": math.nan}
    prediction_lesion, target_lesion = predictions[lesion], targets[lesion]
    if spacing is None:
        per_slice = torch.ones(int(lesion.sum()), dtype=torch.float64)
        kwargs = {}
    else:
        per_slice = torch.as_tensor(spacing, dtype=torch.float64).expand(len(targets))[lesion]
        kwargs = {"spacing": [(float(value), float(value)) for value in per_slice]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns about empty predictions (missed slices)
        dice = DiceMetric(include_background=True, reduction="none")(prediction_lesion, target_lesion)
        iou = MeanIoU(include_background=True, reduction="none")(prediction_lesion, target_lesion)
        hd95 = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(
            prediction_lesion, target_lesion, **kwargs)
        nsd = SurfaceDiceMetric([nsd_tolerance], include_background=True, reduction="none")(
            prediction_lesion, target_lesion, **kwargs)
    finite = torch.isfinite(hd95)
    hd95_detected = float(hd95[finite].mean()) if finite.any() else math.nan
    diagonal = (math.hypot(*targets.shape[-2:]) * per_slice).to(hd95.dtype).reshape(hd95.shape)
    hd95 = torch.where(torch.isfinite(hd95), hd95, diagonal)
    return {
        **result,
        "dsc": float(torch.nanmean(dice)),
        "miou": float(torch.nanmean(iou)),
        "hd95": float(hd95.mean()),
        "hd95_detected": hd95_detected,
        "nsd": float(torch.nan_to_num(nsd, nan=0.0).mean()),
    }


def evaluate(checkpoint: Path | str, data_root: Path | str, split: str = "test", batch_size: int = 8,
             nsd_tolerance: float = 2.0) -> dict[str, Any]:
    """Run a checkpoint on one split and compute the Table I columns.

    Args:
        checkpoint: file written by :func:`models.weights.save_checkpoint`.
        data_root: dataset in the AbscessHeNe layout.
        split: ``"test"`` or ``"train"``.
        batch_size: slices per forward pass.
        nsd_tolerance: NSD tolerance in mm (pixels when the spacing is unknown).

    Returns:
        A dict with ``model``, ``params``, ``macs``, the metrics of
        :func:`segmentation_metrics`, ``case_dice`` (mean per-case 3D Dice), ``spacing_mm``,
        ``hd95_unit``, ``input_size`` and ``slices``.
    """
    model, meta = load_checkpoint(checkpoint)
    records = read_split(data_root, split)
    spacing = pixel_spacing_mm(data_root, records)
    hu_offset = float(read_description(data_root).get("image_encoding", {}).get("hu_offset", 1024))
    input_size, window = int(meta["input_size"]), meta["preprocessing"]["window"]
    input_spacing = input_spacing_of(meta)
    per_slice = spacing if isinstance(spacing, list) else [spacing] * len(records)
    predictions, targets = [], []
    with torch.inference_mode():
        for start in range(0, len(records), batch_size):
            batch = records[start:start + batch_size]
            masks = [load_mask(record.mask_path) for record in batch]
            images, pixel_spacings = [], []
            for offset, record in enumerate(batch):
                values, kind = load_image(record.image_path, hu_offset)
                value = per_slice[start + offset]
                pixel_spacings.append(None if value is None else (value, value))
                images.append(to_model_grid(image_to_channels(values, kind, window)[None], pixel_spacings[-1],
                                            input_size, input_spacing)[0])
            normalisation = meta["preprocessing"].get("normalisation", "unit")
            probabilities = torch.sigmoid(model(normalise_input(torch.stack(images), normalisation)).float())
            for probability, mask, pixel_spacing in zip(probabilities, masks, pixel_spacings):
                on_grid = to_source_grid(probability[None], mask.shape, pixel_spacing, input_spacing)[0]
                predictions.append(on_grid > 0.5)
                targets.append(torch.from_numpy(mask)[None])
    prediction_tensor, target_tensor = torch.stack(predictions), torch.stack(targets)
    metrics = segmentation_metrics(prediction_tensor, target_tensor, spacing, nsd_tolerance)
    by_case: dict[str, list[int]] = defaultdict(list)
    for index, record in enumerate(records):
        by_case[record.case_id].append(index)
    case_dice = []
    for indices in by_case.values():
        if target_tensor[indices].any():
            volume_prediction = prediction_tensor[indices][:, 0][None, None].float()
            volume_target = target_tensor[indices][:, 0][None, None].float()
            case_dice.append(float(compute_dice(volume_prediction, volume_target, include_background=True).mean()))
    return {
        "model": f"{meta['name']} v{meta['version']}" + (" (demo)" if meta.get("demo") else ""),
        "params": sum(parameter.numel() for parameter in model.parameters()),
        "macs": count_macs(model, input_size), "input_size": input_size, "slices": len(records),
        "cases": len(by_case), "case_dice": float(np.mean(case_dice)) if case_dice else math.nan,
        "spacing_mm": sorted(set(spacing)) if isinstance(spacing, list) else spacing,
        "hd95_unit": "mm" if spacing else "px",
        "nsd_tolerance": nsd_tolerance, **metrics,
    }


def format_table(result: dict[str, Any]) -> str:
    """The Table I row of ``result`` plus a line of extra counts."""
    values = (result["model"], f"{result['params'] / 1e6:.3f} M",
              f"{result['macs'] / 1e9:.3f} GMACs (thop)", f"{result['dsc']:.4f}", f"{result['miou']:.4f}",
              f"{result['hd95']:.2f} {result['hd95_unit']}", f"{result['nsd']:.4f}")
    widths = [max(len(column), len(value)) for column, value in zip(TABLE_COLUMNS, values)]
    header = " | ".join(column.ljust(width) for column, width in zip(TABLE_COLUMNS, widths))
    row = " | ".join(value.ljust(width) for value, width in zip(values, widths))
    extra = (f"{result['slices']} slices from {result['cases']} cases; {result['lesion_slices']} with abscess "
             f"({result['detected']} detected); false positives on {result['false_positive_slices']} of "
             f"{result['empty_slices']} lesion-free slices; HD95 over detected slices "
             f"{result['hd95_detected']:.2f} {result['hd95_unit']}; pooled Dice {result['dice_pooled']:.4f}; "
             f"mean case 3D Dice {result['case_dice']:.4f}; input {result['input_size']}x{result['input_size']}; "
             f"NSD tolerance {result['nsd_tolerance']} {result['hd95_unit']}")
    return "\n".join([header, "-+-".join("-" * width for width in widths), row, extra])


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description="Evaluate a VM-UNet checkpoint (AbscessHeNe Table I columns).")
    parser.add_argument("--checkpoint", type=Path, required=True, help="checkpoint file (.pt)")
    parser.add_argument("--data", type=Path, required=True, help="dataset root (AbscessHeNe layout)")
    parser.add_argument("--split", choices=["test", "train"], default="test", help="split to evaluate")
    parser.add_argument("--batch-size", type=int, default=8, help="slices per forward pass")
    parser.add_argument("--nsd-tolerance", type=float, default=2.0, help="NSD tolerance (mm, or px without spacing)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = evaluate(args.checkpoint, args.data, args.split, args.batch_size, args.nsd_tolerance)
    print(format_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if not math.isfinite(result["dsc"]):
        print("note: the split has no abscess slice; DSC/mIoU/HD95/NSD are undefined", file=sys.stderr)


if __name__ == "__main__":
    main()

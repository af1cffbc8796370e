"""Evaluation CLI (models.training.evaluate): the AbscessHeNe Table I columns computed with MONAI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from models.training.evaluate import main as evaluate_main
from models.training.evaluate import segmentation_metrics
from tooling.phantoms import write_dataset
from models.vmunet import VMUNet
from models.weights import make_meta, save_checkpoint


pytestmark = pytest.mark.usefixtures("one_thread")


def test_metrics_of_known_masks() -> None:
    target = torch.zeros(3, 1, 40, 40)
    target[0, 0, 10:20, 10:20] = 1
    target[1, 0, 5:15, 5:25] = 1  # slice 2 has no lesion
    prediction = target.clone()
    prediction[1] = 0
    prediction[1, 0, 5:15, 7:27] = 1  # shifted by 2 pixels
    prediction[2, 0, 30:33, 30:33] = 1  # false positive on a lesion-free slice
    metrics = segmentation_metrics(prediction, target, spacing=0.5, nsd_tolerance=0.5)
    assert metrics["lesion_slices"] == 2 and metrics["detected"] == 2
    assert metrics["false_positive_slices"] == 1 and metrics["empty_slices"] == 1
    assert metrics["dsc"] == pytest.approx((1.0 + 0.9) / 2)
    assert metrics["miou"] == pytest.approx((1.0 + 180 / 220) / 2)
    assert metrics["hd95"] == pytest.approx((0.0 + 1.0) / 2) == metrics["hd95_detected"]  # 2 px at 0.5 mm
    assert 0.5 < metrics["nsd"] < 1.0
    per_slice = segmentation_metrics(prediction, target, spacing=[0.5, 1.0, 2.0], nsd_tolerance=0.5)
    assert per_slice["hd95"] == pytest.approx((0.0 + 2.0) / 2)  # 2 px at 1.0 mm on slice 1
    missed = segmentation_metrics(torch.zeros_like(target), target, spacing=None)
    assert missed["dsc"] == 0.0 and missed["hd95"] == pytest.approx(math.hypot(40, 40))


def test_cli_prints_table_i_columns(tmp_path, capsys, tiny_vmunet_config) -> None:
    data = tmp_path / "data"
    write_dataset(data, cases=2, seed=4, slice_margin=0, size=96, progress=False)
    torch.manual_seed(0)
    model = VMUNet(**{**tiny_vmunet_config, "dims": 8})
    checkpoint = tmp_path / "tiny.pt"
    save_checkpoint(checkpoint, model, make_meta("vmunet-test", "0", demo=True, input_size=32))
    evaluate_main(["--checkpoint", str(checkpoint), "--data", str(data), "--json", str(tmp_path / "m.json")])
    header, _, row, extra = capsys.readouterr().out.strip().splitlines()
    assert [column.strip() for column in header.split("|")] == ["Model", "Params", "FLOPs", "DSC", "mIoU", "HD95", "NSD"]
    cells = [cell.strip() for cell in row.split("|")]
    assert cells[0] == "vmunet-test v0 (demo)" and cells[2].endswith("GMACs (thop)") and cells[5].endswith("mm")
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["params"] == sum(p.numel() for p in model.parameters()) and result["macs"] > 0
    assert result["spacing_mm"] == pytest.approx(240 * 1.01 / 96, rel=1e-3)
    for key in ("dsc", "miou", "hd95", "nsd", "dice_pooled"):
        assert math.isfinite(result[key]), key
    assert "slices from 1 cases" in extra

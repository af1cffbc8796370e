"""The leave-one-host-out segmentation evaluation (tooling.segmentation_eval) on a tiny network.

A random tiny VM-UNet gives meaningless numbers; the test checks the protocol (a host the
weights were trained on is refused), the metric ranges, the real-CT path (a chest CT without a
neck is skipped as the node skips it) and that the Markdown section is replaced, not appended.
"""

from __future__ import annotations

import math

import pytest
import torch

from models import VMUNet
from models.weights import make_meta, save_checkpoint
from tooling.segmentation_eval import evaluate_checkpoint, segmentation_table, write_section


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tiny_vmunet_config):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    meta = make_meta("tiny", "0", demo=True, window="multi_window", input_size=64, input_spacing_mm=3.0,
                     training={"hosts": ["ct_head", "neck_chest_ct"]})
    save_checkpoint(path, VMUNet(**tiny_vmunet_config), meta)
    return path


def test_held_out_host_metrics_and_real_cts(tiny_checkpoint, one_thread) -> None:
    with pytest.raises(SystemExit, match="not a held-out host"):
        evaluate_checkpoint(tiny_checkpoint, "ct_head", cases=1, seed=5)
    result = evaluate_checkpoint(tiny_checkpoint, "aorta_ct", cases=1, seed=5, real_cts=("neck_chest_ct",))
    assert result["trained_on"] == ["ct_head", "neck_chest_ct"] and result["lesions"].endswith("/1")
    for key in ("pooled_dsc", "slice_dsc", "case_dice", "nsd", "lesion_sensitivity"):
        assert 0.0 <= result[key] <= 1.0, key
    assert math.isnan(result["hd95_detected"]) or result["hd95_detected"] <= result["hd95_penalised"] + 1e-6
    assert result["real_cts"]["neck_chest_ct"] == {
        "skipped": True, "false_lesions": 0, "reason": result["real_cts"]["neck_chest_ct"]["reason"]}
    assert "lung apices" in result["real_cts"]["neck_chest_ct"]["reason"]
    table = segmentation_table([result])
    assert "| tiny v0 |" in table and "skipped (no neck)" in table and "`aorta_ct`" in table


def test_markdown_section_is_replaced(tmp_path) -> None:
    path = tmp_path / "evaluation.md"
    path.write_text("# Evaluation\n\n<!-- x:start -->\nold\n<!-- x:end -->\n\ntail\n")
    write_section(path, "x", "python -m tool a", "| new |")
    write_section(path, "x", "python -m tool b", "| newer |")
    text = path.read_text()
    assert text.count("<!-- x:start -->") == 1 and "| newer |" in text and "old" not in text and "tail" in text
    write_section(path, "y", "python -m tool c", "| y |")
    assert path.read_text().rstrip().endswith("<!-- y:end -->")

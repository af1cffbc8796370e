"""Data reader (models.training.data) and training loop (models.training.train) on a tiny phantom dataset."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from models import scan
from models.training.data import AbscessSliceDataset, DatasetLayoutError, load_image, read_split
from tooling.phantoms import write_dataset
from models.training.train import main as train_main
from models.training.train import bce_dice_loss, settings_for, train
from models.weights import load_checkpoint


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Two training cases and one test case, every third neck slice kept (small and fast)."""
    root = tmp_path_factory.mktemp("phantom_data")
    write_dataset(root, cases=3, seed=21, test_fraction=0.34, slice_margin=0, size=128, progress=False)
    for split in ("train", "test"):
        for index, path in enumerate(sorted((root / f"{split}_images").iterdir())):
            if index % 3:
                path.unlink()
                (root / f"{split}_masks" / path.name).unlink()
    return root


def test_reader_pairs_files_and_reads_hu(dataset) -> None:
    records = read_split(dataset, "train")
    assert len({record.case_id for record in records}) == 2
    assert all(record.image_path.name == record.mask_path.name for record in records)
    assert records[0].metadata["case_id"] == records[0].case_id
    values, kind = load_image(records[0].image_path)
    assert kind == "hu" and values.min() >= -1024.0
    with pytest.raises(DatasetLayoutError, match="train_masks"):
        shutil.copytree(dataset / "train_images", dataset.parent / "broken" / "train_images")
        read_split(dataset.parent / "broken", "train")


def test_dataset_items_and_augmentation(dataset) -> None:
    plain = AbscessSliceDataset(dataset, "train", input_size=64, window="multi_window")
    item = plain[0]
    assert item["image"].shape == (3, 64, 64) and item["mask"].shape == (1, 64, 64)
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    assert set(torch.unique(torch.cat([plain[i]["mask"] for i in range(len(plain))])).tolist()) == {0.0, 1.0}
    augmented = AbscessSliceDataset(dataset, "train", input_size=64, augment=True, seed=1)
    augmented.set_epoch(4)
    first = [augmented[i]["image"] for i in range(len(augmented))]
    augmented.set_epoch(4)
    again = [augmented[i]["image"] for i in range(len(augmented))]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert set(torch.unique(augmented[0]["mask"]).tolist()) <= {0.0, 1.0}


def test_reader_accepts_8bit_abscesshene_pngs(dataset, tmp_path) -> None:
    """AbscessHeNe ships 8-bit windowed PNGs and masks; masks may be 0/1 and suffixed."""
    for split in ("train", "test"):
        (tmp_path / f"{split}_images").mkdir()
        (tmp_path / f"{split}_masks").mkdir()
        for record in read_split(dataset, split):
            hu, _ = load_image(record.image_path)
            windowed = np.clip((hu + 125.0) / 350.0 * 255.0, 0, 255).astype(np.uint8)
            Image.fromarray(windowed).save(tmp_path / f"{split}_images" / f"p_{record.image_path.name}")
            mask = (np.asarray(Image.open(record.mask_path)) > 0).astype(np.uint8)
            Image.fromarray(mask).save(tmp_path / f"{split}_masks" / f"p_{record.mask_path.stem}_mask.png")
    eight_bit = AbscessSliceDataset(tmp_path, "train", input_size=32)
    assert eight_bit.image_kind == "windowed"
    masks = torch.cat([eight_bit[i]["mask"] for i in range(len(eight_bit))])
    assert masks.max() == 1.0
    item = eight_bit[0]
    assert torch.equal(item["image"][0], item["image"][2])  # grey level in all three channels


def test_cpu_training_uses_the_numba_autograd_scan() -> None:
    """train() relies on models.scan's own choice: the compiled sequential scan with its
    adjoint backward for CPU autograd (equivalence to the reference: tests/test_scan.py)."""
    assert scan.choose_backend("cpu", needs_grad=True) == "numba-autograd"


def test_training_lowers_the_loss(dataset, tmp_path) -> None:
    settings = settings_for("tiny", epochs=5, batch_size=4, input_size=64, val_cases=0, seed=3)
    history = train(dataset, tmp_path, settings, progress=False)
    losses = [row["train_loss"] for row in history["epochs"]]
    assert len(losses) == 5
    assert losses[-1] < losses[0] - 0.015, losses  # starts at the prior, so no free BCE drop
    _model, meta = load_checkpoint(tmp_path / "best.pt")
    assert meta["demo"] is True and meta["input_size"] == 64 and meta["preprocessing"]["window"] == "multi_window"
    assert meta["training"]["train_cases"] == ["case000", "case001"]
    assert str(dataset) not in json.dumps(meta)  # the shipped meta names no path of the training machine
    assert meta["training"]["generator"]["module"] == "tooling.phantoms"
    assert (tmp_path / "training_curve.png").stat().st_size > 1000
    assert json.loads((tmp_path / "history.json").read_text())["epochs"][-1]["epoch"] == 5


def test_resume_continues_exactly(dataset, tmp_path) -> None:
    """An interrupted run (stopped by its time budget after epoch 1) resumed with --resume
    reproduces the uninterrupted run step for step (weights, optimizer, schedule, RNG)."""
    common = {"batch_size": 4, "input_size": 32, "val_cases": 0, "seed": 5, "epochs": 3}
    straight = train(dataset, tmp_path / "straight", settings_for("tiny", **common), progress=False)
    arguments = ["--data", str(dataset), "--out", str(tmp_path / "resumed"), "--config", "tiny", "--epochs", "3",
                 "--input-size", "32", "--batch-size", "4", "--val-cases", "0", "--seed", "5", "--no-progress"]
    train_main(arguments + ["--max-minutes", "0"])
    interrupted = json.loads((tmp_path / "resumed" / "history.json").read_text())
    assert [row["epoch"] for row in interrupted["epochs"]] == [1]
    train_main(arguments + ["--resume"])
    resumed = json.loads((tmp_path / "resumed" / "history.json").read_text())
    assert [row["epoch"] for row in resumed["epochs"]] == [1, 2, 3]
    np.testing.assert_allclose(resumed["steps"], straight["steps"], rtol=1e-5)
    assert load_checkpoint(tmp_path / "resumed" / "last.pt").meta["training"]["epoch"] == 3


def test_init_from_is_a_warm_restart(dataset, tmp_path) -> None:
    """--init-from starts from given weights (not from scratch) with a fresh schedule: the first
    epoch's loss is the end of the earlier run's, and the run records where it started."""
    common = {"batch_size": 4, "input_size": 32, "val_cases": 0, "seed": 5}
    first = train(dataset, tmp_path / "first", settings_for("tiny", epochs=3, **common), progress=False)
    arguments = ["--data", str(dataset), "--config", "tiny", "--epochs", "1", "--input-size", "32",
                 "--batch-size", "4", "--val-cases", "0", "--seed", "5", "--no-progress"]
    train_main(arguments + ["--out", str(tmp_path / "warm"), "--init-from", str(tmp_path / "first" / "last.pt")])
    train_main(arguments + ["--out", str(tmp_path / "cold")])
    warm = json.loads((tmp_path / "warm" / "history.json").read_text())
    cold = json.loads((tmp_path / "cold" / "history.json").read_text())
    assert warm["settings"]["init_from"].endswith("last.pt") and "init_from" not in cold["settings"]
    assert warm["epochs"][0]["lr"] == cold["epochs"][0]["lr"]  # a fresh schedule, not the ended one
    assert warm["epochs"][0]["train_loss"] < cold["epochs"][0]["train_loss"]
    assert warm["epochs"][0]["train_loss"] < first["epochs"][0]["train_loss"]
    shipped = load_checkpoint(tmp_path / "warm" / "last.pt").meta["training"]
    assert shipped["warm_start_from"] == {"name": "vmunet", "version": "0", "epoch": 3}
    assert str(tmp_path) not in json.dumps(shipped)  # names the weights it started from, not their path


def test_reference_recipe_is_the_vm_unet_reference_code(dataset, tmp_path, capsys) -> None:
    """--recipe reference: cosine with T_max 50, per-sample Dice (smooth 1), min-max inputs, no bias prior."""
    settings = settings_for("tiny", recipe="reference", epochs=2, batch_size=4, input_size=32, val_cases=0, seed=1)
    train(dataset, tmp_path, settings, progress=False)
    model, meta = load_checkpoint(tmp_path / "last.pt")
    assert meta["preprocessing"]["normalisation"] == "reference"
    assert meta["training"]["schedule"] == "cosine, T_max 50 epochs"
    assert meta["training"]["loss"] == "BCE (pos_weight 1.0) + per-sample Dice (smooth 1)"
    state = torch.load(tmp_path / "last.train.pt", weights_only=False)
    assert state["scheduler"]["T_max"] == 50
    node_settings = settings_for("tiny", epochs=1, batch_size=4, input_size=32, val_cases=0, seed=1)
    train(dataset, tmp_path / "node", node_settings, progress=False)
    node_model, _ = load_checkpoint(tmp_path / "node" / "last.pt")
    # the node recipe starts the output bias at the background prior, the reference at PyTorch's init
    assert float(node_model.final_conv.bias.detach()) < -2.0 < float(model.final_conv.bias.detach())
    with pytest.raises(SystemExit):
        train_main(["--help"])
    assert "--recipe reference reproduces AbscessHeNe Table I" in " ".join(capsys.readouterr().out.split())


def test_per_sample_dice_rewards_empty_predictions_on_empty_slices() -> None:
    targets = torch.zeros(2, 1, 8, 8)
    targets[0, 0, 2:4, 2:4] = 1.0
    confident = torch.where(targets > 0, 20.0, -20.0)
    assert float(bce_dice_loss(confident, targets)) == pytest.approx(0.0, abs=1e-6)
    assert float(bce_dice_loss(confident, targets, per_sample=False)) == pytest.approx(0.0, abs=1e-6)
    # an empty output costs half as much per sample (the empty slice scores a Dice of 1): the
    # pull towards empty outputs that made the node pool its Dice over the batch
    nothing = torch.full_like(targets, -20.0)
    per_sample, pooled = float(bce_dice_loss(nothing, targets)), float(bce_dice_loss(nothing, targets, per_sample=False))
    assert pooled - per_sample == pytest.approx((1 - 1 / 5) - (1 - (1 / 5 + 1) / 2), abs=1e-3)  # same BCE, Dice 0.8 vs 0.4

"""Train VM-UNet on a dataset in the AbscessHeNe layout (real AbscessHeNe or phantoms).

Two recipes (``--recipe``):

``reference`` -- the VM-UNet reference code's recipe, with which AbscessHeNe's Table I was made
    (Dao et al., Sec. IV-A; JCruan519/VM-UNet ``configs/config_setting.py``, ``utils.py``):
    BCE + Dice on the sigmoid output, the Dice per sample with smoothing 1 and averaged over the
    batch (``BceDiceLoss(wb=1, wd=1)``); AdamW (lr 1e-3, weight decay 1e-2); cosine annealing
    with ``T_max = 50`` epochs down to 1e-5, stepped once per epoch (so the rate rises again
    after epoch 50, 150, 250); the reference's input normalisation (every image min-max scaled
    to [0, 255] on its own, :func:`models.preprocessing.normalise_input`); no output-bias prior;
    random horizontal/vertical flips and rotations. With ``--config paper`` (the 27.43 M network,
    256 x 256 inputs, batch 16, 300 epochs) this is one command for Table I on a site's
    AbscessHeNe copy and GPU::

        python -m models.training.train --data AbscessHeNe --out RUN --config paper --recipe reference

    Deviations, both for determinism: the rotation angle is drawn per sample (the reference
    draws one angle when the transform is built) and seeds are fixed.
``node`` (default) -- what the demo weights are trained with: the same BCE + Dice, but the Dice
    pooled over the batch (smoothing 1) and the abscess pixels of the BCE weighted
    ``bce_pos_weight``: phantom abscesses are under 1 % of a slice, and with the per-sample Dice
    a 2 M-parameter VM-UNet collapsed to an empty output (validation Dice 0 for five epochs);
    one cosine over all epochs, the windows' [0, 1]
    scaling (``--window multi_window``: the HU-aware three-window input), and the output bias
    started at the background prior (:data:`PRIOR_LOGIT`).

Inputs reach the network by resampling to the configuration's ``input_spacing_mm`` and padding
or cropping (:func:`models.preprocessing.to_model_grid`), as at inference.

Outputs in ``--out``:

* ``last.pt`` / ``best.pt``: checkpoints written by :func:`models.weights.save_checkpoint`
  (config + state dict + meta), loadable by :class:`models.segmenter.Segmenter`.
  ``best.pt`` has the highest validation Dice (pooled over the validation slices) on whole
  cases held out of the training split, or the lowest training loss when there are none.
* ``last.train.pt``: what ``--resume`` needs besides the weights: epoch, optimizer,
  scheduler, random states, history.
* ``history.json`` and ``training_curve.png`` (loss and validation Dice per epoch).

CLI::

    python -m models.training.train --data DIR --out DIR [--config tiny|demo|demo2|paper]
        [--recipe node|reference] [--epochs N] [--input-size 256] [--resume]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_dice
from tqdm import tqdm

from models.preprocessing import normalise_input
from models.training.data import AbscessSliceDataset, read_description, read_split
from models.vmunet import VMUNet
from models.weights import DEMO_DESCRIPTION, load_checkpoint, make_meta, save_checkpoint

__all__ = ["CONFIGS", "RECIPES", "TrainSettings", "bce_dice_loss", "main", "settings_for", "train"]

#: Named configurations: network keyword arguments and training hyper-parameters.
CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": {
        "model": {"dims": 16, "depths": [1, 1], "depths_decoder": [1, 1], "d_state": 4,
                  "drop_path_rate": 0.0},
        "input_size": 64, "input_spacing_mm": 3.0, "batch_size": 4, "epochs": 3, "lr": 3e-3,
        "window": "multi_window", "rotation_degrees": 15.0, "bce_pos_weight": 10.0,
    },
    "demo": {
        "model": {"dims": 32, "depths": [1, 1, 1], "depths_decoder": [1, 1, 1], "d_state": 8,
                  "drop_path_rate": 0.0},
        "input_size": 128, "input_spacing_mm": 1.875, "batch_size": 8, "epochs": 22, "lr": 1e-3,
        "window": "multi_window", "rotation_degrees": 20.0, "bce_pos_weight": 10.0,
    },
    "demo2": {  # the demo weights v2: v1's three stages at 1.5x the width, 1.03 M parameters
        "model": {"dims": 48, "depths": [1, 1, 1], "depths_decoder": [1, 1, 1], "d_state": 8,
                  "drop_path_rate": 0.0},
        "input_size": 128, "input_spacing_mm": 1.875, "batch_size": 8, "epochs": 24, "lr": 1e-3,
        "window": "multi_window", "rotation_degrees": 20.0, "bce_pos_weight": 10.0,
    },
    "paper": {
        "model": {},  # VMUNet() defaults: the 27.43 M-parameter network of Table I
        "input_size": 256, "input_spacing_mm": 0.9375, "batch_size": 16, "epochs": 300, "lr": 1e-3,
        "window": "soft_tissue", "rotation_degrees": 180.0, "bce_pos_weight": 1.0,
    },
}
#: Training recipes (see the module docstring): scheduler period, input scaling, output-bias prior.
RECIPES: dict[str, dict[str, Any]] = {
    "node": {"cosine_period": None, "normalisation": "unit", "prior_bias": True, "use_pos_weight": True,
             "per_sample_dice": False},
    "reference": {"cosine_period": 50, "normalisation": "reference", "prior_bias": False, "use_pos_weight": False,
                  "per_sample_dice": True},
}

WEIGHT_DECAY = 1e-2
MIN_LR = 1e-5
#: Initial bias of the output logits: sigmoid(-3) = 4.7 %, near the abscess share of a slice.
#: Starting at p = 0.5 everywhere, the first updates mostly push every pixel towards background
#: and small VM-UNets then collapse to a spatially constant output (seen on phantom data);
#: starting at the prior (as for RetinaNet's focal loss) avoids that.
PRIOR_LOGIT = -3.0


class TrainSettings(dict):
    """Resolved settings of one run (a plain dict, stored in checkpoints and history)."""


def settings_for(config: str = "demo", **overrides: Any) -> TrainSettings:
    """Settings of a named configuration with some values replaced.

    Args:
        config: a key of :data:`CONFIGS`.
        **overrides: ``recipe``, ``input_size``, ``input_spacing_mm``, ``batch_size``, ``epochs``,
            ``lr``, ``window``, ``rotation_degrees``, ``bce_pos_weight``, ``seed``, ``val_cases``,
            ``name``, ``version`` or ``model``; None values keep the preset.

    Raises:
        KeyError: unknown configuration or setting.
    """
    base = CONFIGS[config]
    settings = TrainSettings(
        config=config, recipe="node", model=dict(base["model"]), input_size=base["input_size"],
        input_spacing_mm=base["input_spacing_mm"], batch_size=base["batch_size"], epochs=base["epochs"], lr=base["lr"], window=base["window"],
        rotation_degrees=base["rotation_degrees"], bce_pos_weight=base["bce_pos_weight"], seed=0,
        val_cases=None, name="vmunet", version="0")
    for key, value in overrides.items():
        if key not in settings:
            raise KeyError(f"unknown training setting {key!r}; expected one of {sorted(settings)}")
        if value is not None:
            settings[key] = value
    return settings


def bce_dice_loss(logits: torch.Tensor, targets: torch.Tensor, pos_weight: float = 1.0,
                  per_sample: bool = True) -> torch.Tensor:
    """BCE + Dice, the loss of AbscessHeNe's baselines (the VM-UNet reference's ``BceDiceLoss(wb=1, wd=1)``).

    With ``per_sample`` (the reference) the Dice term is computed per sample on the sigmoid
    probabilities with smoothing 1 (``1 - mean_i (2 |P_i T_i| + 1) / (|P_i| + |T_i| + 1)``), so a
    slice without abscess is rewarded for an empty prediction; otherwise the batch is pooled
    into one Dice (smoothing 1). The BCE is the mean over all pixels, abscess pixels weighted
    ``pos_weight`` (1 in the reference).
    """
    probabilities = torch.sigmoid(logits).flatten(1 if per_sample else 0)
    flat_targets = targets.flatten(1 if per_sample else 0)
    intersection = (probabilities * flat_targets).sum(-1)
    dice = (2.0 * intersection + 1.0) / (probabilities.sum(-1) + flat_targets.sum(-1) + 1.0)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, targets, pos_weight=torch.tensor([float(pos_weight)], device=logits.device))
    return (1.0 - dice.mean()) + bce


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _split_cases(case_ids: Sequence[str], val_cases: int | None) -> tuple[list[str], list[str]]:
    """Hold the last ``val_cases`` cases (default: 10 %, none under 5 cases) out for validation."""
    if val_cases is None:
        val_cases = len(case_ids) // 10 if len(case_ids) >= 5 else 0
        val_cases = max(val_cases, 1) if len(case_ids) >= 5 else 0
    val_cases = min(val_cases, max(len(case_ids) - 1, 0))
    if val_cases == 0:
        return list(case_ids), []
    return list(case_ids[:-val_cases]), list(case_ids[-val_cases:])


@torch.no_grad()
def _validation_dice(model: VMUNet, dataset: AbscessSliceDataset, batch_size: int, normalisation: str) -> float:
    """Dice of the thresholded predictions pooled over all validation slices (FPs count)."""
    model.eval()
    predictions, targets = [], []
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for batch in loader:
        images = normalise_input(batch["image"], normalisation)
        predictions.append((torch.sigmoid(model(images)) > 0.5).float())
        targets.append(batch["mask"])
    model.train()
    # pooled: every slice becomes one plane of a single [1, 1, N, H, W] volume
    pooled_prediction = torch.cat(predictions)[:, 0][None, None]
    pooled_target = torch.cat(targets)[:, 0][None, None]
    dice = compute_dice(pooled_prediction, pooled_target, include_background=True, ignore_empty=False)
    return float(dice.mean())


def _plot_curve(history: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history["epochs"]]
    figure, loss_axis = plt.subplots(figsize=(7, 4))
    loss_axis.plot(epochs, [row["train_loss"] for row in history["epochs"]], "o-", color="tab:blue",
                   label="training loss (Dice + BCE)")
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("loss", color="tab:blue")
    val = [(row["epoch"], row["val_dice"]) for row in history["epochs"] if row.get("val_dice") is not None]
    if val:
        dice_axis = loss_axis.twinx()
        dice_axis.plot(*zip(*val), "s-", color="tab:red", label="validation Dice")
        dice_axis.set_ylabel("validation Dice (pooled)", color="tab:red")
        dice_axis.set_ylim(0, 1)
    loss_axis.set_title(f"VM-UNet training ({history['settings']['config']})")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _meta(settings: TrainSettings, data_root: Path, description: dict[str, Any], image_kind: str,
          epoch: int, train_cases: list[str], val_cases: list[str], metrics: dict[str, Any],
          warm_start: dict[str, Any] | None = None) -> dict[str, Any]:
    synthetic = bool(description.get("synthetic"))
    window = settings["window"] if image_kind == "hu" else "soft_tissue"
    text = DEMO_DESCRIPTION if synthetic else (
        f"VM-UNet trained with models.training.train on {data_root.name}; not validated for clinical use")
    training = {
        # what the data is and how it was made, never a path of the training machine (the meta ships)
        "data": description.get("description") or data_root.name, "generator": description.get("generator"),
        "dataset_name": description.get("name", data_root.name),
        "hosts": sorted(set(description.get("generator", {}).get("hosts", []))),
        "synthetic": synthetic, "image_kind": image_kind, "config": settings["config"],
        "epoch": epoch, "epochs": settings["epochs"], "batch_size": settings["batch_size"],
        "lr": settings["lr"], "seed": settings["seed"], "train_cases": train_cases, "val_cases": val_cases,
        "recipe": settings["recipe"],
        "loss": (f"BCE (pos_weight {_pos_weight(settings)}) + "
                 f"{'per-sample' if RECIPES[settings['recipe']]['per_sample_dice'] else 'batch-pooled'} Dice (smooth 1)"),
        "optimizer": "AdamW", "schedule": f"cosine, T_max {_cosine_period(settings)} epochs",
    }
    if warm_start:
        training["warm_start_from"] = warm_start
    if image_kind == "windowed":
        training["note"] = "trained on 8-bit windowed PNGs; inference windows HU with soft_tissue"
    return make_meta(settings["name"], settings["version"], demo=synthetic, description=text, window=window,
                     input_size=settings["input_size"], input_spacing_mm=settings["input_spacing_mm"],
                     normalisation=RECIPES[settings["recipe"]]["normalisation"], training=training, metrics=metrics)


def _pos_weight(settings: TrainSettings) -> float:
    return float(settings["bce_pos_weight"]) if RECIPES[settings["recipe"]]["use_pos_weight"] else 1.0


def _cosine_period(settings: TrainSettings) -> int:
    return RECIPES[settings["recipe"]]["cosine_period"] or settings["epochs"]


def train(data_root: Path | str, out_dir: Path | str, settings: TrainSettings, resume: bool = False,
          max_minutes: float | None = None, progress: bool = True,
          init_from: Path | str | None = None) -> dict[str, Any]:
    """Train (or resume training) and return the history.

    Args:
        data_root: dataset in the AbscessHeNe layout.
        out_dir: where checkpoints, history and curve go.
        settings: resolved settings (see :data:`CONFIGS`).
        resume: continue from ``out_dir/last.pt`` + ``last.train.pt`` when they exist.
        max_minutes: stop after the epoch during which this much time has passed (in this call).
        progress: show tqdm progress bars.
        init_from: start from these weights (a checkpoint of the same architecture) with a fresh
            optimizer and schedule: a warm restart, unlike ``resume``, whose schedule has ended.

    Returns:
        The history dict (also written to ``history.json``).
    """
    data_root, out = Path(data_root), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "last.train.pt"
    resuming = resume and state_path.is_file() and (out / "last.pt").is_file()
    state = torch.load(state_path, weights_only=False) if resuming else None
    if state is not None:
        settings = TrainSettings(state["settings"], epochs=settings["epochs"])
    _seed_everything(settings["seed"])

    description = read_description(data_root)
    case_ids = list(dict.fromkeys(record.case_id for record in read_split(data_root, "train")))
    train_cases, val_cases = _split_cases(case_ids, settings["val_cases"])
    common = {"input_size": settings["input_size"], "input_spacing_mm": settings["input_spacing_mm"],
              "window": settings["window"]}
    recipe = RECIPES[settings["recipe"]]
    train_set = AbscessSliceDataset(data_root, "train", augment=True, case_ids=train_cases,
                                    rotation_degrees=settings["rotation_degrees"], seed=settings["seed"], **common)
    val_set = AbscessSliceDataset(data_root, "train", case_ids=val_cases, **common) if val_cases else None
    image_kind = train_set.image_kind

    if state is not None:
        model = load_checkpoint(out / "last.pt").model.train()
    elif init_from is not None:
        model = VMUNet(**settings["model"]).train()
        start = load_checkpoint(init_from)
        model.load_state_dict(start.model.state_dict())
        print(f"warm start from {init_from}", file=sys.stderr)
    else:
        model = VMUNet(**settings["model"]).train()
        if recipe["prior_bias"]:
            with torch.no_grad():  # start at the background prior, not at p = 0.5 (see PRIOR_LOGIT)
                model.final_conv.bias.fill_(PRIOR_LOGIT)
    if settings["input_size"] % model.size_multiple:
        raise ValueError(f"input size {settings['input_size']} must be a multiple of {model.size_multiple}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=_cosine_period(settings), eta_min=MIN_LR)
    pos_weight = _pos_weight(settings)
    history: dict[str, Any] = {"settings": dict(settings), "epochs": [], "steps": [], "best": None}
    if init_from is not None and state is None:
        history["settings"]["init_from"] = str(init_from)  # history.json stays on the training machine
        history["settings"]["warm_start"] = {  # this goes into the shipped meta: names, no path
            "name": start.meta.get("name"), "version": start.meta.get("version"),
            "epoch": start.meta.get("training", {}).get("epoch")}
    start_epoch = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scheduler.T_max = _cosine_period(settings)
        history = state["history"]
        history["settings"]["epochs"] = settings["epochs"]
        start_epoch = state["epoch"] + 1
        _set_rng_state(state["rng"])
        print(f"resuming from epoch {start_epoch} ({out / 'last.pt'})", file=sys.stderr)

    parameters = sum(parameter.numel() for parameter in model.parameters())
    print(f"VM-UNet {settings['config']}: {parameters:,} parameters; {len(train_set)} training slices "
          f"({len(train_cases)} cases), {len(val_set) if val_set else 0} validation slices "
          f"({len(val_cases)} cases); input {settings['input_size']}; {image_kind} images", file=sys.stderr)
    started = time.monotonic()
    earlier_seconds = history["epochs"][-1]["seconds"] if history["epochs"] else 0.0  # before a resume
    for epoch in range(start_epoch, settings["epochs"]):
        train_set.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(
            train_set, batch_size=settings["batch_size"], shuffle=True,
            generator=torch.Generator().manual_seed(settings["seed"] * 1009 + epoch))
        losses = []
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{settings['epochs']}", disable=not progress, leave=False)
        for batch in bar:
            logits = model(normalise_input(batch["image"], recipe["normalisation"]))
            loss = bce_dice_loss(logits, batch["mask"], pos_weight, recipe["per_sample_dice"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        scheduler.step()
        history["steps"].extend(losses)
        row = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "lr": optimizer.param_groups[0]["lr"],
               "seconds": round(earlier_seconds + time.monotonic() - started, 1)}
        if val_set is not None:
            row["val_dice"] = _validation_dice(model, val_set, settings["batch_size"], recipe["normalisation"])
        history["epochs"].append(row)
        score = row["val_dice"] if val_set is not None else -row["train_loss"]
        improved = history["best"] is None or score > history["best"]["score"]
        metrics = {"val_dice_pooled": row.get("val_dice"), "train_loss": row["train_loss"]}
        meta = _meta(settings, data_root, description, image_kind, epoch + 1, train_cases, val_cases, metrics,
                     history["settings"].get("warm_start"))
        save_checkpoint(out / "last.pt", model, meta)
        if improved:
            history["best"] = {"epoch": epoch + 1, "score": score, **metrics}
            save_checkpoint(out / "best.pt", model, meta)
        torch.save({"settings": dict(settings), "epoch": epoch, "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "rng": _rng_state(), "history": history},
                   state_path)
        (out / "history.json").write_text(json.dumps(history, indent=1))
        _plot_curve(history, out / "training_curve.png")
        print(f"epoch {epoch + 1}: loss {row['train_loss']:.4f}"
              + (f", val Dice {row['val_dice']:.3f}" if "val_dice" in row else "")
              + (" (best)" if improved else "") + f", {row['seconds']:.0f} s", file=sys.stderr)
        if max_minutes is not None and time.monotonic() - started > 60.0 * max_minutes:
            print(f"time budget of {max_minutes} min reached after epoch {epoch + 1}", file=sys.stderr)
            break
    return history


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description="Train VM-UNet on an AbscessHeNe-layout dataset.",
        epilog=("--recipe reference reproduces AbscessHeNe Table I's VM-UNet recipe (the reference code's: "
                "BCE + per-sample Dice with smooth 1, cosine T_max=50, per-image min-max input normalisation, "
                "no output-bias prior); with --config paper on the AbscessHeNe data and a GPU: "
                "python -m models.training.train --data AbscessHeNe --out RUN --config paper --recipe reference"))
    parser.add_argument("--data", type=Path, required=True, help="dataset root (AbscessHeNe layout)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="demo", help="network/training preset")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="node",
                        help="training recipe: node (demo weights) or reference (VM-UNet reference code, Table I)")
    parser.add_argument("--input-spacing", type=float, help="pixel spacing (mm) of the network input")
    parser.add_argument("--epochs", type=int, help="number of epochs (default: the preset's)")
    parser.add_argument("--input-size", type=int, help="square network input side (paper: 256)")
    parser.add_argument("--batch-size", type=int, help="batch size (default: the preset's)")
    parser.add_argument("--lr", type=float, help="initial learning rate (default: the preset's)")
    parser.add_argument("--window", choices=["soft_tissue", "multi_window"], help="HU window mode")
    parser.add_argument("--bce-pos-weight", type=float, help="weight of abscess pixels in the BCE term")
    parser.add_argument("--val-cases", type=int, help="training cases held out for validation (default 10%%)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--name", default="vmunet", help="model name stored in the checkpoint meta")
    parser.add_argument("--version", default="0", help="weights version stored in the checkpoint meta")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--max-minutes", type=float, help="stop after the epoch that passes this time")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    parser.add_argument("--init-from", type=Path, metavar="CHECKPOINT",
                        help="warm restart: start from these weights with a fresh optimizer and schedule")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = settings_for(args.config, recipe=args.recipe, input_size=args.input_size,
                            input_spacing_mm=args.input_spacing, batch_size=args.batch_size,
                            epochs=args.epochs, lr=args.lr, window=args.window, seed=args.seed,
                            bce_pos_weight=args.bce_pos_weight,
                            val_cases=args.val_cases, name=args.name, version=args.version)
    history = train(args.data, args.out, settings, resume=args.resume, max_minutes=args.max_minutes,
                    progress=not args.no_progress, init_from=args.init_from)
    best = history["best"]
    print(f"best epoch {best['epoch']}: " + ", ".join(f"{k} {v:.4f}" for k, v in best.items()
                                                      if isinstance(v, float)) + f"; checkpoints in {args.out}")


if __name__ == "__main__":
    main()

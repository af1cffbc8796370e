"""VM-UNet vs U-Nets: CPU forward time per slice, measured in one run on the same cores.

Models (3x256x256 input, eval mode, ``torch.inference_mode``, denormals flushed):

- ``VMUNet()``, the paper's configuration (27.43 M parameters; Ruan et al. 2024), with the
  node's CPU inference path (Numba scan backend);
- MONAI ``UNet`` with channels (64, 128, 256, 512, 1024), strides (2, 2, 2, 2), 2 residual
  units (25.97 M parameters): the network a MONAI user picks first;
- the paper's U-Net (AbscessHeNe's Table I: 31.04 M parameters, 54.74 G FLOPs) as MONAI's
  ``BasicUNet`` with features (64, 128, 256, 512, 1024, 64): the classic double-conv U-Net,
  31.11 M parameters, ~59 G MACs by thop.

For every thread setting (all cores, then 1 thread) and batch size, the models are timed
interleaved (repeat 1 of every model, then repeat 2, ...; best of ``--repeats`` kept), so that
load from other processes hits all of them alike. Printed:

- seconds per slice per model and batch size, each model's best batch size and its achieved
  G MAC/s (thop MACs per slice / seconds per slice; thop does not count VM-UNet's selective
  scan nor its x-projection einsums, like the paper's 4.11 G);
- the G MAC/s of a large float32 matmul (2048 x 2048 @ 2048 x 2048) on the same threads with
  MKL (``torch.mm``) and with oneDNN, the machine's practical limit;
- the goal ratios at each model's best batch size, the last lines machine readable::

      vmunet_over_monai_unet_all_threads=<ratio>
      vmunet_over_basic_unet_all_threads=<ratio>
      vmunet_over_monai_unet_1_thread=<ratio>
      vmunet_over_basic_unet_1_thread=<ratio>

Where VM-UNet's time goes, and what the goal asks of the scan: at VM-UNet's best batch size one
forward is timed with the Numba four-direction scan measured separately. Printed: the scan's
state updates per slice (``4 directions x L x d_inner x N``, each an ``exp`` and three
multiply-adds; 327 M for the paper config), its rate in G updates/s, numpy's vectorised
``exp`` alone in G/s on the same threads for scale, the time of everything else (linear
layers, convolutions, norms), and the scan rate that the goal (0.5x MONAI UNet) would need with
everything else unchanged (``vmunet_scan_g_updates_per_s_<threads>`` and
``vmunet_scan_needed_g_updates_per_s_<threads>``; "impossible" when everything else alone is
already over the goal).

``--profile`` also prints torch.profiler's top operators of one VM-UNet forward per thread
setting and batch size (the Numba scan shows up as ``selective_scan_numba``).

Run: ``python bench/segmentation.py --repeats 3 --batch-sizes 1,4,16`` (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import VMUNet

INPUT_SIZE = 256
MATMUL_SIZE = 2048
VMUNET = "VM-UNet (numba scan)"
MONAI_UNET = "MONAI UNet 64..1024 s2 ru2"
BASIC_UNET = "BasicUNet 64..1024 (paper U-Net)"
RATIO_KEYS = {MONAI_UNET: "monai_unet", BASIC_UNET: "basic_unet"}
GOAL_RATIO = 0.5
"""Issue 13's goal: VM-UNet at most this fraction of MONAI UNet's time per slice."""


def build_models() -> dict[str, torch.nn.Module]:
    """The three networks in eval mode, seeded."""
    from monai.networks.nets import BasicUNet, UNet

    torch.manual_seed(0)
    return {
        VMUNET: VMUNet().eval(),
        MONAI_UNET: UNet(
            spatial_dims=2,
            in_channels=3,
            out_channels=1,
            channels=(64, 128, 256, 512, 1024),
            strides=(2, 2, 2, 2),
            num_res_units=2,
        ).eval(),
        BASIC_UNET: BasicUNet(
            spatial_dims=2, in_channels=3, out_channels=1, features=(64, 128, 256, 512, 1024, 64)
        ).eval(),
    }


def count_parameters(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def thop_gmacs(model: torch.nn.Module) -> float:
    """Multiply-accumulates (G) of one 3x256x256 slice by thop."""
    import thop

    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # thop's own deprecation warnings
        macs, _ = thop.profile(model, inputs=(torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE),), verbose=False)
    for module in model.modules():  # thop leaves counters behind as buffers
        for name in ("total_ops", "total_params"):
            module._buffers.pop(name, None)
    return macs / 1e9


def best_seconds(function: Callable[[], object], repeats: int) -> float:
    """Best wall time of ``repeats`` calls (after one warm-up call)."""
    function()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_gmacs(repeats: int) -> dict[str, float]:
    """G MAC/s of a float32 2048^3 matmul with MKL (``torch.mm``) and, if built in, oneDNN."""
    a, b = torch.randn(MATMUL_SIZE, MATMUL_SIZE), torch.randn(MATMUL_SIZE, MATMUL_SIZE)
    macs = MATMUL_SIZE**3 / 1e9
    limits = {"MKL torch.mm": macs / best_seconds(lambda: torch.mm(a, b), repeats)}
    if torch.backends.mkldnn.is_available():
        weight = b.t().contiguous()  # linear: a @ weight.T
        limits["oneDNN linear"] = macs / best_seconds(
            lambda: torch.ops.mkldnn._linear_pointwise(a, weight, None, "none", [], ""), repeats
        )
    return limits


def time_models(
    models: dict[str, torch.nn.Module], batch_size: int, repeats: int
) -> dict[str, float]:
    """Seconds per slice of every model at ``batch_size``, repeats interleaved across models."""
    images = torch.rand(batch_size, 3, INPUT_SIZE, INPUT_SIZE)
    best = dict.fromkeys(models, float("inf"))
    with torch.inference_mode():
        for model in models.values():
            model(images)  # warm-up: oneDNN primitives, Numba compilation
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(images)
                best[name] = min(best[name], time.perf_counter() - start)
    return {name: seconds / batch_size for name, seconds in best.items()}


def scan_budget(model: torch.nn.Module, batch_size: int, repeats: int) -> tuple[float, float, float]:
    """(scan seconds, other seconds, state updates), per slice, of VM-UNet's best forward."""
    import models.vmunet as vmunet

    original = vmunet.four_direction_scan_numba
    spent = {"seconds": 0.0, "updates": 0.0}

    def timed(x: torch.Tensor, projections: torch.Tensor, dt_weight: torch.Tensor, A: torch.Tensor, *rest, **options):
        start = time.perf_counter()
        result = original(x, projections, dt_weight, A, *rest, **options)
        spent["seconds"] += time.perf_counter() - start
        batch, height, width, _ = x.shape
        directions, channels, states = A.shape
        spent["updates"] += batch * height * width * directions * channels * states
        return result

    images = torch.rand(batch_size, 3, INPUT_SIZE, INPUT_SIZE)
    vmunet.four_direction_scan_numba = timed
    best = (float("inf"), 0.0, 0.0)
    try:
        with torch.inference_mode():
            model(images)
            for _ in range(repeats):
                spent.update(seconds=0.0, updates=0.0)
                start = time.perf_counter()
                model(images)
                total = time.perf_counter() - start
                if total < best[0] + best[1]:
                    best = (spent["seconds"], total - spent["seconds"], spent["updates"])
    finally:
        vmunet.four_direction_scan_numba = original
    return best[0] / batch_size, best[1] / batch_size, best[2] / batch_size


def exp_rate(repeats: int) -> float:
    """G exp/s of numpy's vectorised float32 exp (one thread: numpy does not thread it)."""
    import numpy as np

    values = -np.random.default_rng(0).random(8_000_000, dtype=np.float32)
    out = np.empty_like(values)
    return values.size / 1e9 / best_seconds(lambda: np.exp(values, out=out), repeats)


def print_profile(model: torch.nn.Module, batch_size: int, rows: int) -> None:
    """torch.profiler's top operators (self CPU time) of one forward."""
    from torch.profiler import ProfilerActivity, profile

    images = torch.rand(batch_size, 3, INPUT_SIZE, INPUT_SIZE)
    with torch.inference_mode():
        model(images)
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            model(images)
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per model and batch size (best kept)")
    parser.add_argument("--batch-sizes", default="1,4,16", help="comma-separated batch sizes")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="the 'all threads' setting")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's top operators of VM-UNet")
    parser.add_argument("--profile-rows", type=int, default=15, help="operators per profile table")
    args = parser.parse_args()
    batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    torch.set_flush_denormal(True)
    models = build_models()
    gmacs = {name: thop_gmacs(model) for name, model in models.items()}
    print(f"torch {torch.__version__}, cpu count {os.cpu_count()}, input 3x{INPUT_SIZE}x{INPUT_SIZE}, "
          f"best of {args.repeats}, repeats interleaved across models")
    for name, model in models.items():
        print(f"  {name:34s} {count_parameters(model) / 1e6:6.2f} M parameters, {gmacs[name]:6.2f} G MACs (thop)")

    ratio_lines = []
    for label, threads in (("all_threads", args.threads), ("1_thread", 1)):
        torch.set_num_threads(threads)
        limits = matmul_gmacs(args.repeats)
        print(f"\n== {threads} thread(s): float32 {MATMUL_SIZE}^3 matmul "
              + ", ".join(f"{engine} {value:.0f} G MAC/s" for engine, value in limits.items()))
        times = {size: time_models(models, size, args.repeats) for size in batch_sizes}
        print(f"{'model':34s} " + " ".join(f"{'b=' + str(size):>8s}" for size in batch_sizes)
              + f" {'best b':>6s} {'s/slice':>8s} {'GMAC/s':>7s} {'% limit':>7s}")
        best: dict[str, float] = {}
        for name in models:
            best_size = min(batch_sizes, key=lambda size: times[size][name])
            best[name] = times[best_size][name]
            achieved = gmacs[name] / best[name]
            print(f"{name:34s} " + " ".join(f"{times[size][name]:8.3f}" for size in batch_sizes)
                  + f" {best_size:6d} {best[name]:8.3f} {achieved:7.1f} {100 * achieved / max(limits.values()):6.0f}%")
        for name, key in RATIO_KEYS.items():
            ratio = best[VMUNET] / best[name]
            print(f"VM-UNet / {name} at best batch sizes: {ratio:.3f}")
            ratio_lines.append(f"vmunet_over_{key}_{label}={ratio:.3f}")
        vm_size = min(batch_sizes, key=lambda size: times[size][VMUNET])
        scan_seconds, other_seconds, updates = scan_budget(models[VMUNET], vm_size, args.repeats)
        goal = GOAL_RATIO * best[MONAI_UNET]
        rate = updates / scan_seconds / 1e9
        needed = updates / (goal - other_seconds) / 1e9 if goal > other_seconds else float("inf")
        print(f"VM-UNet at b={vm_size}: scan {1000 * scan_seconds:.1f} ms/slice for {updates / 1e6:.0f} M state "
              f"updates ({rate:.2f} G updates/s; numpy exp alone {exp_rate(args.repeats):.2f} G/s), everything else "
              f"{1000 * other_seconds:.1f} ms/slice; goal {GOAL_RATIO}x MONAI UNet = {1000 * goal:.1f} ms/slice needs "
              + (f"{needed:.1f} G updates/s ({needed / rate:.1f}x the scan's rate)" if needed < float("inf")
                 else "less than everything else alone takes: impossible without changing the network"))
        ratio_lines.append(f"vmunet_scan_g_updates_per_s_{label}={rate:.2f}")
        ratio_lines.append(f"vmunet_scan_needed_g_updates_per_s_{label}="
                           + (f"{needed:.2f}" if needed < float("inf") else "impossible"))
        if args.profile:
            for size in batch_sizes:
                print(f"\ntorch.profiler, VM-UNet, {threads} thread(s), batch {size}:")
                print_profile(models[VMUNET], size, args.profile_rows)
    print()
    print("\n".join(ratio_lines))


if __name__ == "__main__":
    main()

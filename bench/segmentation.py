"""VM-UNet vs U-Net forward time on the CPU, one run, same machine.

Measures the forward time per 256x256 slice (3 channels, eval mode, ``torch.inference_mode``,
denormals flushed) at each batch size of:

- ``VMUNet()``, the paper's configuration (27.43 M parameters; Ruan et al. 2024), with the
  Numba scan (the node's CPU inference path: fused four-direction kernel) and with the
  chunked PyTorch scan (the autograd backend, run without gradient; slow, so by default
  at batch 1 only — ``--torch-scan-batch-sizes``);
- the U-Net of AbscessHeNe's Table I (31.04 M parameters, 54.74 G FLOPs): MONAI's
  ``BasicUNet`` with features (64, 128, 256, 512, 1024, 64) — the classic double-conv
  U-Net, 31.11 M parameters, ~59 G MACs by thop — and, for reference, MONAI's ``UNet``
  with channels (64, 128, 256, 512, 1024), strides (2, 2, 2, 2), 2 residual units
  (25.97 M parameters: no channels/strides/residual-units setting of that class gives
  31.04 M with these channels; 3 residual units give 38.5 M).

Prints a table and the time ratios VM-UNet (Numba) / U-Net. The last line is machine
readable: ``vmunet_over_unet_cpu=<ratio>``, per-slice time of VM-UNet (Numba scan) over the
31 M U-Net at the largest batch size measured. The goal in the issue is <= 0.25 (the FLOPs
ratio of Table I is 4.11 / 54.74 = 0.075, but thop does not count the selective scan).

Run: ``python bench/segmentation.py --repeats 3 --batch-sizes 1,16``.
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
from models.scan import forced_backend

INPUT_SIZE = 256
PAPER_UNET_PARAMETERS = 31.04e6


def count_parameters(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def thop_gmacs(model: torch.nn.Module) -> float | None:
    """Multiply-accumulates per 1x3x256x256 forward by thop, or None without thop."""
    try:
        import thop
    except ImportError:
        return None
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # thop's own deprecation warnings
        macs, _ = thop.profile(model, inputs=(torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE),), verbose=False)
    for module in model.modules():  # thop leaves counters behind as buffers
        for name in ("total_ops", "total_params"):
            module._buffers.pop(name, None)
    return macs / 1e9


def seconds_per_slice(forward: Callable[[torch.Tensor], torch.Tensor], batch_size: int, repeats: int) -> float:
    """Best of ``repeats`` timed forwards (after one warm-up), divided by the batch size."""
    images = torch.rand(batch_size, 3, INPUT_SIZE, INPUT_SIZE)
    with torch.inference_mode():
        forward(images)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            forward(images)
            best = min(best, time.perf_counter() - start)
    return best / batch_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per model and batch size (best kept)")
    parser.add_argument("--batch-sizes", default="1,16", help="comma-separated batch sizes")
    parser.add_argument(
        "--torch-scan-batch-sizes", default="1", help="batch sizes for VM-UNet with the chunked PyTorch scan"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch and numba threads (default: all cores)")
    args = parser.parse_args()
    batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    torch_scan_batch_sizes = [int(size) for size in args.torch_scan_batch_sizes.split(",") if size]
    if args.threads:
        torch.set_num_threads(args.threads)
        import numba

        numba.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)

    from monai.networks.nets import BasicUNet, UNet

    vmunet = VMUNet().eval()
    basic_unet = BasicUNet(spatial_dims=2, in_channels=3, out_channels=1, features=(64, 128, 256, 512, 1024, 64)).eval()
    monai_unet = UNet(
        spatial_dims=2,
        in_channels=3,
        out_channels=1,
        channels=(64, 128, 256, 512, 1024),
        strides=(2, 2, 2, 2),
        num_res_units=2,
    ).eval()

    def vmunet_with(backend: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def forward(images: torch.Tensor) -> torch.Tensor:
            with forced_backend(backend):
                return vmunet(images)

        return forward

    candidates = [
        ("VM-UNet, numba scan", vmunet, vmunet_with("numba"), batch_sizes),
        ("VM-UNet, torch chunked scan", vmunet, vmunet_with("torch"), torch_scan_batch_sizes),
        ("U-Net (MONAI BasicUNet 64..1024)", basic_unet, basic_unet, batch_sizes),
        ("MONAI UNet 64..1024 s2 ru2", monai_unet, monai_unet, batch_sizes),
    ]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu count {os.cpu_count()}, "
        f"input 3x{INPUT_SIZE}x{INPUT_SIZE}, best of {args.repeats}"
    )
    print(f"{'model':34s} {'params':>8s} {'GMACs':>6s} {'batch':>5s} {'s/slice':>8s}")
    times: dict[tuple[str, int], float] = {}
    for label, model, forward, sizes in candidates:
        parameters = count_parameters(model)
        gmacs = thop_gmacs(model)
        for batch_size in sizes:
            times[label, batch_size] = seconds_per_slice(forward, batch_size, args.repeats)
            macs_text = f"{gmacs:6.2f}" if gmacs is not None else "     -"
            print(
                f"{label:34s} {parameters / 1e6:7.2f}M {macs_text} {batch_size:5d} {times[label, batch_size]:8.3f}",
                flush=True,
            )
    print(
        f"paper's U-Net: {PAPER_UNET_PARAMETERS / 1e6:.2f} M parameters; BasicUNet above: "
        f"{count_parameters(basic_unet) / 1e6:.2f} M"
    )
    for batch_size in batch_sizes:
        vm_time = times["VM-UNet, numba scan", batch_size]
        print(
            f"batch {batch_size:3d}: VM-UNet(numba) / U-Net(BasicUNet) = "
            f"{vm_time / times['U-Net (MONAI BasicUNet 64..1024)', batch_size]:.3f}, "
            f"/ MONAI UNet = {vm_time / times['MONAI UNet 64..1024 s2 ru2', batch_size]:.3f}"
        )
    for batch_size in torch_scan_batch_sizes:
        print(
            f"batch {batch_size:3d}: VM-UNet torch-scan / numba-scan = "
            f"{times['VM-UNet, torch chunked scan', batch_size] / times['VM-UNet, numba scan', batch_size]:.1f}"
        )
    largest = max(batch_sizes)
    ratio = times["VM-UNet, numba scan", largest] / times["U-Net (MONAI BasicUNet 64..1024)", largest]
    print(f"vmunet_over_unet_cpu={ratio:.3f}")


if __name__ == "__main__":
    main()

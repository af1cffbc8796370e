"""VM-UNet (Ruan et al. 2024): size of the paper's configuration, shapes, gradients."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import VMUNet
from models.weights import load_checkpoint

torch.set_num_threads(1)

REFERENCE_PARAMETERS = 27_427_561  # JCruan519/VM-UNet default config; Table I: 27.43 M
REFERENCE_GMACS = 4.11  # Table I (thop; skips the selective scan and the einsums)
DEMO_WEIGHTS = Path(__file__).resolve().parents[3] / "models" / "weights" / "vmunet-demo-v3.pt"
# Outputs of the shipped demo checkpoint (v3) on torch.rand(2, 3, 128, 96) seeded 0, computed with the
# chunked torch scan (models.scan.forced_backend("torch")), not the fused Numba inference path that the
# test runs: logits[:, 0, 8::32, 8::32] and the first 6 channels of the globally pooled deepest features.
DEMO_LOGITS = [
    [[-13.570630, -12.206891, -12.854376], [-11.248687, -13.760201, -12.924720],
     [-13.408219, -14.104756, -11.514294], [-11.264508, -11.795194, -13.546605]],
    [[-13.856727, -9.496876, -11.973789], [-12.452491, -10.896900, -12.558110],
     [-10.812575, -12.150029, -13.633545], [-13.609124, -9.911473, -13.062062]],
]  # fmt: skip
DEMO_POOLED_FEATURES = [
    [1.746681, -3.504953, 6.103662, -4.781034, 8.507756, -2.712577],
    [1.525361, -3.369801, 5.991659, -4.200228, 8.838517, -2.436785],
]

TINY_CONFIGS = {
    "two-stage": {"dims": 16, "depths": [1, 1], "depths_decoder": [1, 1], "d_state": 4},
    "three-stage": {"dims": [8, 16, 32], "depths": [1, 2, 1], "depths_decoder": [1, 1, 1], "d_state": 8},
    "grayscale-two-class": {
        "input_channels": 1,
        "num_classes": 2,
        "dims": 8,
        "depths": [1, 1],
        "depths_decoder": [1, 1],
    },
}


def count_parameters(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def test_default_config_is_the_papers() -> None:
    model = VMUNet()
    assert model.config == {
        "input_channels": 3,
        "num_classes": 1,
        "depths": [2, 2, 2, 2],
        "depths_decoder": [2, 2, 2, 1],
        "dims": [96, 192, 384, 768],
        "d_state": 16,
        "drop_path_rate": 0.2,
        "patch_size": 4,
    }
    parameters = count_parameters(model)
    print(f"VMUNet() parameters: {parameters:,} (reference {REFERENCE_PARAMETERS:,})")
    assert abs(parameters - REFERENCE_PARAMETERS) <= 0.02 * REFERENCE_PARAMETERS
    assert parameters == REFERENCE_PARAMETERS
    drop_rates = [block.drop_path.drop_prob for stage in model.layers for block in stage.blocks]
    assert drop_rates[0] == 0.0 and drop_rates[-1] == pytest.approx(0.2)


def test_shipped_demo_checkpoint_loads_and_gives_the_pinned_outputs() -> None:
    checkpoint = load_checkpoint(DEMO_WEIGHTS)
    images = torch.rand(2, 3, 128, 96, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits, features = checkpoint.model.forward_with_features(images)
    torch.testing.assert_close(logits[:, 0, 8::32, 8::32], torch.tensor(DEMO_LOGITS), rtol=0, atol=1e-4)
    torch.testing.assert_close(
        features.mean(dim=(2, 3))[:, :6], torch.tensor(DEMO_POOLED_FEATURES), rtol=0, atol=1e-4
    )
    training_path = checkpoint.model(images.clone().requires_grad_())  # autograd scan backend
    # float32 sums in another order (autograd scan vs fused inference path): within 1e-3 of a logit
    # (2.5e-4 of a probability at most), a wrong scan differs by whole units
    torch.testing.assert_close(training_path.detach(), logits, rtol=1e-4, atol=1e-3)


def test_default_config_macs_by_thop() -> None:
    """thop counts the linear layers, convolutions and norms only (like the paper's 4.11 G)."""
    thop = pytest.importorskip("thop")
    model = VMUNet().eval()
    with torch.no_grad():
        macs, _ = thop.profile(model, inputs=(torch.zeros(1, 3, 256, 256),), verbose=False)
    print(
        f"VMUNet() thop MACs at 1x3x256x256: {macs / 1e9:.2f} G (Table I: {REFERENCE_GMACS} G); "
        "the selective scan and the x/dt projection einsums are not counted"
    )
    assert macs / 1e9 == pytest.approx(REFERENCE_GMACS, rel=0.05)


@pytest.mark.parametrize("config_name", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("height,width", [(32, 32), (64, 96)])
def test_output_and_feature_shapes(config_name: str, height: int, width: int) -> None:
    config = TINY_CONFIGS[config_name]
    model = VMUNet(**config).eval()
    images = torch.randn(2, model.input_channels, height, width)
    with torch.no_grad():
        logits, features = model.forward_with_features(images)
        logits_alone = model(images)
    stages = len(model.dims)
    assert logits.shape == (2, model.num_classes, height, width)
    assert features.shape == (2, model.dims[-1], height // 2 ** (stages + 1), width // 2 ** (stages + 1))
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, logits_alone)


def test_grayscale_input_is_repeated_for_three_channel_network() -> None:
    model = VMUNet(dims=8, depths=[1, 1], depths_decoder=[1, 1]).eval()
    gray = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(gray), model(gray.repeat(1, 3, 1, 1)))


def test_bad_input_sizes_are_refused() -> None:
    model = VMUNet(dims=8, depths=[1, 1], depths_decoder=[1, 1])
    with pytest.raises(ValueError, match="multiples of 8"):
        model(torch.randn(1, 3, 36, 32))
    with pytest.raises(ValueError, match="input channels"):
        model(torch.randn(1, 2, 32, 32))
    with pytest.raises(ValueError, match="double"):
        VMUNet(dims=[8, 12], depths=[1, 1], depths_decoder=[1, 1])


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    model = VMUNet(dims=8, depths=[1, 1], depths_decoder=[1, 1], d_state=4, drop_path_rate=0.0).train()
    images = torch.randn(2, 3, 32, 32)
    target = (torch.rand(2, 1, 32, 32) > 0.5).float()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(images), target)
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
    assert model.layers[0].blocks[0].self_attention.A_logs.grad.abs().sum() > 0
    assert model.layers[0].blocks[0].self_attention.dt_projs_bias.grad.abs().sum() > 0


def test_inference_path_matches_training_path() -> None:
    """CPU inference (fused Numba scan) and autograd (chunked PyTorch scan) agree."""
    torch.manual_seed(1)
    model = VMUNet(dims=[16, 32, 64], depths=[1, 1, 1], depths_decoder=[1, 1, 1], d_state=8).eval()
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "A_logs"):
                module.A_logs.add_(0.5 * torch.randn_like(module.A_logs))
                module.dt_projs_bias.add_(torch.randn_like(module.dt_projs_bias))
    images = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        inference = model(images)
    training_path = model(images.requires_grad_())
    assert (inference - training_path).abs().max().item() < 1e-4


def test_drop_path_is_stochastic_only_in_training() -> None:
    model = VMUNet(dims=8, depths=[2, 2], depths_decoder=[2, 2], drop_path_rate=0.9)
    images = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(images), model(images))
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        first = model(images)
        second = model(images)
    assert not torch.allclose(first, second)


def test_importing_models_stays_light() -> None:
    """numba and mamba-ssm are imported only when a scan backend needs them."""
    code = "import sys, models; assert not {'numba', 'mamba_ssm'} & set(sys.modules), sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)

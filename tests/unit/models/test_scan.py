"""Selective-scan backends against the sequential reference loop."""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch

from models import scan
from models.scan import (
    OutputGate,
    choose_backend,
    four_direction_positions,
    four_direction_scan_numba,
    selective_scan,
    selective_scan_chunked,
    selective_scan_numba,
    selective_scan_numba_autograd,
    selective_scan_reference,
)

torch.set_num_threads(1)
GRADIENT_NAMES = ("u", "delta", "A", "B", "C", "D", "delta_bias")


def make_inputs(
    batch: int = 2,
    groups: int = 2,
    channels_per_group: int = 3,
    length: int = 37,
    state_size: int = 5,
    dt_bias_mean: float = -2.0,
    grouped: bool = True,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    channels = groups * channels_per_group

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    projection_shape = (batch, groups, state_size, length) if grouped else (batch, state_size, length)
    inputs = {
        "u": randn(batch, channels, length),
        "delta": 0.5 * randn(batch, channels, length),
        "A": -torch.exp(0.5 * randn(channels, state_size)),
        "B": randn(*projection_shape),
        "C": randn(*projection_shape),
        "D": randn(channels),
        "delta_bias": dt_bias_mean + 0.5 * randn(channels),
    }
    return {name: tensor.to(device) for name, tensor in inputs.items()}


def max_abs_diff(first: torch.Tensor, second: torch.Tensor) -> float:
    return (first.detach().cpu() - second.detach().cpu()).abs().max().item()


def chunked_16(**inputs: torch.Tensor) -> torch.Tensor:
    return selective_scan_chunked(**inputs, chunk_length=16)  # L=45: 2 full chunks and a partial one


# The differentiable backends (mamba-ssm's CUDA kernel is tested separately, on a GPU).
AUTOGRAD_BACKENDS = {"torch": chunked_16, "numba-autograd": selective_scan_numba_autograd}


def gradients_against_reference(
    function, inputs: dict[str, torch.Tensor], leaves_reference: dict[str, torch.Tensor], expected: torch.Tensor
) -> tuple[float, dict[str, float]]:
    """Output and gradient differences of ``function`` from the reference (whose graph is
    in ``expected``, with leaves ``leaves_reference``; its gradients are computed once)."""
    leaves = {name: tensor.clone().requires_grad_() for name, tensor in inputs.items()}
    actual = function(**leaves)
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(7))
    if leaves_reference["u"].grad is None:
        (expected * weights).sum().backward()
    (actual * weights).sum().backward()
    return max_abs_diff(actual, expected), {
        name: max_abs_diff(leaves[name].grad, leaves_reference[name].grad) for name in GRADIENT_NAMES
    }


@pytest.mark.parametrize("backend", sorted(AUTOGRAD_BACKENDS))
@pytest.mark.parametrize("grouped", [True, False])
def test_autograd_backends_match_reference_forward_and_gradients(backend: str, grouped: bool) -> None:
    inputs = make_inputs(grouped=grouped, groups=2 if grouped else 1, length=45)
    leaves_reference = {name: tensor.clone().requires_grad_() for name, tensor in inputs.items()}
    expected = selective_scan_reference(**leaves_reference)
    forward_diff, gradient_diffs = gradients_against_reference(
        AUTOGRAD_BACKENDS[backend], inputs, leaves_reference, expected
    )
    print(f"{backend} vs reference (grouped={grouped}): output {forward_diff:.2e}, gradients {gradient_diffs}")
    assert forward_diff < 1e-4
    for name in GRADIENT_NAMES:
        scale = leaves_reference[name].grad.abs().max().item()
        assert gradient_diffs[name] <= 1e-4 * max(1.0, scale), name


def test_numba_autograd_without_softplus_or_optional_inputs() -> None:
    inputs = make_inputs(grouped=False, groups=1)
    inputs["delta"] = inputs["delta"].abs()
    for name in ("D", "delta_bias"):
        del inputs[name]
    results = []
    for function in (selective_scan_reference, selective_scan_numba_autograd):
        leaves = {name: tensor.clone().requires_grad_() for name, tensor in inputs.items()}
        output = function(**leaves, delta_softplus=False)
        output.sum().backward()
        results.append([output.detach()] + [leaves[name].grad for name in inputs])
    for actual, expected in zip(results[1], results[0]):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_long_sequence_with_large_steps_stays_finite() -> None:
    """L = 4096, dt around softplus(6): exp(cumsum(dt * A)) over a sequence (VMamba's
    selective_scan_easy) underflows/overflows; the segment-sum formulation does not."""
    inputs = make_inputs(batch=1, groups=1, channels_per_group=4, length=4096, state_size=16, dt_bias_mean=6.0)
    dt = torch.nn.functional.softplus(inputs["delta"] + inputs["delta_bias"][None, :, None])
    log_decay_total = torch.cumsum(dt[0, 0, :, None] * inputs["A"][0], dim=0)
    assert torch.isinf(torch.exp(-log_decay_total)).any()  # what a naive formulation would divide by
    expected = selective_scan_reference(**inputs)
    chunked = selective_scan_chunked(**inputs)
    numba_output = selective_scan_numba(**inputs)
    assert torch.isfinite(chunked).all() and torch.isfinite(numba_output).all()
    print(
        f"L=4096, large dt: chunked {max_abs_diff(chunked, expected):.2e}, "
        f"numba {max_abs_diff(numba_output, expected):.2e} (|y| max {expected.abs().max().item():.1f})"
    )
    assert max_abs_diff(chunked, expected) < 1e-3
    assert max_abs_diff(numba_output, expected) < 1e-3

    leaves_reference = {name: tensor.clone().requires_grad_() for name, tensor in inputs.items()}
    expected = selective_scan_reference(**leaves_reference)
    for backend, function in {"torch": selective_scan_chunked, "numba-autograd": selective_scan_numba_autograd}.items():
        forward_diff, gradient_diffs = gradients_against_reference(function, inputs, leaves_reference, expected)
        print(f"L=4096, large dt, {backend}: output {forward_diff:.2e}, gradients {gradient_diffs}")
        assert forward_diff < 1e-3, backend
        for name in GRADIENT_NAMES:
            scale = leaves_reference[name].grad.abs().max().item()
            assert gradient_diffs[name] <= 1e-3 * max(1.0, scale), (backend, name)


@pytest.mark.parametrize(
    "shape",
    [
        {"grouped": True, "groups": 4, "channels_per_group": 3, "length": 70},
        {"grouped": False, "groups": 1, "channels_per_group": 5, "length": 129, "state_size": 16},
        {
            "grouped": True,
            "groups": 2,
            "channels_per_group": 100,
            "length": 20,
            "dt_bias_mean": 0.0,
        },  # > one channel block
    ],
)
def test_numba_matches_reference(shape: dict) -> None:
    inputs = make_inputs(**shape)
    expected = selective_scan_reference(**inputs)
    actual = selective_scan_numba(**inputs)
    print(f"numba vs reference {shape}: {max_abs_diff(actual, expected):.2e}")
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    assert max_abs_diff(actual, expected) < 1e-4


def test_numba_result_does_not_depend_on_the_thread_count() -> None:
    inputs = make_inputs(batch=3, groups=2, channels_per_group=100, length=50)  # 6 jobs
    single = selective_scan_numba(**inputs)
    torch.set_num_threads(3)
    try:
        threaded = selective_scan_numba(**inputs)
    finally:
        torch.set_num_threads(1)
    torch.testing.assert_close(threaded, single, rtol=0, atol=0)


def test_numba_without_softplus_or_optional_inputs() -> None:
    inputs = make_inputs()
    inputs["delta"] = inputs["delta"].abs()
    expected = selective_scan_reference(
        inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], delta_softplus=False
    )
    actual = selective_scan_numba(
        inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], delta_softplus=False
    )
    assert max_abs_diff(actual, expected) < 1e-4


def four_direction_inputs(
    batch: int, height: int, width: int, channels: int, rank: int, state_size: int, seed: int = 3
) -> dict[str, torch.Tensor]:
    """Inputs of :func:`four_direction_scan_numba` (x-projections in the kernel's layout)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    return {
        "x": randn(batch, height, width, channels),
        "projections": randn(batch, height, width, 4 * (rank + 2 * state_size)),
        "dt_weight": 0.5 * randn(4, channels, rank),
        "A": -torch.exp(randn(4, channels, state_size)),
        "D": randn(4, channels),
        "delta_bias": randn(4, channels) - 1.0,
    }


def four_reference_scans(x, projections, dt_weight, A, D, delta_bias) -> torch.Tensor:
    """SS2D as the reference writes it: scan the reordered copies one direction at a time with
    the sequential reference, put each output back in row-major order and add them."""
    batch, height, width, channels = x.shape
    length, rank, state_size = height * width, dt_weight.shape[2], A.shape[2]
    positions = torch.from_numpy(four_direction_positions(height, width))
    rows = x.reshape(batch, length, channels)
    per_direction = projections.reshape(batch, length, 4, rank + 2 * state_size)
    expected = torch.zeros(batch, length, channels)
    for direction in range(4):
        order = positions[direction]
        projected = per_direction[:, order, direction]  # [b, L, R + 2n] in scan order
        scanned = selective_scan_reference(
            rows[:, order].transpose(1, 2),
            torch.einsum("blr,dr->bdl", projected[..., :rank], dt_weight[direction]),
            A[direction],
            projected[..., rank : rank + state_size].transpose(1, 2),
            projected[..., rank + state_size :].transpose(1, 2),
            D[direction],
            delta_bias[direction],
        )
        expected[:, order] += scanned.transpose(1, 2)
    return expected.view(batch, height, width, channels)


@pytest.mark.parametrize(
    "sizes",
    [
        {"batch": 2, "height": 5, "width": 7, "channels": 20, "rank": 3, "state_size": 6},
        {"batch": 3, "height": 9, "width": 4, "channels": 100, "rank": 2, "state_size": 5},  # 2 blocks, padded
        {"batch": 1, "height": 1, "width": 13, "channels": 7, "rank": 1, "state_size": 16},
        {"batch": 2, "height": 11, "width": 3, "channels": 193, "rank": 5, "state_size": 4},  # 3 blocks
    ],
)
def test_four_direction_kernel_matches_four_reference_scans(sizes: dict) -> None:
    """SS2D's fused kernel equals scanning the stacked/transposed/flipped copies and adding back
    (odd and non-square maps, batch > 1, channel counts that leave a partial block)."""
    inputs = four_direction_inputs(**sizes)
    expected = four_reference_scans(**inputs)
    actual = four_direction_scan_numba(**inputs)
    print(f"four-direction numba vs reference {sizes}: {max_abs_diff(actual, expected):.2e}")
    assert actual.shape == expected.shape
    assert max_abs_diff(actual, expected) < 1e-4


def test_four_direction_kernel_output_gate_matches_layer_norm_and_silu() -> None:
    inputs = four_direction_inputs(batch=2, height=6, width=5, channels=37, rank=2, state_size=4)
    generator = torch.Generator().manual_seed(5)
    z = 3.0 * torch.randn(2, 6, 5, 37, generator=generator)  # both signs, saturated sigmoids
    weight, bias = torch.randn(37, generator=generator), torch.randn(37, generator=generator)
    summed = four_reference_scans(**inputs)
    expected = torch.nn.functional.layer_norm(summed, (37,), weight, bias, 1e-5) * torch.nn.functional.silu(z)
    actual = four_direction_scan_numba(**inputs, gate=OutputGate(z, weight, bias, 1e-5))
    print(f"gated four-direction numba vs reference: {max_abs_diff(actual, expected):.2e}")
    assert max_abs_diff(actual, expected) < 1e-4


def test_kernels_give_the_same_result_on_a_python_thread_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without PyTorch's OpenMP runtime the entries run on a thread pool: same jobs, same result."""
    inputs = four_direction_inputs(batch=3, height=8, width=6, channels=150, rank=2, state_size=4)
    torch.set_num_threads(2)
    try:
        on_openmp = four_direction_scan_numba(**inputs)
        monkeypatch.setattr(scan, "_openmp_parallel", lambda: None)
        on_pool = four_direction_scan_numba(**inputs)
    finally:
        torch.set_num_threads(1)
    torch.testing.assert_close(on_pool, on_openmp, rtol=0, atol=0)


def test_positions_follow_vmunet_scan_order() -> None:
    positions = four_direction_positions(2, 3)
    assert positions.tolist() == [
        [0, 1, 2, 3, 4, 5],  # row-major
        [0, 3, 1, 4, 2, 5],  # column-major (the transposed map, flattened)
        [5, 4, 3, 2, 1, 0],
        [5, 2, 4, 1, 3, 0],
    ]


def test_backend_choice_and_logging(caplog: pytest.LogCaptureFixture) -> None:
    assert choose_backend("cpu", needs_grad=False) == "numba"
    assert choose_backend("cpu", needs_grad=True) == "numba-autograd"
    with scan.forced_backend("torch"):
        assert choose_backend("cpu", needs_grad=True) == "torch"
    with pytest.raises(ValueError, match="unknown scan backend"), scan.forced_backend("sequential"):
        pass
    assert {"numba", "numba-autograd", "torch"} <= set(scan.available_backends())
    inputs = make_inputs(length=10)
    scan._logged_backends.clear()
    with caplog.at_level(logging.INFO, logger="models.scan"):
        with torch.no_grad():
            selective_scan(**inputs)
            selective_scan(**inputs)
        outputs = {}
        for backend in ("numba-autograd", "numba-autograd", "torch"):
            leaves = {name: tensor.clone().requires_grad_() for name, tensor in inputs.items()}
            with contextlib.nullcontext() if backend == "numba-autograd" else scan.forced_backend(backend):
                outputs[backend] = selective_scan(**leaves)
            assert outputs[backend].requires_grad
            outputs[backend].sum().backward()
            assert leaves["A"].grad is not None
    torch.testing.assert_close(outputs["numba-autograd"], outputs["torch"], rtol=1e-4, atol=1e-4)
    messages = [record.getMessage() for record in caplog.records]
    assert messages.count("selective scan backend: numba on cpu") == 1
    assert messages.count("selective scan backend: numba-autograd on cpu") == 1
    assert messages.count("selective scan backend: torch on cpu") == 1


def test_numba_autograd_needs_cpu_tensors() -> None:
    inputs = make_inputs(device="meta")
    with pytest.raises(ValueError, match="CPU only"):
        selective_scan_numba_autograd(**inputs)


def test_shape_errors_are_explicit() -> None:
    inputs = make_inputs()
    inputs["A"] = inputs["A"][:, :3]
    with pytest.raises(ValueError, match="B must be"):
        selective_scan_reference(**inputs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_backend_matches_reference() -> None:
    if "cuda" not in scan.available_backends():
        pytest.skip(f"mamba-ssm's CUDA kernel is not importable ({scan._cuda_import_error})")
    inputs = make_inputs(device="cuda", length=300)
    leaves = {name: tensor.clone().requires_grad_() for name, tensor in inputs.items()}
    actual = selective_scan(**leaves)
    expected = selective_scan_reference(**{name: tensor.cpu() for name, tensor in inputs.items()})
    print(f"cuda vs reference: {max_abs_diff(actual, expected):.2e}")
    assert max_abs_diff(actual, expected) < 1e-3
    actual.sum().backward()
    for name in GRADIENT_NAMES:
        assert torch.isfinite(leaves[name].grad).all(), name

"""Selective scan (the S6 recurrence of Mamba) with automatic backend choice.

(Over 500 lines on purpose: the four backends share one signature, one input check and one
choice of backend, and the tests compare each against the sequential reference kept here.)

For every batch element b and channel d, with ``dt = softplus(delta + delta_bias)``::

    h[t] = exp(dt[t] * A[d]) * h[t-1] + dt[t] * B[t] * u[t]      # h: [d_state]
    y[t] = <C[t], h[t]> + D[d] * u[t]

Shapes follow mamba-ssm's ``selective_scan_fn``: ``u``, ``delta`` ``[b, d, l]``; ``A``
``[d, n]``; ``B``, ``C`` ``[b, n, l]`` or grouped ``[b, k, n, l]`` (channel ``d`` uses
group ``d // (d_total / k)``); ``D``, ``delta_bias`` ``[d]``. Output ``[b, d, l]`` float32.

Backends (:func:`selective_scan` picks one and logs it once):

``"cuda"``
    mamba-ssm's fused kernel, imported lazily when the tensors are on a CUDA device.
``"numba"``
    CPU inference (no gradient needed): a compiled float32 forward kernel, vectorised
    over a block of channels, parallel over (batch, channel block) on PyTorch's own
    OpenMP threads (``torch.get_num_threads()``; a Python thread pool when PyTorch has no
    OpenMP runtime). :func:`four_direction_scan_numba` is its fused form for VM-UNet's
    SS2D (four directions read in place from the feature map and the x-projection
    output, summed, optionally with the output LayerNorm and SiLU gate).
``"numba-autograd"``
    CPU autograd (training) when numba is importable: a compiled sequential forward that
    keeps the states and the adjoint recurrence backwards in time
    (:func:`selective_scan_numba_autograd`). ``O(l * n)`` work per channel, about 60x
    faster than the chunked scan for CPU training; only ``exp`` of non-positive values,
    so it is as stable as the chunked scan. Memory: the states, ``[b, d, l, n]`` float32.
``"torch"``
    Pure PyTorch, differentiable, any device (:func:`selective_scan_chunked`): CPU
    autograd without numba, and CUDA without mamba-ssm. A chunked scan that only
    exponentiates non-positive sums of ``dt * A`` over segments inside a chunk, so it
    cannot overflow however long the sequence or large the step (VMamba's
    ``selective_scan_easy`` exponentiates an unbounded cumulative sum and returns NaN).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import functools
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "available_backends",
    "choose_backend",
    "forced_backend",
    "four_direction_positions",
    "four_direction_scan_numba",
    "log_backend",
    "OutputGate",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_cuda",
    "selective_scan_numba",
    "selective_scan_numba_autograd",
    "selective_scan_reference",
]

logger = logging.getLogger(__name__)

# Chunk lengths of the PyTorch scan: its work grows with l * T * n per channel, its Python
# overhead with l / T. Many channels (VM-UNet's real sizes): short chunks (measured for
# [1, 768, 4096] x 16 states on one core: T=4 2.7 s, T=8 4.0 s, T=32 47 s); few channels
# (tests, small models): long chunks.
LONG_CHUNK_LENGTH = 32
SHORT_CHUNK_LENGTH = 4
MANY_STATES = 4096  # batch * channels * d_state from which the short chunks are used
_logged_backends: set[str] = set()
_forced_backend: str | None = None
_cuda_kernel: Callable | None = None
_cuda_import_error: str | None = None


def _grouped(state_projection: torch.Tensor) -> torch.Tensor:
    """View B or C as grouped [b, k, n, l] (an ungrouped [b, n, l] is one group)."""
    if state_projection.ndim == 3:
        return state_projection.unsqueeze(1)
    if state_projection.ndim != 4:
        raise ValueError(f"B and C must be [b, n, l] or [b, k, n, l], got shape {tuple(state_projection.shape)}")
    return state_projection


def _step_sizes(delta: torch.Tensor, delta_bias: torch.Tensor | None, delta_softplus: bool) -> torch.Tensor:
    if delta_bias is not None:
        delta = delta + delta_bias[None, :, None]
    return F.softplus(delta) if delta_softplus else delta


def _check_shapes(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> int:
    """Validate shapes; return the number of channels per group."""
    if u.ndim != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be [b, d, l], got {tuple(u.shape)} and {tuple(delta.shape)}")
    batch, channels, length = u.shape
    if A.ndim != 2 or A.shape[0] != channels:
        raise ValueError(f"A must be [d={channels}, n], got {tuple(A.shape)}")
    state_size = A.shape[1]
    for name, projection in (("B", _grouped(B)), ("C", _grouped(C))):
        if projection.shape[0] != batch or projection.shape[2] != state_size or projection.shape[3] != length:
            raise ValueError(
                f"{name} must be [b={batch}, k, n={state_size}, l={length}], got {tuple(projection.shape)}"
            )
        if channels % projection.shape[1]:
            raise ValueError(f"channels d={channels} must be divisible by the {name} groups k={projection.shape[1]}")
    return channels // _grouped(B).shape[1]


def selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
) -> torch.Tensor:
    """Straightforward sequential loop over time (ground truth for the tests; slow).

    Args:
        u: Inputs [b, d, l].
        delta: Raw step sizes [b, d, l].
        A: State matrix (diagonal, negative) [d, n].
        B: Input projection [b, n, l] or [b, k, n, l].
        C: Output projection [b, n, l] or [b, k, n, l].
        D: Skip weights [d], or None.
        delta_bias: Bias added to ``delta`` [d], or None.
        delta_softplus: Apply softplus to ``delta + delta_bias``.

    Returns:
        Outputs [b, d, l] float32.
    """
    channels_per_group = _check_shapes(u, delta, A, B, C)
    u, delta, A = u.float(), delta.float(), A.float()
    dt = _step_sizes(delta, None if delta_bias is None else delta_bias.float(), delta_softplus)
    B_per_channel = _grouped(B).float().repeat_interleave(channels_per_group, dim=1)  # [b, d, n, l]
    C_per_channel = _grouped(C).float().repeat_interleave(channels_per_group, dim=1)
    state = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    outputs = []
    for step in range(u.shape[2]):
        dt_step = dt[:, :, step, None]
        state = torch.exp(dt_step * A) * state + dt_step * B_per_channel[..., step] * u[:, :, step, None]
        outputs.append((state * C_per_channel[..., step]).sum(-1))
    y = torch.stack(outputs, dim=-1)
    if D is not None:
        y = y + D.float()[None, :, None] * u
    return y


def selective_scan_chunked(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
    chunk_length: int | None = None,
) -> torch.Tensor:
    """Numerically stable chunked scan in PyTorch (differentiable; any device).

    Inside a chunk of ``T`` steps the state is computed in closed form:
    ``h[t] = exp(S[t, -1]) * h_in + sum_{s <= t} exp(S[t, s]) * dt[s] * B[s] * u[s]`` with
    the segment sums ``S[t, s] = sum_{s < r <= t} dt[r] * A`` built by a masked cumulative
    sum (no difference of two large cumulative sums, so no cancellation). Every
    exponentiated value is <= 0; entries with ``s > t`` are masked to ``-inf`` before
    ``exp``. The chunk's last state carries over to the next chunk. Work is
    ``O(l * T * n)`` per channel, memory ``O(T^2 * n)`` per channel and chunk.

    Args:
        u: Inputs [b, d, l].
        delta: Raw step sizes [b, d, l].
        A: State matrix (diagonal, negative) [d, n].
        B: Input projection [b, n, l] or [b, k, n, l].
        C: Output projection [b, n, l] or [b, k, n, l].
        D: Skip weights [d], or None.
        delta_bias: Bias added to ``delta`` [d], or None.
        delta_softplus: Apply softplus to ``delta + delta_bias``.
        chunk_length: Steps per chunk ``T``; by default 4 for many channels and states
            (``b * d * n >= 4096``), else 32.

    Returns:
        Outputs [b, d, l] float32.
    """
    channels_per_group = _check_shapes(u, delta, A, B, C)
    batch, channels, length = u.shape
    if chunk_length is None:
        chunk_length = SHORT_CHUNK_LENGTH if batch * channels * A.shape[1] >= MANY_STATES else LONG_CHUNK_LENGTH
    B_grouped, C_grouped = _grouped(B).float(), _grouped(C).float()
    groups, state_size = B_grouped.shape[1], A.shape[1]
    u32 = u.float()
    dt = _step_sizes(delta.float(), None if delta_bias is None else delta_bias.float(), delta_softplus)

    # Work in [b, k, d_per_group, l, n] / [b, k, 1, l, n] layouts so B and C broadcast over channels.
    u_g = u32.view(batch, groups, channels_per_group, length)
    dt_g = dt.view(batch, groups, channels_per_group, length)
    A_g = A.float().view(groups, channels_per_group, 1, state_size)
    B_g = B_grouped.transpose(2, 3).unsqueeze(2)  # [b, k, 1, l, n]
    C_g = C_grouped.transpose(2, 3).unsqueeze(2)

    state = u32.new_zeros(batch, groups, channels_per_group, state_size)
    outputs = []
    for start in range(0, length, chunk_length):
        stop = min(start + chunk_length, length)
        steps = stop - start
        dt_chunk = dt_g[..., start:stop]  # [b, k, c, T]
        log_decay = dt_chunk.unsqueeze(-1) * A_g  # [b, k, c, T, n], <= 0
        # segment[t, s] = sum_{s < r <= t} log_decay[r]  (t, s index the chunk)
        strictly_lower = torch.ones(steps, steps, dtype=torch.bool, device=u.device).tril(-1)
        repeated = log_decay.unsqueeze(-2).expand(*log_decay.shape[:-2], steps, steps, state_size)  # [.., r, s, n]
        segment = torch.cumsum(repeated.masked_fill(~strictly_lower[:, :, None], 0.0), dim=-3)  # [.., t, s, n]
        lower = torch.ones(steps, steps, dtype=torch.bool, device=u.device).tril()
        decay = torch.exp(segment.masked_fill(~lower[:, :, None], float("-inf")))  # [b, k, c, T, T, n]

        drive = (dt_chunk * u_g[..., start:stop]).unsqueeze(-1) * B_g[..., start:stop, :]  # [b, k, c, T, n]
        within = torch.einsum("bkctsn,bkcsn->bkctn", decay, drive)
        # decay from the chunk start to t: sum_{r <= t} log_decay[r] = segment[t, 0] + log_decay[0]
        from_start = torch.exp(segment[..., :, 0, :] + log_decay[..., :1, :])  # [b, k, c, T, n]
        states = within + from_start * state.unsqueeze(-2)
        outputs.append((states * C_g[..., start:stop, :]).sum(-1))
        state = states[..., -1, :]
    y = torch.cat(outputs, dim=-1).reshape(batch, channels, length)
    if D is not None:
        y = y + D.float()[None, :, None] * u32
    return y


def selective_scan_numba(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
) -> torch.Tensor:
    """CPU forward-only scan with the compiled Numba kernel (no autograd).

    Args and returns as :func:`selective_scan_reference`; tensors must be on the CPU.
    """
    from models import _scan_numba as kernels  # imported lazily: keeps numba out of `import models`

    channels_per_group = _check_shapes(u, delta, A, B, C)
    batch, channels, length = u.shape
    B_grouped, C_grouped = _grouped(B), _grouped(C)
    groups, state_size = B_grouped.shape[1], A.shape[1]
    zeros = u.new_zeros(groups, channels_per_group)
    with torch.no_grad():
        arrays = {
            kernels.GENERIC_U: _numpy(u.transpose(1, 2)),
            kernels.GENERIC_DT: _numpy(delta.view(batch, groups, channels_per_group, length).permute(1, 0, 3, 2)),
            kernels.GENERIC_A: _numpy(A.view(groups, channels_per_group, state_size)),
            kernels.GENERIC_B: _numpy(B_grouped.permute(1, 0, 3, 2)),
            kernels.GENERIC_C: _numpy(C_grouped.permute(1, 0, 3, 2)),
            kernels.GENERIC_D: _numpy(D.view(groups, channels_per_group) if D is not None else zeros),
            kernels.GENERIC_DT_BIAS: _numpy(
                delta_bias.view(groups, channels_per_group) if delta_bias is not None else zeros
            ),
            kernels.GENERIC_OUT: np.empty((batch, length, channels), np.float32),
        }
        sizes = {
            kernels.GENERIC_GROUPS: groups,
            kernels.GENERIC_BATCH: batch,
            kernels.GENERIC_LENGTH: length,
            kernels.GENERIC_CHANNELS: channels_per_group,
            kernels.GENERIC_STATES: state_size,
            kernels.GENERIC_SOFTPLUS: int(bool(delta_softplus)),
        }
        jobs = kernels.count_scan_jobs(batch, channels_per_group)
        _launch(kernels.generic_scan_entry, kernels.GENERIC_BLOCK_SIZE, jobs, sizes, arrays)
    return torch.from_numpy(arrays[kernels.GENERIC_OUT]).transpose(1, 2).contiguous()


class _NumbaAutogradScan(torch.autograd.Function):
    """``y[t] = <C[t], h[t]>``, ``h[t] = exp(dt[t] A) h[t-1] + dt[t] B[t] u[t]`` on the CPU.

    Inputs (float32, CPU): ``u``, ``dt`` [b, d, l] (step sizes after bias and softplus),
    ``A`` [d, n], ``B``, ``C`` [b, k, n, l]. The forward keeps every state for the
    adjoint backward of :mod:`models._scan_numba`.
    """

    @staticmethod
    def forward(
        ctx: Any, u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
    ) -> torch.Tensor:
        from models import _scan_numba  # imported lazily: keeps numba out of `import models`

        states = np.empty(u.shape + (A.shape[1],), np.float32)
        y = _scan_numba.scan_forward_with_states(*_NumbaAutogradScan._arrays(u, dt, A, B, C), states)
        ctx.save_for_backward(u, dt, A, B, C)  # version-checked: in-place changes raise in backward
        ctx.states = states
        return torch.from_numpy(y)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from models import _scan_numba

        arrays = _NumbaAutogradScan._arrays(*ctx.saved_tensors)
        grads = _scan_numba.scan_adjoint(*arrays, ctx.states, _numpy(grad_y))
        del ctx.states
        grad_u, grad_dt, grad_A, grad_B, grad_C = (torch.from_numpy(g) for g in grads)
        return grad_u, grad_dt, grad_A, grad_B.transpose(2, 3), grad_C.transpose(2, 3)

    @staticmethod
    def _arrays(
        u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
    ) -> tuple[np.ndarray, ...]:
        """The kernels' arrays: u, dt, A as they are, B and C state-last [b, k, l, n]."""
        return _numpy(u), _numpy(dt), _numpy(A), _numpy(B.transpose(2, 3)), _numpy(C.transpose(2, 3))


def selective_scan_numba_autograd(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
) -> torch.Tensor:
    """Differentiable CPU scan with compiled Numba forward and adjoint-backward kernels.

    The step sizes (bias, softplus) and the skip term ``D * u`` are computed in PyTorch,
    the recurrence in :mod:`models._scan_numba` (sequential in time, exact ``exp``).

    Args and returns as :func:`selective_scan_reference`; tensors must be on the CPU.

    Raises:
        ValueError: Tensors not on the CPU.
    """
    _check_shapes(u, delta, A, B, C)
    if u.device.type != "cpu":
        raise ValueError(f"the numba-autograd scan runs on the CPU only, got tensors on {u.device}")
    u32 = u.float()
    dt = _step_sizes(delta.float(), None if delta_bias is None else delta_bias.float(), delta_softplus)
    y = _NumbaAutogradScan.apply(u32, dt, A.float(), _grouped(B).float(), _grouped(C).float())
    if D is not None:
        y = y + D.float()[None, :, None] * u32
    return y


class OutputGate(NamedTuple):
    """SS2D's output gate, ``LayerNorm(y) * SiLU(z)``, for :func:`four_direction_scan_numba`.

    Attributes:
        z: Gate inputs [b, H, W, d].
        norm_weight: LayerNorm weight [d].
        norm_bias: LayerNorm bias [d].
        norm_eps: LayerNorm epsilon.
    """

    z: torch.Tensor
    norm_weight: torch.Tensor
    norm_bias: torch.Tensor
    norm_eps: float


def four_direction_positions(height: int, width: int) -> np.ndarray:
    """Storage position of every step of SS2D's four scan directions.

    Returns:
        int64 [4, H*W]: row-major, column-major, reversed row-major, reversed
        column-major — the order of VM-UNet's ``xs`` stack (Ruan et al. 2024).
    """
    return _four_direction_positions(int(height), int(width))


@functools.lru_cache(maxsize=32)
def _four_direction_positions(height: int, width: int) -> np.ndarray:
    grid = np.arange(height * width, dtype=np.int64).reshape(height, width)
    row_major, column_major = grid.reshape(-1), grid.T.reshape(-1)
    return np.ascontiguousarray(np.stack([row_major, column_major, row_major[::-1], column_major[::-1]]))


def four_direction_scan_numba(
    x: torch.Tensor,
    projections: torch.Tensor,
    dt_weight: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor,
    delta_bias: torch.Tensor,
    delta_softplus: bool = True,
    gate: OutputGate | None = None,
) -> torch.Tensor:
    """SS2D's four selective scans, summed (optionally gated), with the Numba kernels (CPU inference).

    Equivalent to scanning the stacked, transposed and flipped copies of the feature map
    with :func:`selective_scan` and adding the four outputs back in row-major order, but
    reads ``x`` and the x-projection output where they are (no copies), applies the
    low-rank dt projection inside the kernel and runs on PyTorch's intra-op threads.

    Args:
        x: Features [b, H, W, d] (channel-last).
        projections: x-projections [b, H, W, 4 * (R + 2n)], per direction ``k``
            ``[k * (R + 2n) : (k + 1) * (R + 2n)]`` = low-rank dt (R), B (n), C (n); the
            output of ``x @ x_proj_weight.reshape(-1, d).T``.
        dt_weight: dt up-projections [4, d, R] (step = ``dt_low_rank @ dt_weight[k].T``).
        A: State matrices [4, d, n].
        D: Skip weights [4, d].
        delta_bias: Step bias [4, d].
        delta_softplus: Apply softplus to ``step + delta_bias``.
        gate: Apply ``LayerNorm(sum) * SiLU(z)`` to the sum (SS2D's output), or None.

    Returns:
        Sum of the four directions [b, H, W, d] float32 (gated when ``gate`` is given).
    """
    from models import _scan_numba as kernels  # imported lazily: keeps numba out of `import models`

    batch, height, width, channels = x.shape
    rank, state_size = dt_weight.shape[2], A.shape[2]
    length = height * width
    out = torch.empty(batch, height, width, channels)  # every position written by the first direction
    with torch.no_grad():
        arrays = {
            kernels.SS2D_X: _numpy(x),
            kernels.SS2D_PROJECTIONS: _numpy(projections),
            kernels.SS2D_DT_WEIGHT: _numpy(dt_weight),
            kernels.SS2D_A: _numpy(A),
            kernels.SS2D_D: _numpy(D),
            kernels.SS2D_DT_BIAS: _numpy(delta_bias),
            kernels.SS2D_POSITIONS: four_direction_positions(height, width),
            kernels.SS2D_OUT: out.numpy(),
        }
        sizes = {
            kernels.SS2D_BATCH: batch,
            kernels.SS2D_LENGTH: length,
            kernels.SS2D_CHANNELS: channels,
            kernels.SS2D_RANK: rank,
            kernels.SS2D_STATES: state_size,
            kernels.SS2D_SOFTPLUS: int(bool(delta_softplus)),
        }
        jobs = kernels.count_scan_jobs(batch, channels)
        _launch(kernels.ss2d_scan_entry, kernels.SS2D_BLOCK_SIZE, jobs, sizes, arrays)
        if gate is not None:
            parameters = torch.zeros(3, channels)
            parameters[0], parameters[1], parameters[2, 0] = gate.norm_weight, gate.norm_bias, gate.norm_eps
            arrays = {
                kernels.GATE_OUT: arrays[kernels.SS2D_OUT],
                kernels.GATE_Z: _numpy(gate.z),
                kernels.GATE_PARAMETERS: parameters.numpy(),
            }
            sizes = {kernels.GATE_ROWS_TOTAL: batch * length, kernels.GATE_CHANNELS: channels}
            jobs = kernels.count_gate_jobs(batch * length)
            _launch(kernels.ss2d_gate_entry, kernels.GATE_BLOCK_SIZE, jobs, sizes, arrays)
    return out


def _launch(entry: Any, block_size: int, jobs: int, sizes: dict[int, int], arrays: dict[int, np.ndarray]) -> None:
    """Run a kernel entry of :mod:`models._scan_numba` over ``jobs`` jobs.

    Builds the entry's int64 argument block (job counter, job count, ``sizes`` and the
    addresses of ``arrays``, each at its slot) and runs the entry on
    ``min(torch.get_num_threads(), jobs)`` threads: PyTorch's own OpenMP threads when its
    runtime is found (:func:`_openmp_parallel`), else a Python thread pool (ctypes releases
    the GIL while an entry runs).

    Args:
        entry: A ``numba.cfunc`` entry (``void(int64*)``).
        block_size: Slots of the entry's argument block.
        jobs: Number of jobs.
        sizes: Slot -> integer argument.
        arrays: Slot -> C-contiguous array (kept alive by the caller during the call).
    """
    from models import _scan_numba as kernels

    block = np.zeros(block_size, np.int64)
    block[kernels.JOBS] = jobs
    for slot, value in sizes.items():
        block[slot] = value
    for slot, array in arrays.items():
        if not array.flags.c_contiguous:
            raise ValueError(f"argument {slot} of {entry} must be C-contiguous")
        block[slot] = array.ctypes.data
    address = block.ctypes.data
    threads = max(1, min(torch.get_num_threads(), jobs))
    parallel = _openmp_parallel()
    if threads == 1:
        entry.ctypes(block.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)))
    elif parallel is not None:
        parallel(entry.address, address, threads, 0)
    else:
        pointer = block.ctypes.data_as(ctypes.POINTER(ctypes.c_int64))
        list(_thread_pool(threads).map(lambda _: entry.ctypes(pointer), range(threads)))


@functools.lru_cache(maxsize=1)
def _openmp_parallel() -> Callable[[int, int, int, int], None] | None:
    """``GOMP_parallel(fn, data, num_threads, flags)`` of the OpenMP runtime that runs
    PyTorch's intra-op threads, or None (PyTorch without OpenMP, runtime not found).

    The runtime is the ``libgomp``/``libiomp5`` already loaded into the process (PyTorch's
    copy first): running the scan on its threads reuses the team that PyTorch's operators
    use, instead of competing with it for the cores while its threads spin.
    """
    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        with open("/proc/self/maps") as maps:
            loaded = {line.split()[-1] for line in maps if line.rstrip().endswith((".so", ".so.1", ".so.5"))}
    except OSError:
        return None
    runtimes = sorted(
        (path for path in loaded if os.path.basename(path).startswith(("libgomp", "libiomp5"))),
        key=lambda path: not path.startswith(os.path.dirname(torch.__file__)),
    )
    for path in runtimes:
        try:
            function = ctypes.CDLL(path).GOMP_parallel
        except (OSError, AttributeError):
            continue
        function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        function.restype = None
        return function
    return None


@functools.lru_cache(maxsize=4)
def _thread_pool(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="selective-scan")


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    """Contiguous float32 numpy view (or copy) of a CPU tensor, detached."""
    return tensor.detach().to(torch.float32).contiguous().numpy()


def _load_cuda_kernel() -> Callable | None:
    global _cuda_kernel, _cuda_import_error
    if _cuda_kernel is None and _cuda_import_error is None:
        try:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        except (ImportError, OSError, RuntimeError) as error:  # not installed, or a broken CUDA extension
            _cuda_import_error = f"{type(error).__name__}: {error}"
        else:
            _cuda_kernel = selective_scan_fn
    return _cuda_kernel


def selective_scan_cuda(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
) -> torch.Tensor:
    """mamba-ssm's fused CUDA kernel (``pip install .[gpu]``); differentiable.

    Raises:
        RuntimeError: mamba-ssm cannot be imported.
    """
    kernel = _load_cuda_kernel()
    if kernel is None:
        raise RuntimeError(f"mamba-ssm's CUDA selective scan is not available ({_cuda_import_error})")
    return kernel(
        u, delta, A, B.contiguous(), C.contiguous(), D, z=None, delta_bias=delta_bias, delta_softplus=delta_softplus
    )


def _numba_available() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def available_backends() -> list[str]:
    """Backends usable in this process: a subset of ``["cuda", "numba", "numba-autograd", "torch"]``."""
    backends = []
    if torch.cuda.is_available() and _load_cuda_kernel() is not None:
        backends.append("cuda")
    if _numba_available():
        backends += ["numba", "numba-autograd"]
    backends.append("torch")
    return backends


def choose_backend(device: torch.device | str, needs_grad: bool) -> str:
    """Name of the backend :func:`selective_scan` uses for tensors on ``device``
    (the one set by :func:`forced_backend`, if any).

    Args:
        device: Device of the inputs.
        needs_grad: Whether a gradient must flow through the scan.

    Returns:
        ``"cuda"`` for CUDA tensors when mamba-ssm is importable; for CPU tensors
        ``"numba"`` (no gradient) or ``"numba-autograd"`` (gradient) when numba is
        importable; ``"torch"`` (the chunked PyTorch scan) otherwise.
    """
    device = torch.device(device)
    if _forced_backend is not None:
        return _forced_backend
    if device.type == "cuda" and _load_cuda_kernel() is not None:
        return "cuda"
    if device.type == "cpu" and _numba_available():
        return "numba-autograd" if needs_grad else "numba"
    return "torch"


@contextlib.contextmanager
def forced_backend(backend: str) -> Iterator[None]:
    """Use ``backend`` for every scan inside the ``with`` block (benchmarks, debugging).

    Args:
        backend: ``"cuda"``, ``"numba"``, ``"numba-autograd"`` or ``"torch"``.
            ``"numba"`` gives no gradient; ``"numba"`` and ``"numba-autograd"`` need CPU
            tensors.

    Raises:
        ValueError: Unknown backend.
    """
    global _forced_backend
    if backend not in _BACKENDS:
        raise ValueError(f"unknown scan backend {backend!r}; expected one of {sorted(_BACKENDS)}")
    previous, _forced_backend = _forced_backend, backend
    try:
        yield
    finally:
        _forced_backend = previous


def log_backend(backend: str, device: torch.device | str) -> None:
    """Log each scan backend the first time it runs in this process, with the reason
    when the PyTorch fallback is chosen (and flush CPU denormals for the CPU inference
    backend)."""
    device = torch.device(device)
    if backend not in _logged_backends:
        _logged_backends.add(backend)
        reason = ""
        if backend == "torch" and _forced_backend is None:
            if device.type == "cuda":
                reason = f" (mamba-ssm unavailable: {_cuda_import_error})"
            elif device.type == "cpu" and not _numba_available():
                reason = " (numba unavailable)"
        logger.info("selective scan backend: %s on %s%s", backend, device.type, reason)
    if backend == "numba":
        torch.set_flush_denormal(True)


_BACKENDS: dict[str, Callable[..., torch.Tensor]] = {
    "cuda": selective_scan_cuda,
    "numba": selective_scan_numba,
    "numba-autograd": selective_scan_numba_autograd,
    "torch": selective_scan_chunked,
}


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
) -> torch.Tensor:
    """Selective scan with the best available backend (see the module docstring).

    CUDA tensors use mamba-ssm when it is installed; CPU tensors use the Numba kernels
    when numba is installed (``"numba"`` when no gradient is needed, ``"numba-autograd"``
    otherwise); everything else uses the PyTorch chunked scan (``"torch"``). Each backend
    is logged once per process. Arguments and result as :func:`selective_scan_reference`.
    """
    tensors = [t for t in (u, delta, A, B, C, D, delta_bias) if t is not None]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    backend = choose_backend(u.device, needs_grad)
    log_backend(backend, u.device)
    return _BACKENDS[backend](u, delta, A, B, C, D, delta_bias, delta_softplus)

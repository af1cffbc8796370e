"""Numba kernels of the selective scan (CPU, float32).

Imported lazily by :mod:`models.scan` so that ``import models`` does not pull numba in.
See :mod:`models.scan` for the recurrence. Two sets of kernels live here:

- :func:`scan_jobs`, the forward-only inference kernel (backend ``"numba"``), described
  below;
- :func:`scan_forward_with_states` and :func:`scan_adjoint`, the plain sequential
  forward and adjoint-backward pair behind the autograd backend ``"numba-autograd"``
  (CPU training), described at their definitions.

One inference kernel, :func:`scan_jobs`, serves both callers:

- the generic scan with mamba-ssm's shapes (every group has its own input channels and
  output channels, time runs in storage order);
- VM-UNet's four-direction scan (SS2D), where the four directions share the input
  channels, walk the same feature map in different orders (``positions``) and their
  outputs are summed into one map. Reading and writing through the position tables
  replaces the stacked, transposed and flipped copies of the feature map.

Tensors are channel-last so that the channels of one position are contiguous. A job
owns a block of ``CHANNEL_BLOCK`` channels of one batch element; the kernel releases the
GIL and :mod:`models.scan` runs disjoint job ranges on a small thread pool (numba's own
OpenMP pool would be a second spinning OpenMP runtime beside PyTorch's). Time runs
sequentially in tiles of ``TIME_TILE`` steps gathered into small buffers, so that the
innermost loop runs over the channels of the block with unit stride and a compile-time
trip count (SIMD code). Softplus and the decays ``exp(dt * A)`` use vectorisable
exponential/logarithm approximations (``math.exp`` is one scalar call per element).
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

CHANNEL_BLOCK = 96  # channels per job, the SIMD dimension (several vectors: independent chains)
TIME_TILE = 64  # steps transposed at once

# float32 constants keep numba's arithmetic in float32 (a Python float literal would
# promote it to float64 and halve the SIMD width).
LOG2_E = np.float32(1.4426950408889634)
MIN_EXPONENT = np.float32(-126.0)  # 2**-126, the smallest normal float32, is the smallest decay
HALF = np.float32(0.5)
ONE = np.float32(1.0)
# 2**f on [-1/2, 1/2]: degree-5 near-minimax polynomial for the relative error (Lawson
# iterations on Chebyshev nodes): 7.5e-8 in exact arithmetic, 2.3e-7 evaluated in float32.
EXP2_C0 = np.float32(1.0000000716546722)
EXP2_C1 = np.float32(0.6931469670643623)
EXP2_C2 = np.float32(0.2402211972388197)
EXP2_C3 = np.float32(0.055507132741499446)
EXP2_C4 = np.float32(0.009675541332764392)
EXP2_C5 = np.float32(0.0013276471781736617)
ZERO = np.float32(0.0)
TWO = np.float32(2.0)
LOG_C3 = np.float32(1.0 / 3.0)  # 2 atanh(s) = 2 (s + s**3/3 + s**5/5 + ...)
LOG_C5 = np.float32(1.0 / 5.0)
LOG_C7 = np.float32(1.0 / 7.0)
LOG_C9 = np.float32(1.0 / 9.0)
LOG_C11 = np.float32(1.0 / 11.0)
FLOAT32_EXPONENT_BIAS = np.int32(127)
FLOAT32_MANTISSA_BITS = np.int32(23)


@intrinsic
def _float32_from_bits(typingctx, bits):
    """Reinterpret the bits of an int32 as a float32 (an LLVM ``bitcast``)."""
    if bits != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@numba.njit(fastmath=True, error_model="numpy", inline="always")
def _exp2_nonpositive(z: np.float32) -> np.float32:
    """``2**z`` for ``z <= 0`` (clamped at -126): ``2**round(z)`` written into the exponent
    bits times a polynomial for ``2**f``, ``f = z - round(z)`` in [-1/2, 1/2] (relative
    error below 3e-7)."""
    z = max(z, MIN_EXPONENT)
    rounded = np.floor(z + HALF)
    f = z - rounded
    mantissa = EXP2_C0 + f * (EXP2_C1 + f * (EXP2_C2 + f * (EXP2_C3 + f * (EXP2_C4 + f * EXP2_C5))))
    power_of_two = _float32_from_bits(np.int32((np.int32(rounded) + FLOAT32_EXPONENT_BIAS) << FLOAT32_MANTISSA_BITS))
    return mantissa * power_of_two


@numba.njit(fastmath=True, error_model="numpy", inline="always")
def _softplus(x: np.float32) -> np.float32:
    """``log(1 + exp(x))`` as ``max(x, 0) + log1p(exp(-|x|))``; log1p(y), y in (0, 1], from
    ``2 atanh(s)``, ``s = y / (2 + y) <= 1/3``, series to s**11 (error below 1e-7)."""
    y = _exp2_nonpositive(-abs(x) * LOG2_E)
    s = y / (TWO + y)
    s2 = s * s
    series = ONE + s2 * (LOG_C3 + s2 * (LOG_C5 + s2 * (LOG_C7 + s2 * (LOG_C9 + s2 * LOG_C11))))
    return max(x, ZERO) + TWO * s * series


@numba.njit(fastmath=True, error_model="numpy", cache=True, nogil=True)
def _scan_block(
    width: int,
    u: np.ndarray,
    u_first: int,
    dt: np.ndarray,
    dt_first: int,
    dt_weight_t: np.ndarray,
    a_log2: np.ndarray,
    dt_bias: np.ndarray,
    skip: np.ndarray,
    B_rows: np.ndarray,
    C_rows: np.ndarray,
    positions: np.ndarray,
    delta_softplus: bool,
    out: np.ndarray,
    out_first: int,
) -> None:
    """Scan one block of up to ``CHANNEL_BLOCK`` channels along one direction; add to ``out``.

    Args:
        width: Channels in the block (<= CHANNEL_BLOCK).
        u: Inputs of this batch element [L, channels], channel-last.
        u_first: First input channel of the block.
        dt: Raw step sizes of this batch element and direction [L, channels_of_direction],
            or their low-rank factors [L, R] when ``dt_weight_t`` has R > 0 rows.
        dt_first: First channel of the block in ``dt`` (unused with low-rank factors).
        dt_weight_t: [R, CHANNEL_BLOCK] up-projection of low-rank ``dt`` for the block
            (padded lanes 0), or [0, CHANNEL_BLOCK] when ``dt`` holds the step sizes.
        a_log2: ``A * log2(e)`` of the block [n, CHANNEL_BLOCK] (padded lanes 0).
        dt_bias: Step bias of the block [CHANNEL_BLOCK] (padded lanes 0).
        skip: D of the block [CHANNEL_BLOCK] (padded lanes 0).
        B_rows: Input projection rows [L, n] (position-major).
        C_rows: Output projection rows [L, n].
        positions: Position of every time step [L].
        delta_softplus: Apply softplus to ``dt + dt_bias``.
        out: Output of this batch element [L, out_channels]; the block's result is added.
        out_first: First output channel of the block.
    """
    length = positions.shape[0]
    state_size = a_log2.shape[0]
    rank = dt_weight_t.shape[0]
    state = np.zeros((state_size, CHANNEL_BLOCK), dtype=np.float32)
    dt_tile = np.zeros((TIME_TILE, CHANNEL_BLOCK), dtype=np.float32)
    u_tile = np.zeros((TIME_TILE, CHANNEL_BLOCK), dtype=np.float32)
    drive_tile = np.zeros((TIME_TILE, CHANNEL_BLOCK), dtype=np.float32)  # dt * u
    y_tile = np.zeros((TIME_TILE, CHANNEL_BLOCK), dtype=np.float32)
    y = np.zeros(CHANNEL_BLOCK, dtype=np.float32)
    for start in range(0, length, TIME_TILE):
        steps = min(TIME_TILE, length - start)
        for i in range(steps):
            position = positions[start + i]
            for c in range(width):
                u_tile[i, c] = u[position, u_first + c]
            if rank > 0:
                for c in range(CHANNEL_BLOCK):
                    dt_tile[i, c] = 0.0
                for r in range(rank):
                    factor = dt[position, r]
                    weights = dt_weight_t[r]
                    for c in range(CHANNEL_BLOCK):
                        dt_tile[i, c] += weights[c] * factor
            else:
                for c in range(width):
                    dt_tile[i, c] = dt[position, dt_first + c]
        if delta_softplus:
            for i in range(steps):
                for c in range(CHANNEL_BLOCK):
                    dt_tile[i, c] = _softplus(dt_tile[i, c] + dt_bias[c])
        else:
            for i in range(steps):
                for c in range(CHANNEL_BLOCK):
                    dt_tile[i, c] = dt_tile[i, c] + dt_bias[c]
        for i in range(steps):
            for c in range(CHANNEL_BLOCK):
                drive_tile[i, c] = dt_tile[i, c] * u_tile[i, c]
        if width < CHANNEL_BLOCK:  # padded lanes must not move: dt = 0 keeps their state at 0
            for i in range(steps):
                for c in range(width, CHANNEL_BLOCK):
                    dt_tile[i, c] = 0.0
                    drive_tile[i, c] = 0.0
        for i in range(steps):
            position = positions[start + i]
            dt_step = dt_tile[i]
            drive_step = drive_tile[i]
            b_step = B_rows[position]
            c_step = C_rows[position]
            y[:] = 0.0
            for n in range(state_size):
                b_value = b_step[n]
                c_value = c_step[n]
                a_n = a_log2[n]
                state_n = state[n]
                for c in range(CHANNEL_BLOCK):
                    decay = _exp2_nonpositive(dt_step[c] * a_n[c])
                    state_n[c] = decay * state_n[c] + drive_step[c] * b_value
                    y[c] += state_n[c] * c_value
            for c in range(CHANNEL_BLOCK):
                y_tile[i, c] = y[c] + skip[c] * u_tile[i, c]
        for i in range(steps):
            position = positions[start + i]
            for c in range(width):
                out[position, out_first + c] += y_tile[i, c]


def count_jobs(batch: int, channels_per_group: int) -> int:
    """Number of independent jobs (batch element x channel block) of :func:`scan_jobs`."""
    return batch * ((channels_per_group + CHANNEL_BLOCK - 1) // CHANNEL_BLOCK)


@numba.njit(fastmath=True, error_model="numpy", cache=True, nogil=True)
def scan_jobs(
    u: np.ndarray,
    dt: np.ndarray,
    dt_weight: np.ndarray,
    A: np.ndarray,
    B_rows: np.ndarray,
    C_rows: np.ndarray,
    D: np.ndarray,
    dt_bias: np.ndarray,
    positions: np.ndarray,
    shared_input: bool,
    summed_output: bool,
    delta_softplus: bool,
    out: np.ndarray,
    first_job: int,
    stop_job: int,
) -> None:
    """Selective scan of ``G`` directions (groups) for jobs ``first_job .. stop_job - 1``.

    A job is one batch element and one block of ``CHANNEL_BLOCK`` channels, all
    directions; jobs write disjoint parts of ``out``, so that threads may run disjoint job
    ranges at the same time (the GIL is released).

    Args:
        u: Inputs [b, L, Du] float32 (``Du = Dg`` if ``shared_input`` else ``G * Dg``).
        dt: Raw step sizes [G, b, L, Dg] float32 (before bias and softplus), or their
            low-rank factors [G, b, L, R] (SS2D's ``dt_low_rank``).
        dt_weight: [G, Dg, R] up-projection of low-rank ``dt`` (``dt @ dt_weight[g].T``,
            done in the kernel instead of a separate [G, b, L, Dg] tensor), or [G, Dg, 0]
            when ``dt`` holds the step sizes.
        A: State matrices [G, Dg, n] float32 (entries < 0).
        B_rows: Input projection [G, b, L, n] float32.
        C_rows: Output projection [G, b, L, n] float32.
        D: Skip weights [G, Dg] float32.
        dt_bias: Step bias [G, Dg] float32.
        positions: int64 [G, L]: storage position of time step t of direction g.
        shared_input: All directions read input channels 0..Dg (SS2D); otherwise group
            g reads channels g*Dg .. (g+1)*Dg (mamba-ssm's grouped layout).
        summed_output: Sum the directions into Dg output channels (SS2D); otherwise group
            g writes channels g*Dg .. (g+1)*Dg.
        delta_softplus: Apply softplus to ``dt + dt_bias``.
        out: Zero-initialised outputs [b, L, Dg if summed_output else G*Dg] float32
            (channel-last, storage order), accumulated in place.
        first_job: First job to run.
        stop_job: One past the last job to run.
    """
    groups, channels_per_group, rank = dt_weight.shape
    state_size = A.shape[2]
    blocks = (channels_per_group + CHANNEL_BLOCK - 1) // CHANNEL_BLOCK
    a_log2 = np.zeros((state_size, CHANNEL_BLOCK), dtype=np.float32)
    bias = np.zeros(CHANNEL_BLOCK, dtype=np.float32)
    skip = np.zeros(CHANNEL_BLOCK, dtype=np.float32)
    dt_weight_t = np.zeros((rank, CHANNEL_BLOCK), dtype=np.float32)
    for job in range(first_job, stop_job):
        b = job // blocks
        first = (job % blocks) * CHANNEL_BLOCK
        width = min(CHANNEL_BLOCK, channels_per_group - first)
        for g in range(groups):
            for c in range(width):
                bias[c] = dt_bias[g, first + c]
                skip[c] = D[g, first + c]
                for n in range(state_size):
                    a_log2[n, c] = A[g, first + c, n] * LOG2_E
                for r in range(rank):
                    dt_weight_t[r, c] = dt_weight[g, first + c, r]
            for c in range(width, CHANNEL_BLOCK):  # padded lanes
                bias[c] = 0.0
                skip[c] = 0.0
                for n in range(state_size):
                    a_log2[n, c] = 0.0
                for r in range(rank):
                    dt_weight_t[r, c] = 0.0
            _scan_block(
                width,
                u[b],
                first if shared_input else g * channels_per_group + first,
                dt[g, b],
                first,
                dt_weight_t,
                a_log2,
                bias,
                skip,
                B_rows[g, b],
                C_rows[g, b],
                positions[g],
                delta_softplus,
                out[b],
                first if summed_output else g * channels_per_group + first,
            )


# --------------------------------------------------------------------------- training kernels
# The autograd backend "numba-autograd" of models.scan: a sequential forward that keeps every
# state and the adjoint recurrence run backwards in time. O(L * n) work per channel (the
# chunked PyTorch scan needs O(L * T * n) and a lot of memory traffic), exact exponentials,
# no approximations. Step sizes arrive already biased and softplus'ed, and the skip term
# D * u is added outside (PyTorch autograd differentiates those parts).


@numba.njit(cache=True, nogil=True)
def scan_forward_with_states(
    u: np.ndarray, dt: np.ndarray, A: np.ndarray, B: np.ndarray, C: np.ndarray, states: np.ndarray
) -> np.ndarray:
    """Sequential forward scan that records the states.

    Args:
        u: Inputs [b, d, l] float32.
        dt: Step sizes [b, d, l] float32 (after bias and softplus).
        A: State matrix [d, n] float32 (entries < 0).
        B: Input projection [b, k, l, n] float32 (state-last).
        C: Output projection [b, k, l, n] float32.
        states: [b, d, l, n] float32, filled with ``h[t]`` (needed by :func:`scan_adjoint`).

    Returns:
        ``y[t] = <C[t], h[t]>`` [b, d, l] float32 (without the skip term).
    """
    batch, channels, length = u.shape
    size = A.shape[1]
    per_group = channels // B.shape[1]
    y = np.zeros((batch, channels, length), np.float32)
    h = np.zeros(size, np.float32)
    for b in range(batch):
        for d in range(channels):
            k = d // per_group
            h[:] = 0.0
            for t in range(length):
                step, value = dt[b, d, t], u[b, d, t]
                total = np.float32(0.0)
                for j in range(size):
                    h[j] = np.exp(step * A[d, j]) * h[j] + step * B[b, k, t, j] * value
                    states[b, d, t, j] = h[j]
                    total += C[b, k, t, j] * h[j]
                y[b, d, t] = total
    return y


@numba.njit(cache=True, nogil=True)
def scan_adjoint(
    u: np.ndarray,
    dt: np.ndarray,
    A: np.ndarray,
    B: np.ndarray,
    C: np.ndarray,
    states: np.ndarray,
    grad_y: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of :func:`scan_forward_with_states` by the adjoint recurrence (time reversed).

    ``g_h[t] = C[t] * g_y[t] + exp(dt[t+1] A) * g_h[t+1]``; every decay is ``<= 1``, so
    the adjoint state cannot overflow either.

    Args:
        u, dt, A, B, C, states: As given to and filled by :func:`scan_forward_with_states`.
        grad_y: Gradient of the loss with respect to ``y`` [b, d, l] float32.

    Returns:
        Gradients with respect to ``u``, ``dt``, ``A``, ``B`` and ``C`` (their shapes).
    """
    batch, channels, length = u.shape
    size = A.shape[1]
    per_group = channels // B.shape[1]
    grad_u = np.zeros_like(u)
    grad_dt = np.zeros_like(dt)
    grad_A = np.zeros_like(A)
    grad_B = np.zeros_like(B)
    grad_C = np.zeros_like(C)
    grad_h = np.zeros(size, np.float32)
    for b in range(batch):
        for d in range(channels):
            k = d // per_group
            grad_h[:] = 0.0
            for t in range(length - 1, -1, -1):
                g, step, value = grad_y[b, d, t], dt[b, d, t], u[b, d, t]
                step_total = np.float32(0.0)
                input_total = np.float32(0.0)
                for j in range(size):
                    decay = np.exp(step * A[d, j])
                    grad_h[j] += g * C[b, k, t, j]
                    grad_C[b, k, t, j] += g * states[b, d, t, j]
                    previous = states[b, d, t - 1, j] if t > 0 else np.float32(0.0)
                    grad_decay = grad_h[j] * previous * decay
                    step_total += grad_decay * A[d, j] + grad_h[j] * B[b, k, t, j] * value
                    grad_A[d, j] += grad_decay * step
                    grad_B[b, k, t, j] += grad_h[j] * step * value
                    input_total += grad_h[j] * step * B[b, k, t, j]
                    grad_h[j] *= decay
                grad_u[b, d, t] = input_total
                grad_dt[b, d, t] = step_total
    return grad_u, grad_dt, grad_A, grad_B, grad_C

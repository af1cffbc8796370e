"""Numba kernels of the selective scan (CPU, float32).

Imported lazily by :mod:`models.scan` so that ``import models`` does not pull numba in.
See :mod:`models.scan` for the recurrence. Two sets of kernels live here:

- the forward-only inference kernels (backend ``"numba"``), described below;
- :func:`scan_forward_with_states` and :func:`scan_adjoint`, the plain sequential
  forward and adjoint-backward pair behind the autograd backend ``"numba-autograd"``
  (CPU training), described at their definitions.

Inference kernels. One block routine, :func:`_scan_block`, serves two entry points:

- :data:`generic_scan_entry`: the scan with mamba-ssm's shapes (every group has its own
  input and output channels, time runs in storage order);
- :data:`ss2d_scan_entry`: VM-UNet's four-direction scan (SS2D). The four directions
  share the input channels, walk the same feature map in different orders (a table of
  positions) and their outputs are summed into one map; the low-rank step sizes and the
  B and C rows are read where the x-projection matmul left them (``[b, L, 4, R + 2N]``),
  so no stacked, transposed, flipped or sliced copies are made.
  :data:`ss2d_gate_entry` then applies SS2D's output LayerNorm and SiLU(z) gate to the
  summed map in place, one pass over memory.

Tensors are channel-last so that the channels of one position are contiguous. A scan job
owns a block of ``CHANNEL_BLOCK`` channels of one batch element (all directions); a gate
job owns ``GATE_ROWS`` positions. The entries are C callbacks (``numba.cfunc``) that take
one int64 argument block (a job counter, the job count, sizes and array addresses) and
claim jobs with an atomic counter until none is left, so :mod:`models.scan` can run them on
PyTorch's own OpenMP threads (``GOMP_parallel``): a second thread pool would compete for the
cores with the OpenMP threads that spin after every PyTorch operator. Time runs
sequentially in tiles of ``TIME_TILE`` steps gathered into small buffers, so that the
innermost loop runs over the channels of the block with unit stride and a compile-time
trip count (SIMD code). Softplus, the decays ``exp(dt * A)`` and the gate's sigmoid use
vectorisable exponential/logarithm approximations (``math.exp`` is one scalar call per
element).
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

CHANNEL_BLOCK = 96  # channels per scan job, the SIMD dimension (several vectors: independent chains)
TIME_TILE = 64  # steps transposed at once
GATE_ROWS = 32  # positions per gate job

# Argument blocks of the entries (int64): the job counter and the job count come first.
COUNTER, JOBS = 0, 1
(
    SS2D_BATCH,
    SS2D_LENGTH,
    SS2D_CHANNELS,
    SS2D_RANK,
    SS2D_STATES,
    SS2D_SOFTPLUS,
    SS2D_X,
    SS2D_PROJECTIONS,
    SS2D_DT_WEIGHT,
    SS2D_A,
    SS2D_D,
    SS2D_DT_BIAS,
    SS2D_POSITIONS,
    SS2D_OUT,
) = range(2, 16)
SS2D_BLOCK_SIZE = 16
(
    GENERIC_GROUPS,
    GENERIC_BATCH,
    GENERIC_LENGTH,
    GENERIC_CHANNELS,
    GENERIC_STATES,
    GENERIC_SOFTPLUS,
    GENERIC_U,
    GENERIC_DT,
    GENERIC_A,
    GENERIC_B,
    GENERIC_C,
    GENERIC_D,
    GENERIC_DT_BIAS,
    GENERIC_OUT,
) = range(2, 16)
GENERIC_BLOCK_SIZE = 16
GATE_ROWS_TOTAL, GATE_CHANNELS, GATE_OUT, GATE_Z, GATE_PARAMETERS = range(2, 7)
GATE_BLOCK_SIZE = 7

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
ENTRY_SIGNATURE = types.void(types.CPointer(types.int64))


@intrinsic
def _float32_from_bits(typingctx, bits):
    """Reinterpret the bits of an int32 as a float32 (an LLVM ``bitcast``)."""
    if bits != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


def _pointer_from_address(element_type: types.Type):
    """An intrinsic turning an int64 address into a pointer to ``element_type`` (``inttoptr``)."""

    @intrinsic
    def pointer(typingctx, address):
        if address != types.int64:
            return None
        pointer_type = types.CPointer(element_type)

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(pointer_type))

        return pointer_type(types.int64), codegen

    return pointer


_float32_pointer = _pointer_from_address(types.float32)
_int64_pointer = _pointer_from_address(types.int64)


@intrinsic
def _claim_job(typingctx, counter):
    """Atomically increment the int64 job counter at ``counter``; return its previous value."""
    if counter != types.CPointer(types.int64):
        return None

    def codegen(context, builder, signature, args):
        return builder.atomic_rmw("add", args[0], ir.Constant(ir.IntType(64), 1), "monotonic")

    return types.int64(counter), codegen


@numba.njit(inline="always")
def _float32_array(address: int, shape: tuple) -> np.ndarray:
    """C-contiguous float32 array of ``shape`` at ``address``."""
    return numba.carray(_float32_pointer(address), shape)


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
    accumulate: bool,
) -> None:
    """Scan one block of up to ``CHANNEL_BLOCK`` channels along one direction; write or add to ``out``.

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
        out: Output of this batch element [L, out_channels].
        out_first: First output channel of the block.
        accumulate: Add the block's result to ``out`` (else overwrite: the first direction).
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
            if rank > 0:  # four ranks per pass over the tile row: fewer loads and stores of it
                steps_row = dt_tile[i]
                for c in range(CHANNEL_BLOCK):
                    steps_row[c] = 0.0
                for r in range(0, rank - 3, 4):
                    f0, f1, f2, f3 = dt[position, r], dt[position, r + 1], dt[position, r + 2], dt[position, r + 3]
                    w0, w1, w2, w3 = dt_weight_t[r], dt_weight_t[r + 1], dt_weight_t[r + 2], dt_weight_t[r + 3]
                    for c in range(CHANNEL_BLOCK):
                        steps_row[c] += w0[c] * f0 + w1[c] * f1 + w2[c] * f2 + w3[c] * f3
                for r in range(rank - rank % 4, rank):
                    factor = dt[position, r]
                    weights = dt_weight_t[r]
                    for c in range(CHANNEL_BLOCK):
                        steps_row[c] += weights[c] * factor
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
            if accumulate:
                for c in range(width):
                    out[position, out_first + c] += y_tile[i, c]
            else:
                for c in range(width):
                    out[position, out_first + c] = y_tile[i, c]



@numba.njit(fastmath=True, error_model="numpy", cache=True, nogil=True)
def _load_block_parameters(
    group: int,
    first: int,
    width: int,
    A: np.ndarray,
    D: np.ndarray,
    dt_bias: np.ndarray,
    dt_weight: np.ndarray,
    a_log2: np.ndarray,
    bias: np.ndarray,
    skip: np.ndarray,
    dt_weight_t: np.ndarray,
) -> None:
    """Fill the lane buffers of :func:`_scan_block` for channels ``first .. first + width``
    of ``group`` (padded lanes 0).

    Args:
        group: Direction (group) index.
        first: First channel of the block.
        width: Channels in the block.
        A: State matrices [G, Dg, n]; D: skip weights [G, Dg]; dt_bias: [G, Dg];
            dt_weight: low-rank dt up-projection [G, Dg, R] (R may be 0).
        a_log2, bias, skip, dt_weight_t: The buffers [n, CB], [CB], [CB], [R, CB] to fill.
    """
    state_size = A.shape[2]
    rank = dt_weight.shape[2]
    for c in range(CHANNEL_BLOCK):
        inside = c < width
        bias[c] = dt_bias[group, first + c] if inside else ZERO
        skip[c] = D[group, first + c] if inside else ZERO
        for n in range(state_size):
            a_log2[n, c] = A[group, first + c, n] * LOG2_E if inside else ZERO
        for r in range(rank):
            dt_weight_t[r, c] = dt_weight[group, first + c, r] if inside else ZERO


@numba.njit(fastmath=True, error_model="numpy", cache=True, nogil=True)
def _ss2d_job(
    job: int,
    x: np.ndarray,
    projections: np.ndarray,
    dt_weight: np.ndarray,
    A: np.ndarray,
    D: np.ndarray,
    dt_bias: np.ndarray,
    positions: np.ndarray,
    delta_softplus: bool,
    out: np.ndarray,
) -> None:
    """One SS2D scan job: the four directions of one channel block of one batch element.

    Args:
        job: ``batch_index * blocks + block_index``.
        x: Inputs [b, L, d], channel-last, row-major positions.
        projections: x-projections [b, L, 4, R + 2n]: low-rank dt, B and C per direction.
        dt_weight: dt up-projections [4, d, R].
        A: State matrices [4, d, n]; D: skip weights [4, d]; dt_bias: step bias [4, d].
        positions: int64 [4, L], storage position of time step t of direction g.
        delta_softplus: Apply softplus to ``dt + dt_bias``.
        out: Sum of the four directions [b, L, d] (the first direction overwrites it).
    """
    directions, channels, rank = dt_weight.shape
    state_size = A.shape[2]
    blocks = (channels + CHANNEL_BLOCK - 1) // CHANNEL_BLOCK
    b = job // blocks
    first = (job % blocks) * CHANNEL_BLOCK
    width = min(CHANNEL_BLOCK, channels - first)
    a_log2 = np.empty((state_size, CHANNEL_BLOCK), dtype=np.float32)
    bias = np.empty(CHANNEL_BLOCK, dtype=np.float32)
    skip = np.empty(CHANNEL_BLOCK, dtype=np.float32)
    dt_weight_t = np.empty((rank, CHANNEL_BLOCK), dtype=np.float32)
    for g in range(directions):
        _load_block_parameters(g, first, width, A, D, dt_bias, dt_weight, a_log2, bias, skip, dt_weight_t)
        direction = projections[b, :, g]
        _scan_block(
            width,
            x[b],
            first,
            direction[:, :rank],
            0,
            dt_weight_t,
            a_log2,
            bias,
            skip,
            direction[:, rank : rank + state_size],
            direction[:, rank + state_size :],
            positions[g],
            delta_softplus,
            out[b],
            first,
            g > 0,
        )


@numba.cfunc(ENTRY_SIGNATURE, cache=True, nopython=True)
def ss2d_scan_entry(block):
    """Run SS2D scan jobs (:func:`_ss2d_job`) until none is left; argument block ``SS2D_*``."""
    batch, length, channels = block[SS2D_BATCH], block[SS2D_LENGTH], block[SS2D_CHANNELS]
    rank, state_size = block[SS2D_RANK], block[SS2D_STATES]
    x = _float32_array(block[SS2D_X], (batch, length, channels))
    projections = _float32_array(block[SS2D_PROJECTIONS], (batch, length, 4, rank + 2 * state_size))
    dt_weight = _float32_array(block[SS2D_DT_WEIGHT], (4, channels, rank))
    A = _float32_array(block[SS2D_A], (4, channels, state_size))
    D = _float32_array(block[SS2D_D], (4, channels))
    dt_bias = _float32_array(block[SS2D_DT_BIAS], (4, channels))
    positions = numba.carray(_int64_pointer(block[SS2D_POSITIONS]), (4, length))
    out = _float32_array(block[SS2D_OUT], (batch, length, channels))
    job = _claim_job(block)
    while job < block[JOBS]:
        _ss2d_job(job, x, projections, dt_weight, A, D, dt_bias, positions, block[SS2D_SOFTPLUS] != 0, out)
        job = _claim_job(block)


@numba.njit(fastmath=True, error_model="numpy", cache=True, nogil=True)
def _generic_job(
    job: int,
    u: np.ndarray,
    dt: np.ndarray,
    A: np.ndarray,
    B_rows: np.ndarray,
    C_rows: np.ndarray,
    D: np.ndarray,
    dt_bias: np.ndarray,
    delta_softplus: bool,
    out: np.ndarray,
) -> None:
    """One scan job in mamba-ssm's layout: one channel block of one batch element, all groups.

    Args:
        job: ``batch_index * blocks + block_index``.
        u: Inputs [b, L, G * Dg], channel-last; group g reads channels g*Dg .. (g+1)*Dg.
        dt: Raw step sizes [G, b, L, Dg].
        A: State matrices [G, Dg, n]; D: skip weights [G, Dg]; dt_bias: step bias [G, Dg].
        B_rows, C_rows: Input and output projections [G, b, L, n].
        delta_softplus: Apply softplus to ``dt + dt_bias``.
        out: Outputs [b, L, G * Dg] (channel-last), written by group like ``u``.
    """
    groups, channels, state_size = A.shape
    blocks = (channels + CHANNEL_BLOCK - 1) // CHANNEL_BLOCK
    b = job // blocks
    first = (job % blocks) * CHANNEL_BLOCK
    width = min(CHANNEL_BLOCK, channels - first)
    a_log2 = np.empty((state_size, CHANNEL_BLOCK), dtype=np.float32)
    bias = np.empty(CHANNEL_BLOCK, dtype=np.float32)
    skip = np.empty(CHANNEL_BLOCK, dtype=np.float32)
    no_weight = np.zeros((groups, channels, 0), dtype=np.float32)
    dt_weight_t = np.empty((0, CHANNEL_BLOCK), dtype=np.float32)
    positions = np.arange(u.shape[1])
    for g in range(groups):
        _load_block_parameters(g, first, width, A, D, dt_bias, no_weight, a_log2, bias, skip, dt_weight_t)
        _scan_block(
            width,
            u[b],
            g * channels + first,
            dt[g, b],
            first,
            dt_weight_t,
            a_log2,
            bias,
            skip,
            B_rows[g, b],
            C_rows[g, b],
            positions,
            delta_softplus,
            out[b],
            g * channels + first,
            False,
        )


@numba.cfunc(ENTRY_SIGNATURE, cache=True, nopython=True)
def generic_scan_entry(block):
    """Run mamba-ssm-layout scan jobs (:func:`_generic_job`) until none is left; block ``GENERIC_*``."""
    groups, batch, length = block[GENERIC_GROUPS], block[GENERIC_BATCH], block[GENERIC_LENGTH]
    channels, state_size = block[GENERIC_CHANNELS], block[GENERIC_STATES]
    u = _float32_array(block[GENERIC_U], (batch, length, groups * channels))
    dt = _float32_array(block[GENERIC_DT], (groups, batch, length, channels))
    A = _float32_array(block[GENERIC_A], (groups, channels, state_size))
    B_rows = _float32_array(block[GENERIC_B], (groups, batch, length, state_size))
    C_rows = _float32_array(block[GENERIC_C], (groups, batch, length, state_size))
    D = _float32_array(block[GENERIC_D], (groups, channels))
    dt_bias = _float32_array(block[GENERIC_DT_BIAS], (groups, channels))
    out = _float32_array(block[GENERIC_OUT], (batch, length, groups * channels))
    job = _claim_job(block)
    while job < block[JOBS]:
        _generic_job(job, u, dt, A, B_rows, C_rows, D, dt_bias, block[GENERIC_SOFTPLUS] != 0, out)
        job = _claim_job(block)


def count_scan_jobs(batch: int, channels_per_group: int) -> int:
    """Number of scan jobs (batch element x channel block)."""
    return batch * ((channels_per_group + CHANNEL_BLOCK - 1) // CHANNEL_BLOCK)


def count_gate_jobs(rows: int) -> int:
    """Number of gate jobs over ``rows`` positions."""
    return (rows + GATE_ROWS - 1) // GATE_ROWS


@numba.njit(fastmath=True, error_model="numpy", cache=True, nogil=True)
def _gate_job(job: int, out: np.ndarray, z: np.ndarray, parameters: np.ndarray) -> None:
    """SS2D's output gate for ``GATE_ROWS`` positions, in place:
    ``out = LayerNorm(out) * SiLU(z)``.

    Args:
        job: Index of the block of positions.
        out: Summed scan outputs [rows, d], overwritten.
        z: Gate inputs [rows, d].
        parameters: [3, d]: LayerNorm weight, LayerNorm bias, and ``eps`` in ``[2, 0]``.
    """
    channels = out.shape[1]
    weight, bias, eps = parameters[0], parameters[1], parameters[2, 0]
    inverse_channels = ONE / np.float32(channels)
    for row in range(job * GATE_ROWS, min((job + 1) * GATE_ROWS, out.shape[0])):
        values, gates = out[row], z[row]
        total = ZERO
        for c in range(channels):
            total += values[c]
        mean = total * inverse_channels
        squares = ZERO
        for c in range(channels):
            centred = values[c] - mean
            squares += centred * centred
        scale = ONE / np.sqrt(squares * inverse_channels + eps)
        for c in range(channels):
            gate = gates[c]
            decay = _exp2_nonpositive(-abs(gate) * LOG2_E)  # exp(-|z|)
            sigmoid = (ONE if gate >= ZERO else decay) / (ONE + decay)
            values[c] = ((values[c] - mean) * scale * weight[c] + bias[c]) * gate * sigmoid


@numba.cfunc(ENTRY_SIGNATURE, cache=True, nopython=True)
def ss2d_gate_entry(block):
    """Run gate jobs (:func:`_gate_job`) until none is left; argument block ``GATE_*``."""
    rows, channels = block[GATE_ROWS_TOTAL], block[GATE_CHANNELS]
    out = _float32_array(block[GATE_OUT], (rows, channels))
    z = _float32_array(block[GATE_Z], (rows, channels))
    parameters = _float32_array(block[GATE_PARAMETERS], (3, channels))
    job = _claim_job(block)
    while job < block[JOBS]:
        _gate_job(job, out, z, parameters)
        job = _claim_job(block)


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

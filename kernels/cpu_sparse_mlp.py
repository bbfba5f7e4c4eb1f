"""CPU sparse MLP for batch-1 decoding: reads only the packed rows of active neurons.

A decoding step on a CPU is bound by weight reads (a dense MLP of SmolLM2-135M streams
10.6 MB per layer per token), so skipping the rows of inactive neurons is where the time
goes. torch has no fused gather-GEMV on the CPU (`index_select` + `mv` copies the rows and
measured no faster than dense here; `embedding_bag` does not fuse the gate/up dots), so the
kernel is compiled with numba: one pass over the active neurons, each thread accumulating
its share of the output in its own row, summed at the end. Semantics: `reference.py`.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import torch

from dyninfer.kernels.reference import ACTIVATIONS

_ACT_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}
_kernels = None


def cpu_kernel_available() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def _compile():
    """Build the numba kernels on first use (import of numba costs ~0.5 s)."""
    global _kernels
    if _kernels is not None:
        return _kernels
    import numba

    helpers = _inline_helpers()
    fused = _fused_kernel(helpers)
    rows_axpy = _rows_axpy_kernel(helpers)
    select_above = _select_above_kernel()
    rows_axpy_above = _rows_axpy_above_kernel(select_above, rows_axpy)
    predicted = _predicted_kernel(helpers, select_above, fused)
    _kernels = SimpleNamespace(numba=numba, fused=fused, rows_axpy=rows_axpy, rows_axpy_above=rows_axpy_above, predicted=predicted)
    return _kernels


# Each kernel is built by its own factory; the jitted functions it calls reach it as closure
# variables, which numba compiles in as constants (as when they were all defined in one function).


def _inline_helpers() -> SimpleNamespace:
    """The building blocks the kernels share, inlined into them: activation, dot, axpy4, reduce_rows."""
    from numba import njit

    @njit(inline="always", fastmath=True)
    def activate(code, value):
        if code == 0:  # silu
            return value / (np.float32(1.0) + math.exp(-value))
        if code == 1:  # gelu, tanh approximation
            inner = np.float32(0.7978845608028654) * (value + np.float32(0.044715) * value * value * value)
            return np.float32(0.5) * value * (np.float32(1.0) + math.tanh(inner))
        if code == 2:  # gelu, erf
            return np.float32(0.5) * value * (np.float32(1.0) + math.erf(value * np.float32(0.7071067811865476)))
        return max(value, np.float32(0.0))  # relu

    @njit(inline="always", fastmath=True)
    def reduce_rows(partial, out):
        out[:] = partial[0]
        for t in range(1, partial.shape[0]):
            out += partial[t]

    @njit(inline="always", fastmath=True)
    def dot(a, b):
        total = np.float32(0.0)
        for c in range(a.shape[0]):
            total += a[c] * b[c]
        return total

    @njit(inline="always", fastmath=True)
    def axpy4(acc, h, rows, part, neurons, lo, hi):
        """acc += sum over i in [lo, hi) of h[i] * rows[neurons[i], part]; four rows per pass
        (one load/store of acc per four rows: 2x faster than row by row, measured)."""
        width = acc.shape[0]
        i = lo
        while i + 4 <= hi:
            r0, r1 = rows[neurons[i], part], rows[neurons[i + 1], part]
            r2, r3 = rows[neurons[i + 2], part], rows[neurons[i + 3], part]
            a0, a1, a2, a3 = h[i], h[i + 1], h[i + 2], h[i + 3]
            for c in range(width):
                acc[c] += a0 * r0[c] + a1 * r1[c] + a2 * r2[c] + a3 * r3[c]
            i += 4
        while i < hi:
            r0, a0 = rows[neurons[i], part], h[i]
            for c in range(width):
                acc[c] += a0 * r0[c]
            i += 1

    return SimpleNamespace(activate=activate, reduce_rows=reduce_rows, dot=dot, axpy4=axpy4)


def _fused_kernel(helpers: SimpleNamespace):
    from numba import njit, prange

    activate, dot, axpy4, reduce_rows = helpers.activate, helpers.dot, helpers.axpy4, helpers.reduce_rows

    @njit(parallel=True, fastmath=True, nogil=True, cache=True)
    def fused(x, packed, active, act_code, extra, use_extra, partial, out):
        """The MLP over the `active` neurons of `packed` (3 parts: gated, 2 parts: plain).
        `extra` is the precomputed gate pre-activation (gated) or the fc bias (plain)."""
        threads, parts = partial.shape[0], packed.shape[1]
        count = active.shape[0]
        h = np.empty(count, dtype=np.float32)
        for t in prange(threads):
            lo, hi = t * count // threads, (t + 1) * count // threads
            for i in range(lo, hi):
                row = packed[active[i]]
                if parts == 3:
                    g = extra[active[i]] if use_extra else dot(row[0], x)
                    h[i] = activate(act_code, g) * dot(row[1], x)
                else:
                    pre = dot(row[0], x)
                    h[i] = activate(act_code, pre + extra[active[i]] if use_extra else pre)
            partial[t, :] = 0.0
            axpy4(partial[t], h, packed, parts - 1, active, lo, hi)
        reduce_rows(partial, out)

    return fused


def _rows_axpy_kernel(helpers: SimpleNamespace):
    from numba import njit, prange

    axpy4, reduce_rows = helpers.axpy4, helpers.reduce_rows

    @njit(parallel=True, fastmath=True, nogil=True, cache=True)
    def rows_axpy(rows, active, values, partial, out):
        threads = partial.shape[0]
        count = active.shape[0]
        rows3 = rows.reshape(rows.shape[0], 1, rows.shape[1])
        for t in prange(threads):
            partial[t, :] = 0.0
            axpy4(partial[t], values, rows3, 0, active, t * count // threads, (t + 1) * count // threads)
        reduce_rows(partial, out)

    return rows_axpy


def _select_above_kernel():
    from numba import njit

    @njit(fastmath=True, nogil=True, cache=True)
    def select_above(values, threshold, magnitude, active):
        """Indices j with values[j] (or |values[j]|) > threshold, written to `active`; returns the count."""
        count = 0
        for j in range(values.shape[0]):
            v = abs(values[j]) if magnitude else values[j]
            if v > threshold:
                active[count] = j
                count += 1
        return count

    return select_above


def _rows_axpy_above_kernel(select_above, rows_axpy):
    from numba import njit

    @njit(fastmath=True, nogil=True, cache=True)  # the rows_axpy it calls is the parallel part
    def rows_axpy_above(rows, values, threshold, active, partial, out):
        """rows_axpy over the inputs with |values| > threshold, selection included (one call per layer)."""
        count = select_above(values, threshold, True, active)
        picked = np.empty(count, dtype=np.float32)
        for i in range(count):
            picked[i] = values[active[i]]
        rows_axpy(rows, active[:count], picked, partial, out)
        return count

    return rows_axpy_above


def _predicted_kernel(helpers: SimpleNamespace, select_above, fused):
    from numba import njit, prange

    dot = helpers.dot

    @njit(parallel=True, fastmath=True, nogil=True, cache=True)
    def predicted(x, down, up, bias, threshold, packed, act_code, fc_bias, use_bias, active, partial, out):
        """Low-rank predictor scores (up @ (down @ x) + bias), neurons above `threshold`, then the
        fused MLP over them: one call per layer, so no torch dispatch sits between the steps."""
        rank, neurons = down.shape[0], up.shape[0]
        z = np.empty(rank, dtype=np.float32)
        for r in range(rank):
            z[r] = dot(down[r], x)
        scores = np.empty(neurons, dtype=np.float32)
        for j in prange(neurons):
            scores[j] = dot(up[j], z) + bias[j]
        count = select_above(scores, threshold, False, active)
        fused(x, packed, active[:count], act_code, fc_bias, use_bias, partial, out)
        return count

    return predicted


# Reused buffers: allocating them per call costs as much as a small layer's kernel.
_partial_rows: dict[tuple[int, int], np.ndarray] = {}
_index_buffers: dict[int, np.ndarray] = {}


def _partials(numba, width: int) -> np.ndarray:
    """One output row per thread (as many threads as torch uses), reduced inside the kernel."""
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(threads)
    key = (threads, width)
    if key not in _partial_rows:
        _partial_rows[key] = np.empty(key, dtype=np.float32)
    return _partial_rows[key]


def _index_scratch(size: int) -> np.ndarray:
    if size not in _index_buffers:
        _index_buffers[size] = np.empty(size, dtype=np.int64)
    return _index_buffers[size]


def _check_cpu_float32(*tensors: torch.Tensor) -> None:
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        raise ValueError("the CPU sparse kernels take float32 CPU tensors; use the torch reference otherwise")


def rows_axpy_cpu(rows: torch.Tensor, active: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """`reference.rows_axpy_reference` for float32 CPU tensors: reads only the active rows."""
    _check_cpu_float32(rows, values)
    kernels = _compile()
    out = torch.empty(rows.shape[1])
    index = active.detach().to(torch.int64).contiguous().numpy()
    kernels.rows_axpy(
        rows.detach().numpy(), index, values.detach().contiguous().numpy(), _partials(kernels.numba, rows.shape[1]), out.numpy()
    )
    return out


def sparse_mlp_cpu(
    x: torch.Tensor,
    packed: torch.Tensor,
    active: torch.Tensor,
    act: str,
    gate_pre: torch.Tensor | None = None,
    fc_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`reference.sparse_mlp_reference` for float32 CPU tensors, reading only active rows."""
    _check_cpu_float32(packed, x)
    kernels = _compile()
    out = torch.empty(packed.shape[2])
    xs = x.detach().reshape(-1).float().contiguous().numpy()
    extra = gate_pre if packed.shape[1] == 3 else fc_bias
    kernels.fused(
        xs,
        packed.detach().numpy(),
        active.detach().to(torch.int64).contiguous().numpy(),
        _ACT_CODES[act],
        extra.detach().float().contiguous().numpy() if extra is not None else xs,
        extra is not None,
        _partials(kernels.numba, packed.shape[2]),
        out.numpy(),
    )
    return out


def rows_axpy_above_cpu(rows: torch.Tensor, values: torch.Tensor, threshold: float) -> tuple[torch.Tensor, int]:
    """`rows_axpy` over the entries of `values` whose magnitude exceeds `threshold`, selected inside
    the kernel (saves four torch dispatches per layer). Returns (output, number of active rows)."""
    _check_cpu_float32(rows, values)
    kernels = _compile()
    out = torch.empty(rows.shape[1])
    count = kernels.rows_axpy_above(
        rows.detach().numpy(),
        values.detach().contiguous().numpy(),
        np.float32(threshold),
        _index_scratch(values.shape[0]),
        _partials(kernels.numba, rows.shape[1]),
        out.numpy(),
    )
    return out, int(count)


def predicted_mlp_cpu(
    x: torch.Tensor, predictor, threshold: float, packed: torch.Tensor, act: str, fc_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, int]:
    """The predictor method's decoding step in one kernel call: scores from the low-rank
    `predictor` (`down`, `up` Linear layers), neurons above `threshold`, the fused MLP over them.
    Returns (output, number of active neurons)."""
    _check_cpu_float32(packed, x)
    kernels = _compile()
    out = torch.empty(packed.shape[2])
    bias = fc_bias.detach().float().contiguous().numpy() if fc_bias is not None else out.numpy()
    count = kernels.predicted(
        x.detach().reshape(-1).contiguous().numpy(),
        predictor.down.weight.detach().numpy(),
        predictor.up.weight.detach().numpy(),
        predictor.up.bias.detach().numpy(),
        np.float32(threshold),
        packed.detach().numpy(),
        _ACT_CODES[act],
        bias,
        fc_bias is not None,
        _index_scratch(packed.shape[0]),
        _partials(kernels.numba, packed.shape[2]),
        out.numpy(),
    )
    return out, int(count)

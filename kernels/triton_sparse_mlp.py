"""Triton kernels for one sparse MLP decoding step over the packed neuron-major layout.

`sparse_mlp_triton` equals `reference.sparse_mlp_reference` (see there for the layout) in two
launches, each reading only the active neurons' rows:

1. `_hidden_kernel`: a program per block of active neurons gathers their gate/up (or fc) rows,
   dots them with `x` in BLOCK_D chunks, and writes `h = act(gate) * up` (or `act(fc + bias)`)
   to an fp32 buffer of length k.
2. `_down_kernel`: a program per block of output columns loops over the k active neurons and
   accumulates `h[k] * down[k, cols]`; each column has one owner, so no atomics.

`rows_axpy_triton` equals `reference.rows_axpy_reference` (`sum_i values[i] * rows[active[i]]`,
an input-sparse GEMV): it is `_down_kernel` alone, with `h = values` and `down = rows`.

Without a GPU the kernels run under Triton's interpreter (`TRITON_INTERPRET=1`, CPU tensors);
Triton reads that variable when `@triton.jit` decorates, i.e. when this module is imported.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the module stays importable; triton_available() says False
    triton = None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# Decided once, like @triton.jit does: kernels decorated for the interpreter take CPU tensors.
_INTERPRETED = triton is not None and _interpreting()

ACT_IDS = {"silu": 0, "gelu_tanh": 1, "gelu": 2, "relu": 3}


def triton_available() -> bool:
    """True when the kernels can run here: triton imports and either CUDA or the interpreter is on."""
    if triton is None:
        return False
    if _INTERPRETED:
        return True
    return torch.cuda.is_available()  # reports False (never raises) on a broken CUDA install


if triton is not None:

    @triton.jit
    def _activate(z, ACT: tl.constexpr):
        # exp only of non-positive arguments: no overflow, and exact limits at +-inf.
        if ACT == 0:  # silu: z * sigmoid(z)
            e = tl.exp(-tl.abs(z))
            return z * tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
        elif ACT == 1:  # gelu_tanh: 0.5 z (1 + tanh(u)), tanh(u) = sign(u) (1 - e) / (1 + e), e = exp(-2|u|)
            u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
            e = tl.exp(-2.0 * tl.abs(u))
            t = (1.0 - e) / (1.0 + e)
            return 0.5 * z * (1.0 + tl.where(u >= 0, t, -t))
        elif ACT == 2:  # exact gelu (erf)
            return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
        else:  # relu
            return tl.maximum(z, 0.0)

    @triton.jit
    def _hidden_kernel(
        x_ptr,
        first_ptr,
        up_ptr,
        active_ptr,
        gate_pre_ptr,
        bias_ptr,
        h_ptr,
        k,
        d,
        stride_n,
        stride_d,
        ACT: tl.constexpr,
        GATED: tl.constexpr,
        HAS_GATE_PRE: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # `first` is the gate row (gated) or the fc row (plain); `up` is only read when gated.
        offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k
        neuron = tl.load(active_ptr + offs_k, mask=mask_k, other=0).to(tl.int64)
        rows = neuron[:, None] * stride_n  # int64: n * parts * d may exceed 2**31
        read_first: tl.constexpr = not (GATED and HAS_GATE_PRE)  # gate_pre replaces the gate dot
        acc_first = tl.zeros([BLOCK_K], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_K], dtype=tl.float32)
        for start in range(0, d, BLOCK_D):
            offs_d = start + tl.arange(0, BLOCK_D)
            mask_d = offs_d < d
            xs = tl.load(x_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
            tile = rows + offs_d[None, :] * stride_d
            mask = mask_k[:, None] & mask_d[None, :]
            if read_first:
                w = tl.load(first_ptr + tile, mask=mask, other=0.0).to(tl.float32)
                acc_first += tl.sum(w * xs, axis=1)
            if GATED:
                w = tl.load(up_ptr + tile, mask=mask, other=0.0).to(tl.float32)
                acc_up += tl.sum(w * xs, axis=1)
        if GATED:
            if HAS_GATE_PRE:
                acc_first = tl.load(gate_pre_ptr + neuron, mask=mask_k, other=0.0).to(tl.float32)
            h = _activate(acc_first, ACT) * acc_up
        else:
            if HAS_BIAS:
                acc_first += tl.load(bias_ptr + neuron, mask=mask_k, other=0.0).to(tl.float32)
            h = _activate(acc_first, ACT)
        tl.store(h_ptr + offs_k, h, mask=mask_k)

    @triton.jit
    def _down_kernel(
        h_ptr,
        down_ptr,
        active_ptr,
        y_ptr,
        k,
        d,
        stride_n,
        stride_d,
        BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < d
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for start in range(0, k, BLOCK_K):
            offs_k = start + tl.arange(0, BLOCK_K)
            mask_k = offs_k < k
            neuron = tl.load(active_ptr + offs_k, mask=mask_k, other=0).to(tl.int64)
            h = tl.load(h_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)  # masked lanes add 0
            tile = neuron[:, None] * stride_n + offs_d[None, :] * stride_d
            w = tl.load(down_ptr + tile, mask=mask_k[:, None] & mask_d[None, :], other=0.0)
            acc += tl.sum(h[:, None] * w.to(tl.float32), axis=0)
        tl.store(y_ptr + offs_d, acc.to(y_ptr.dtype.element_ty), mask=mask_d)


def sparse_mlp_triton(
    x: torch.Tensor,
    packed: torch.Tensor,
    active: torch.Tensor,
    act: str,
    gate_pre: torch.Tensor | None = None,
    fc_bias: torch.Tensor | None = None,
    *,
    block_k: int = 16,
    block_d: int = 128,
) -> torch.Tensor:
    """Same contract as `sparse_mlp_reference`. Indices in `active` are not range-checked
    (that would cost a device sync per step); out-of-range indices are the caller's bug.
    `block_k`, `block_d` (powers of two) tile phase 1; phase 2 uses 2*block_k by block_d/2."""
    if not triton_available():
        raise RuntimeError(
            "sparse_mlp_triton needs triton and either a CUDA device or TRITON_INTERPRET=1 set before this module is imported"
        )
    if act not in ACT_IDS:
        raise ValueError(f"unknown activation {act!r}; expected one of {', '.join(ACT_IDS)}")
    if packed.dim() != 3 or packed.shape[1] not in (2, 3):
        raise ValueError(f"packed must be [n, 3, d] or [n, 2, d], got {tuple(packed.shape)}")
    _, parts, d = packed.shape
    if x.shape != (d,):
        raise ValueError(f"x must be [{d}], got {tuple(x.shape)}")
    if active.dim() != 1:
        raise ValueError(f"active must be 1-D, got {tuple(active.shape)}")
    if not _INTERPRETED and x.device.type != "cuda":
        raise RuntimeError(
            f"compiled Triton kernels need CUDA tensors, got {x.device} (set TRITON_INTERPRET=1 before import to run on CPU)"
        )
    gated = parts == 3
    # Like the reference: gate_pre only matters for gated MLPs, fc_bias only for plain ones.
    gate_pre = gate_pre.contiguous() if gated and gate_pre is not None else None
    fc_bias = fc_bias.contiguous() if not gated and fc_bias is not None else None
    k = active.numel()
    y = torch.empty(d, dtype=x.dtype, device=x.device)
    if k == 0:
        return y.zero_()
    x = x.contiguous()
    active = active.to(torch.int64).contiguous()
    h = torch.empty(k, dtype=torch.float32, device=x.device)
    # Views share packed's storage; only their base pointer differs (part 0, 1, last).
    first, up, down = packed[:, 0], packed[:, 1], packed[:, parts - 1]
    stride_n, stride_d = packed.stride(0), packed.stride(2)
    _hidden_kernel[(triton.cdiv(k, block_k),)](
        x,
        first,
        up,
        active,
        gate_pre if gate_pre is not None else h,  # dummy pointers, never read when the flag is off
        fc_bias if fc_bias is not None else h,
        h,
        k,
        d,
        stride_n,
        stride_d,
        ACT=ACT_IDS[act],
        GATED=gated,
        HAS_GATE_PRE=gate_pre is not None,
        HAS_BIAS=fc_bias is not None,
        BLOCK_K=block_k,
        BLOCK_D=min(block_d, triton.next_power_of_2(d)),
    )
    down_block_d = min(block_d // 2, triton.next_power_of_2(d))  # more column programs for the GPU
    _down_kernel[(triton.cdiv(d, down_block_d),)](
        h,
        down,
        active,
        y,
        k,
        d,
        stride_n,
        stride_d,
        BLOCK_K=2 * block_k,
        BLOCK_D=down_block_d,
    )
    return y


def rows_axpy_triton(
    rows: torch.Tensor,
    active: torch.Tensor,
    values: torch.Tensor,
    *,
    block_k: int = 32,
    block_d: int = 64,
) -> torch.Tensor:
    """Same contract as `rows_axpy_reference`: `sum_i values[i] * rows[active[i]]` for `rows` [m, w]
    (any strides), `active` int32/int64 [k], `values` [k]; accumulated in float32, returned in
    `values`' dtype. Only the active rows are read. Indices are not range-checked (as in
    `sparse_mlp_triton`). `block_k`, `block_d` (powers of two) tile the k loop and the columns."""
    if not triton_available():
        raise RuntimeError(
            "rows_axpy_triton needs triton and either a CUDA device or TRITON_INTERPRET=1 set before this module is imported"
        )
    if rows.dim() != 2:
        raise ValueError(f"rows must be [m, w], got {tuple(rows.shape)}")
    if active.dim() != 1:
        raise ValueError(f"active must be 1-D, got {tuple(active.shape)}")
    if active.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"active must be int32 or int64, got {active.dtype}")
    k, w = active.numel(), rows.shape[1]
    if values.shape != (k,):
        raise ValueError(f"values must be [{k}] like active, got {tuple(values.shape)}")
    if not _INTERPRETED and rows.device.type != "cuda":
        raise RuntimeError(
            f"compiled Triton kernels need CUDA tensors, got {rows.device} (set TRITON_INTERPRET=1 before import to run on CPU)"
        )
    y = torch.empty(w, dtype=values.dtype, device=rows.device)
    if k == 0 or w == 0:
        return y.zero_()
    block_d = min(block_d, triton.next_power_of_2(w))
    _down_kernel[(triton.cdiv(w, block_d),)](
        values.contiguous(),
        rows,
        active.contiguous(),
        y,
        k,
        w,
        rows.stride(0),
        rows.stride(1),
        BLOCK_K=block_k,
        BLOCK_D=block_d,
    )
    return y

"""Torch reference for the sparse MLP kernels: the definition the fast paths must equal.

An MLP is stored *neuron-major* ("packed"): row `j` of `packed` holds everything neuron `j`
touches, so a decoding step that keeps `k` neurons reads `k` contiguous slabs and nothing
else.

- gated MLP (Llama, Qwen2, Mistral, Gemma): `packed[j] = [gate_w[j], up_w[j], down_w[:, j]]`,
  shape `[n, 3, d]`; `y = down(act(gate(x)) * up(x))`.
- plain MLP (GPT-2): `packed[j] = [fc_w[j], proj_w[:, j]]`, shape `[n, 2, d]`, with an
  optional `fc_bias[n]`; `y = proj(act(fc(x) + fc_bias))`.

The output bias of the down/proj projection, if any, is added by the caller.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu_tanh", "gelu", "relu")


def activation(name: str, value: torch.Tensor) -> torch.Tensor:
    if name == "silu":
        return F.silu(value)
    if name == "gelu_tanh":
        return F.gelu(value, approximate="tanh")
    if name == "gelu":
        return F.gelu(value)
    if name == "relu":
        return F.relu(value)
    raise ValueError(f"unknown activation {name!r}; expected one of {', '.join(ACTIVATIONS)}")


def pack_gated(gate_w: torch.Tensor, up_w: torch.Tensor, down_w: torch.Tensor) -> torch.Tensor:
    """`gate_w`, `up_w`: [n, d]; `down_w`: [d, n] -> packed [n, 3, d]."""
    return torch.stack([gate_w, up_w, down_w.t()], dim=1).contiguous()


def pack_plain(fc_w: torch.Tensor, proj_w: torch.Tensor) -> torch.Tensor:
    """`fc_w`: [n, d]; `proj_w`: [d, n] -> packed [n, 2, d]."""
    return torch.stack([fc_w, proj_w.t()], dim=1).contiguous()


def sparse_mlp_reference(
    x: torch.Tensor,
    packed: torch.Tensor,
    active: torch.Tensor,
    act: str,
    gate_pre: torch.Tensor | None = None,
    fc_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token's MLP output using only the neurons in `active`.

    `x`: [d]; `active`: int64 [k] neuron indices; `gate_pre`: optional [n] pre-activation
    gate values already computed for every neuron (the threshold method computes them to
    choose the neurons, so the kernel must not compute them again). Returns [d] in the
    dtype of `x`, accumulated in float32.
    """
    rows = packed.index_select(0, active).float()
    xf = x.float()
    if packed.shape[1] == 3:
        gate = rows[:, 0] @ xf if gate_pre is None else gate_pre.float().index_select(0, active)
        hidden = activation(act, gate) * (rows[:, 1] @ xf)
        out = hidden @ rows[:, 2]
    else:
        pre = rows[:, 0] @ xf
        if fc_bias is not None:
            pre = pre + fc_bias.float().index_select(0, active)
        out = activation(act, pre) @ rows[:, 1]
    return out.to(x.dtype)


def rows_axpy_reference(rows: torch.Tensor, active: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Input-sparse GEMV: `sum_i values[i] * rows[active[i]]`, i.e. `W @ v` for `W = rows.T`
    when only the inputs in `active` are non-zero. `rows`: [m, w]; returns [w] in `values`'
    dtype, accumulated in float32. The threshold method uses it for the down projection
    (rows = down_w.T, one per neuron) and, with input sparsity, for gate/up (rows = input dims).
    """
    picked = rows.index_select(0, active).float()
    return (values.float() @ picked).to(values.dtype)


def dense_mlp_reference(x: torch.Tensor, packed: torch.Tensor, act: str, fc_bias: torch.Tensor | None = None) -> torch.Tensor:
    """The same MLP with every neuron active (what sparsity 0 must reproduce)."""
    everything = torch.arange(packed.shape[0], device=packed.device)
    return sparse_mlp_reference(x, packed, everything, act, fc_bias=fc_bias)

"""The CPU sparse kernels (numba) equal the torch reference and an independent dense computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("numba")

from dyninfer.kernels.cpu_sparse_mlp import rows_axpy_cpu, sparse_mlp_cpu
from dyninfer.kernels.reference import (
    ACTIVATIONS,
    activation,
    pack_gated,
    pack_plain,
    rows_axpy_reference,
    sparse_mlp_reference,
)

SHAPES = ((64, 32), (100, 48), (1536, 576))  # (neurons, hidden); the last is SmolLM2-135M's MLP


def _active(n: int, sparsity: float, seed: int, ordered: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    picked = torch.randperm(n, generator=g)[: round(n * (1 - sparsity))]
    return picked.sort().values if ordered else picked


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max().clamp_min(1.0)
    assert ((actual - expected).abs().max() / scale) < 2e-5


@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("kind", ["gated", "gated_pre", "plain", "plain_bias"])
def test_sparse_mlp_equals_reference(n, d, sparsity, kind):
    g = torch.Generator().manual_seed(n + d)
    first, up, down = (torch.randn(n, d, generator=g), torch.randn(n, d, generator=g), torch.randn(d, n, generator=g))
    x, extra = torch.randn(d, generator=g), torch.randn(n, generator=g)
    act = ACTIVATIONS[(n + int(10 * sparsity)) % len(ACTIVATIONS)]
    active = _active(n, sparsity, seed=n, ordered=sparsity != 0.5)
    packed = pack_gated(first, up, down) if kind.startswith("gated") else pack_plain(first, down)
    kwargs = {"gate_pre": extra} if kind == "gated_pre" else {"fc_bias": extra} if kind == "plain_bias" else {}
    _close(sparse_mlp_cpu(x, packed, active, act, **kwargs), sparse_mlp_reference(x, packed, active, act, **kwargs))


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_all_active_equals_the_dense_mlp(act):
    g = torch.Generator().manual_seed(1)
    gate_w, up_w, down_w, x = (
        torch.randn(80, 24, generator=g),
        torch.randn(80, 24, generator=g),
        torch.randn(24, 80, generator=g),
        torch.randn(24, generator=g),
    )
    expected = F.linear(activation(act, F.linear(x, gate_w)) * F.linear(x, up_w), down_w)
    _close(sparse_mlp_cpu(x, pack_gated(gate_w, up_w, down_w), torch.arange(80), act), expected)
    bias = torch.randn(80, generator=g)
    plain = F.linear(activation(act, F.linear(x, gate_w, bias)), down_w)
    _close(sparse_mlp_cpu(x, pack_plain(gate_w, down_w), torch.arange(80), act, fc_bias=bias), plain)


@pytest.mark.parametrize("m,w", [(64, 32), (300, 77), (1536, 576)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_rows_axpy_equals_reference_and_dense(m, w, sparsity):
    g = torch.Generator().manual_seed(m)
    rows = torch.randn(m, w, generator=g)
    active = _active(m, sparsity, seed=w, ordered=False)
    values = torch.randn(active.numel(), generator=g)
    _close(rows_axpy_cpu(rows, active, values), rows_axpy_reference(rows, active, values))
    dense_input = torch.zeros(m).index_put_((active,), values)  # independent: a dense GEMV of the sparse input
    _close(rows_axpy_cpu(rows, active, values), rows.t() @ dense_input)


def test_cpu_kernels_refuse_other_dtypes():
    packed = pack_gated(torch.randn(8, 4), torch.randn(8, 4), torch.randn(4, 8)).half()
    with pytest.raises(ValueError, match="float32"):
        sparse_mlp_cpu(torch.randn(4).half(), packed, torch.arange(4), "silu")
    with pytest.raises(ValueError, match="float32"):
        rows_axpy_cpu(torch.randn(8, 4, dtype=torch.float64), torch.arange(4), torch.randn(4, dtype=torch.float64))

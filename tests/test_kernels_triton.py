"""The Triton sparse MLP kernel equals the torch reference, checked on CPU through Triton's interpreter.

Triton picks interpreter or compiler when `@triton.jit` decorates, i.e. when the kernel module is
first imported, so the kernel checks run in one subprocess started with TRITON_INTERPRET=1: this
file re-run as a script over the case list below, printing one JSON result per case.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
# One xdist worker runs this module: its module fixture is built once.
pytestmark = [pytest.mark.triton, pytest.mark.xdist_group("kernels_triton")]

ACTS = ("silu", "gelu_tanh", "gelu", "relu")
KINDS = ("gated", "gated_pre", "plain", "plain_bias")
SHAPES = ((64, 32), (100, 48), (256, 96))  # (n, d)
TOL = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 1.6e-2}  # low precision: ~2 ulps of the output


def _case(check, **kw):
    name = "-".join(str(v) for v in kw.values())
    return {"id": f"{check}-{name}" if name else check, "check": check, **kw}


def _cases() -> list[dict]:
    cases = []
    # Every activation x MLP kind x dtype, at half sparsity with unsorted indices.
    for act in ACTS:
        for kind in KINDS:
            for dtype in TOL:
                cases.append(_case("ref", kind=kind, act=act, dtype=dtype, n=100, d=48, sparsity=0.5, order="unsorted"))
    # Shapes x sparsities (0 = all active, 1 = none) x index order x kind, fp32; activations rotate,
    # and half the cases use small blocks so both loops (over d, over k) take several masked steps.
    i = 0
    for n, d in SHAPES:
        for sparsity in (0.0, 0.5, 0.9, 1.0):
            for order in ("sorted", "unsorted"):
                for kind in KINDS:
                    cases.append(
                        _case(
                            "ref",
                            kind=kind,
                            act=ACTS[i % 4],
                            dtype="float32",
                            n=n,
                            d=d,
                            sparsity=sparsity,
                            order=order,
                            small_blocks=i % 2 == 1,
                        )
                    )
                    i += 1
    # Low precision across shapes, dense and very sparse.
    for n, d in SHAPES:
        for dtype in ("float16", "bfloat16"):
            for sparsity in (0.0, 0.9):
                cases.append(_case("ref", kind="gated", act="silu", dtype=dtype, n=n, d=d, sparsity=sparsity, order="sorted"))
                cases.append(_case("ref", kind="plain_bias", act="gelu_tanh", dtype=dtype, n=n, d=d, sparsity=sparsity, order="unsorted"))
    # All neurons active against a dense F.linear MLP built from unpacked weights (not the reference).
    cases += [
        _case("dense", kind="gated", act="silu"),
        _case("dense", kind="gated", act="gelu_tanh"),
        _case("dense", kind="gated_pre", act="silu"),
        _case("dense", kind="plain_bias", act="gelu_tanh"),
        _case("dense", kind="plain", act="relu"),
    ]
    cases += [_case("saturation", act=act) for act in ACTS]
    cases += [_case("strided", kind=kind) for kind in ("gated", "plain_bias")]
    cases.append(_case("errors"))
    # rows_axpy (input-sparse GEMV) against rows_axpy_reference: shapes x sparsities x index order x
    # dtype; small blocks rotate in so the loop over k and the column programs take masked steps.
    for m, w in SHAPES:
        for sparsity in (0.0, 0.5, 0.9, 1.0):
            for order in ("sorted", "unsorted"):
                for dtype in TOL:
                    cases.append(_case("axpy", dtype=dtype, m=m, w=w, sparsity=sparsity, order=order, small_blocks=i % 2 == 1))
                    i += 1
    cases += [_case("axpy_strided", layout=layout) for layout in ("transposed", "step")]
    cases += [_case("axpy_dense"), _case("axpy_errors")]
    return cases


CASES = _cases()
assert len({c["id"] for c in CASES}) == len(CASES)


# ---------------------------------------------------------------- subprocess side (TRITON_INTERPRET=1)


def _random_inputs(case, g):
    n, d, dtype = case["n"], case["d"], getattr(torch, case["dtype"])
    parts = 3 if case["kind"].startswith("gated") else 2
    packed = torch.randn(n, parts, d, generator=g) / d**0.5  # keeps every dot product O(1)
    x = torch.randn(d, generator=g)
    active = torch.randperm(n, generator=g)[: round(n * (1 - case["sparsity"]))]
    if case["order"] == "sorted":
        active = active.sort().values
    kw = {}
    if case["kind"] == "gated_pre":
        kw["gate_pre"] = torch.randn(n, generator=g).to(dtype)
        packed[:, 0] = float("nan")  # the kernel must not use the gate rows when gate_pre is given
    if case["kind"] == "plain_bias":
        kw["fc_bias"] = torch.randn(n, generator=g).to(dtype)
    return x.to(dtype), packed.to(dtype), active, kw


def _axpy_inputs(case, g):
    m, w, dtype = case["m"], case["w"], getattr(torch, case["dtype"])
    rows = torch.randn(m, w, generator=g) / m**0.5  # keeps every output entry O(1)
    active = torch.randperm(m, generator=g)[: round(m * (1 - case["sparsity"]))]
    if case["order"] == "sorted":
        active = active.sort().values
    values = torch.randn(active.numel(), generator=g)
    return rows.to(dtype), active, values.to(dtype)


def _dense_expectation(case, g, n=96, d=40):
    import torch.nn.functional as F

    act = {"silu": F.silu, "relu": F.relu, "gelu_tanh": lambda v: F.gelu(v, approximate="tanh")}[case["act"]]
    x = torch.randn(d, generator=g)
    w_in, w_up = torch.randn(n, d, generator=g) / d**0.5, torch.randn(n, d, generator=g) / d**0.5
    w_out = torch.randn(d, n, generator=g) / n**0.5
    kw = {}
    if case["kind"].startswith("gated"):
        expected = F.linear(act(F.linear(x, w_in)) * F.linear(x, w_up), w_out)
        packed = torch.stack([w_in, w_up, w_out.t()], dim=1)  # layout written out here, not via pack_gated
        if case["kind"] == "gated_pre":
            kw["gate_pre"] = F.linear(x, w_in)
            packed[:, 0] = float("nan")
    else:
        bias = torch.randn(n, generator=g) if case["kind"] == "plain_bias" else None
        expected = F.linear(act(F.linear(x, w_in, bias)), w_out)
        packed = torch.stack([w_in, w_out.t()], dim=1)
        kw["fc_bias"] = bias
    return x, packed.contiguous(), torch.arange(n), kw, expected


def _scaled(tol, expected):
    """rtol and atol both `tol`, atol relative to the output's largest entry."""
    return tol, tol * (expected.abs().max().item() if expected.numel() else 0.0)


def _check(case) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Returns (kernel output, expectation in fp32, rtol, atol)."""
    from dyninfer.kernels.reference import rows_axpy_reference, sparse_mlp_reference
    from dyninfer.kernels.triton_sparse_mlp import rows_axpy_triton, sparse_mlp_triton

    g = torch.Generator().manual_seed(len(case["id"]) * 7919 + sum(map(ord, case["id"])))
    check = case["check"]
    if check == "ref":
        x, packed, active, kw = _random_inputs(case, g)
        blocks = {"block_k": 4, "block_d": 16} if case.get("small_blocks") else {}
        got = sparse_mlp_triton(x, packed, active, case["act"], **kw, **blocks)
        assert got.dtype == x.dtype and got.shape == x.shape, (got.dtype, got.shape)
        # The expectation: the reference in fp32 on the same (possibly low-precision) values.
        f32 = {k: v.float() for k, v in kw.items()}
        expected = sparse_mlp_reference(x.float(), packed.float(), active, case["act"], **f32)
        return got, expected, *_scaled(TOL[case["dtype"]], expected)
    if check == "dense":
        x, packed, active, kw, expected = _dense_expectation(case, g)
        return sparse_mlp_triton(x, packed, active, case["act"], **kw), expected, *_scaled(1e-4, expected)
    if check == "saturation":
        # Huge pre-activations: exp must not overflow into inf/inf or 0*inf (NaN). With up = 1 and
        # down = identity, y[j] = act(gate_pre[j]): each activation value is checked on its own.
        gate_pre = torch.tensor(
            [-1e30, -1e4, -300.0, -100.0, -30.0, -10.0, -3.0, -1.0, -1e-3, 0.0, 1e-3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1e4, 1e30]
        )
        n = d = len(gate_pre)
        x, packed = torch.eye(d)[0], torch.full((n, 3, d), float("nan"))
        packed[:, 1], packed[:, 2] = torch.eye(d)[0], torch.eye(d)
        got = sparse_mlp_triton(x, packed, torch.arange(n), case["act"], gate_pre=gate_pre)
        return got, sparse_mlp_reference(x, packed, torch.arange(n), case["act"], gate_pre=gate_pre), 1e-5, 1e-6
    if check == "strided":
        # Non-contiguous packed (stride 2 along d, parts carved from a wider tensor), strided x,
        # int32 indices with a duplicate (the reference counts a repeated neuron twice).
        n, d, parts = 50, 24, 3 if case["kind"] == "gated" else 2
        packed = (torch.randn(n, parts + 1, 2 * d, generator=g) / d**0.5)[:, 1:, ::2]
        assert packed.stride() == ((parts + 1) * 2 * d, 2 * d, 2), packed.stride()
        x = torch.randn(2 * d, generator=g)[::2]
        active = torch.tensor([7, 3, 3, 49, 0, 21], dtype=torch.int32)
        bias = torch.randn(n, generator=g) if case["kind"] == "plain_bias" else None
        got = sparse_mlp_triton(x, packed, active, "gelu", fc_bias=bias)
        expected = sparse_mlp_reference(x, packed, active.long(), "gelu", fc_bias=bias)
        return got, expected, *_scaled(1e-4, expected)
    if check == "errors":
        x, packed, active = torch.randn(8), torch.randn(4, 3, 8), torch.arange(4)
        for bad, exc in [
            ({"act": "swish"}, ValueError),
            ({"packed": torch.randn(4, 4, 8)}, ValueError),
            ({"x": torch.randn(9)}, ValueError),
        ]:
            args = {"x": x, "packed": packed, "active": active, "act": "silu", **bad}
            try:
                sparse_mlp_triton(**args)
            except exc:
                continue
            raise AssertionError(f"{bad} did not raise {exc.__name__}")
        zero = torch.zeros(0)
        return zero, zero, 0.0, 0.0
    if check == "axpy":
        rows, active, values = _axpy_inputs(case, g)
        blocks = {"block_k": 8, "block_d": 32} if case.get("small_blocks") else {}  # default: 32, 64
        got = rows_axpy_triton(rows, active, values, **blocks)
        assert got.dtype == values.dtype and got.shape == (case["w"],), (got.dtype, got.shape)
        expected = rows_axpy_reference(rows.float(), active, values.float())
        return got, expected, *_scaled(TOL[case["dtype"]], expected)
    if check == "axpy_strided":
        # Columns not contiguous ("step": every third column; "transposed": rows is the transpose
        # of a row-sliced [w, m] tensor, so the row stride is 1), int32 indices with a duplicate.
        m, w = 50, 24
        if case["layout"] == "step":
            rows, strides = torch.randn(m, 3 * w, generator=g)[:, 1::3], (3 * w, 3)
        else:
            rows, strides = torch.randn(2 * w, m + 5, generator=g)[::2, 5:].t(), (1, 2 * (m + 5))
        assert rows.shape == (m, w) and rows.stride() == strides, rows.stride()
        active = torch.tensor([7, 3, 3, 49, 0, 21], dtype=torch.int32)
        values = torch.randn(2 * len(active), generator=g)[::2]
        got = rows_axpy_triton(rows, active, values, block_k=4, block_d=8)
        expected = rows_axpy_reference(rows, active.long(), values)
        return got, expected, *_scaled(1e-4, expected)
    if check == "axpy_dense":
        # Every row active, in a shuffled order: equals the dense GEMV rows.T @ v, computed
        # directly, where v[active[i]] = values[i].
        m, w = 96, 40
        rows, v = torch.randn(m, w, generator=g), torch.randn(m, generator=g)
        active = torch.randperm(m, generator=g)
        expected = rows.t().float() @ v.float()
        return rows_axpy_triton(rows, active, v[active]), expected, *_scaled(1e-4, expected)
    if check == "axpy_errors":
        rows, active, values = torch.randn(6, 8), torch.arange(3), torch.randn(3)
        for bad, exc in [
            ({"rows": torch.randn(6, 8, 1)}, ValueError),
            ({"values": torch.randn(4)}, ValueError),
            ({"active": active.float()}, TypeError),
            ({"active": active[None]}, ValueError),
        ]:
            args = {"rows": rows, "active": active, "values": values, **bad}
            try:
                rows_axpy_triton(**args)
            except exc:
                continue
            raise AssertionError(f"{bad} did not raise {exc.__name__}")
        zero = torch.zeros(0)
        return zero, zero, 0.0, 0.0
    raise ValueError(check)


def _run_all(cases_path: str) -> None:
    from dyninfer.kernels.triton_sparse_mlp import triton_available

    assert triton_available(), "TRITON_INTERPRET=1 should make the kernels available on CPU"
    for case in json.loads(Path(cases_path).read_text()):
        result = {"id": case["id"]}
        try:
            got, expected, rtol, atol = _check(case)
            got = got.float()
            # An all-inactive step has expected == 0 and so atol == 0: it must give exact zeros.
            excess = (got - expected).abs() - (atol + rtol * expected.abs())
            result["ok"] = bool(torch.isfinite(got).all()) and bool((excess <= 0).all())
            result["max_err"] = (got - expected).abs().max().item() if got.numel() else 0.0
        except Exception as exc:
            result.update(ok=False, error=f"{type(exc).__name__}: {exc}")
        print(json.dumps(result), flush=True)


# ---------------------------------------------------------------- pytest side


@pytest.fixture(scope="module")
def interpreted_results(tmp_path_factory) -> dict:
    cases_path = tmp_path_factory.mktemp("triton") / "cases.json"
    cases_path.write_text(json.dumps(CASES))
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, __file__, str(cases_path)], env=env, capture_output=True, text=True, timeout=600, check=False)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            results[row["id"]] = row
    results["__stderr__"] = proc.stderr[-3000:]
    return results


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_kernel_matches_expectation_interpreted(case, interpreted_results):
    row = interpreted_results.get(case["id"])
    assert row is not None, f"no result; subprocess stderr:\n{interpreted_results['__stderr__']}"
    assert row["ok"], row


def test_unavailable_without_cuda_or_interpreter():
    from dyninfer.kernels import triton_sparse_mlp as mod

    if mod._INTERPRETED or torch.cuda.is_available():
        pytest.skip("kernels are runnable in this process")
    assert mod.triton_available() is False
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        mod.sparse_mlp_triton(torch.randn(8), torch.randn(4, 3, 8), torch.arange(4), "silu")


def test_kernels_compile_for_sm90():
    """The interpreter accepts Python the compiler rejects; compiling ahead of time needs no GPU."""
    from dyninfer.kernels import triton_sparse_mlp as mod

    if mod._INTERPRETED:
        pytest.skip("kernels were decorated for the interpreter")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from triton.compiler import compile as triton_compile
    except ImportError:
        pytest.skip("this triton has no ASTSource/GPUTarget API")
    flags = ("ACT", "GATED", "HAS_GATE_PRE", "HAS_BIAS")
    variants = [
        (mod._hidden_kernel, {**dict(zip(flags, v)), "BLOCK_K": 16, "BLOCK_D": 128})
        for v in ((0, True, False, False), (1, True, True, False), (2, False, False, True))
    ]
    variants.append((mod._down_kernel, {"BLOCK_K": 32, "BLOCK_D": 64}))
    variants.append((mod._down_kernel, {"BLOCK_K": 32, "BLOCK_D": 64}, {"h_ptr": "*bf16", "active_ptr": "*i32"}))  # rows_axpy
    for fn, consts, *overrides in variants:
        pointer = {"active_ptr": "*i64", "h_ptr": "*fp32", **(overrides[0] if overrides else {})}  # others: bf16
        sig = {a: "constexpr" if a in consts else pointer.get(a, "*bf16") if a.endswith("_ptr") else "i32" for a in fn.arg_names}
        compiled = triton_compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))
        assert compiled.asm.get("cubin"), fn.__name__


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernel_matches_reference_on_cuda():
    from dyninfer.kernels.reference import sparse_mlp_reference
    from dyninfer.kernels.triton_sparse_mlp import sparse_mlp_triton

    g = torch.Generator().manual_seed(0)
    for case in [c for c in CASES if c["check"] == "ref" and c["n"] == 256]:
        x, packed, active, kw = _random_inputs(case, g)
        x, packed, active = x.cuda(), packed.cuda(), active.cuda()
        kw = {k: v.cuda() for k, v in kw.items()}
        got = sparse_mlp_triton(x, packed, active, case["act"], **kw).float()
        expected = sparse_mlp_reference(x.float(), packed.float(), active, case["act"], **{k: v.float() for k, v in kw.items()})
        tol = TOL[case["dtype"]]
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol * expected.abs().max().item(), msg=case["id"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rows_axpy_matches_reference_on_cuda():
    from dyninfer.kernels.reference import rows_axpy_reference
    from dyninfer.kernels.triton_sparse_mlp import rows_axpy_triton

    g = torch.Generator().manual_seed(0)
    for case in [c for c in CASES if c["check"] == "axpy" and c["m"] == 256]:
        rows, active, values = (t.cuda() for t in _axpy_inputs(case, g))
        got = rows_axpy_triton(rows, active, values).float()
        expected = rows_axpy_reference(rows.float(), active, values.float())
        tol = TOL[case["dtype"]]
        atol = tol * expected.abs().max().item() if expected.numel() else 0.0
        torch.testing.assert_close(got, expected, rtol=tol, atol=atol, msg=case["id"])


if __name__ == "__main__":
    _run_all(sys.argv[1])

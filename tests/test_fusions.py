"""The export's fusions (exporters/fusions.py), each held to what it replaces: norms found by what they compute, and the
graph rewrites run by ONNX Runtime against the unfused graph on the same inputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from dyninfer.exporters import fusions


def _gemma_norm():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    return GemmaRMSNorm(12, eps=1e-6)


def _llama_norm():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return LlamaRMSNorm(12, eps=1e-5)


@pytest.mark.parametrize(
    ("make", "form"),
    [
        (_llama_norm, (0.0, 1e-5)),  # x / rms * w
        (_gemma_norm, (1.0, 1e-6)),  # x / rms * (1 + w)
        (lambda: torch.nn.RMSNorm(12, eps=1e-6), (0.0, 1e-6)),  # torch's own, no family code at all
        (lambda: torch.nn.LayerNorm(12, bias=False), None),  # subtracts the mean: not an RMS norm
        (lambda: torch.nn.LayerNorm(12), None),
    ],
)
def test_norms_are_recognised_by_what_they_compute(make, form):
    assert fusions._norm_form(make()) == form


@pytest.mark.parametrize("make", [_llama_norm, _gemma_norm])
def test_a_fused_norm_computes_what_the_module_did_and_is_restored(make):
    norm = make()
    with torch.no_grad():
        norm.weight.normal_(generator=torch.Generator().manual_seed(1))
    model = torch.nn.Sequential(norm, torch.nn.LayerNorm(12))
    x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(2))
    expected = model(x)
    with fusions.fused_norms(model) as found:
        assert found.fused == 1 and found.left == {"LayerNorm"}
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    assert "forward" not in vars(norm)  # the class's own forward again


def _run(model, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _value(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _skip_graph():
    """Two residual blocks: h = x + r; y = norm(h); out = h + y, then z = norm(out + r) (both adds feed norms)."""
    scale = numpy_helper.from_array(np.linspace(0.5, 1.5, 8).astype(np.float32), "scale")
    nodes = [
        helper.make_node("Add", ["x", "r"], ["h"]),
        helper.make_node("SimplifiedLayerNormalization", ["h", "scale"], ["y"], axis=-1, epsilon=1e-5),
        helper.make_node("Add", ["h", "y"], ["out"]),
        helper.make_node("Add", ["out", "r"], ["sum2"]),
        helper.make_node("SimplifiedLayerNormalization", ["sum2", "scale"], ["z"], axis=-1, epsilon=1e-5),
    ]
    shape = ["batch", "sequence", 8]
    values = [_value(name, shape) for name in ("h", "y", "out", "sum2")]
    graph = helper.make_graph(
        nodes, "skip", [_value("x", shape), _value("r", shape)], [_value("out", shape), _value("z", shape)], [scale], value_info=values
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_residual_adds_feeding_norms_become_skip_norms_with_the_same_results():
    model = _skip_graph()
    rng = np.random.default_rng(0)
    feeds = {name: rng.standard_normal((2, 3, 8)).astype(np.float32) for name in ("x", "r")}
    expected = _run(model, feeds)
    assert fusions.fuse_skip_norms(model) == 2
    kinds = [n.op_type for n in model.graph.node]
    assert kinds.count("SkipSimplifiedLayerNormalization") == 2 and "SimplifiedLayerNormalization" not in kinds
    assert kinds.count("Add") == 1  # h + y feeds no norm
    for got, want in zip(_run(model, feeds), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_an_add_of_unknown_or_broadcast_shapes_is_left_alone():
    """The fused op adds two inputs of one [B, S, H]: a broadcast bias, or a value whose shape nobody recorded, is not
    known to be one."""
    model = _skip_graph()
    model.graph.input[1].CopyFrom(_value("r", [8]))  # broadcast over batch and sequence
    del model.graph.value_info[:]  # h is then of unknown shape
    assert fusions.fuse_skip_norms(model) == 0


def _sibling_graph():
    """x @ Wq, x @ Wk, x @ Wv in the main graph, and x @ Wk, x @ Wv inside an If branch (as CALM's propagation reads
    only keys and values), plus x @ Wo of another depth-matching input that is not a sibling."""
    rng = np.random.default_rng(1)
    weights = {name: rng.standard_normal((8, n)).astype(np.float32) for name, n in (("wq", 8), ("wk", 4), ("wv", 4), ("wo", 8))}
    initializers = [numpy_helper.from_array(w, name) for name, w in weights.items()]
    branch = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "wk"], ["bk"]),
            helper.make_node("MatMul", ["x", "wv"], ["bv"]),
            helper.make_node("Concat", ["bk", "bv"], ["kv"], axis=-1),
        ],
        "then",
        [],
        [_value("kv", [1, 3, 8])],
    )
    other = helper.make_graph([helper.make_node("Concat", ["k", "v"], ["kv_else"], axis=-1)], "else", [], [_value("kv_else", [1, 3, 8])])
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"]),
        helper.make_node("MatMul", ["x", "wk"], ["k"]),
        helper.make_node("MatMul", ["x", "wv"], ["v"]),
        helper.make_node("MatMul", ["q", "wo"], ["o"]),
        helper.make_node("If", ["flag"], ["kv_out"], then_branch=branch, else_branch=other),
    ]
    inputs = [_value("x", [1, 3, 8]), helper.make_tensor_value_info("flag", TensorProto.BOOL, [])]
    outputs = [_value("o", [1, 3, 8]), _value("kv_out", [1, 3, 8])]
    graph = helper.make_graph(nodes, "siblings", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _branch(model, name):
    (node,) = [n for n in model.graph.node if n.op_type == "If"]
    return next(a.g for a in node.attribute if a.name == name)


def test_projections_of_one_input_become_one_matmul_and_each_weight_is_stored_once():
    model = _sibling_graph()
    x = np.random.default_rng(2).standard_normal((1, 3, 8)).astype(np.float32)
    expected = {flag: _run(model, {"x": x, "flag": np.array(flag)}) for flag in (True, False)}
    assert fusions.merge_sibling_matmuls(model) == 3  # two of q/k/v in the main graph, one of k/v in the branch
    onnx.checker.check_model(model)
    main = [n.op_type for n in model.graph.node]
    assert main.count("MatMul") == 2  # the merged q/k/v and the output projection
    (merged,) = [t for t in model.graph.initializer if t.name.endswith(".merged")]
    assert list(merged.dims) == [8, 16]
    weights = {t.name for t in model.graph.initializer if len(t.dims) == 2}
    assert weights == {merged.name, "wo"}  # wq, wk and wv only inside the merge
    (branch_matmul,) = [n for n in _branch(model, "then_branch").node if n.op_type == "MatMul"]
    assert branch_matmul.input[1] == merged.name  # the subset reads the superset's merged weight
    for flag, want in expected.items():
        for got, ref in zip(_run(model, {"x": x, "flag": np.array(flag)}), want):
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)

"""Graph rewrites at export: the same outputs from a graph ONNX Runtime reads and quantizes more of."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from dyninfer.exporters.graph_tidy import fold_weight_transposes, strip_node_metadata


def _branch(name: str, weight: str, extra=None) -> onnx.GraphProto:
    """y = x @ Transpose(weight) (+ x @ Transpose(extra) when given), reading the outer graph's initializers."""
    nodes = [
        helper.make_node("Transpose", [weight], [f"{name}_wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", f"{name}_wt"], [f"{name}_y"]),
    ]
    out = f"{name}_y"
    if extra is not None:
        nodes += [
            helper.make_node("Transpose", [extra], [f"{name}_et"]),  # no perm attribute: reversed axes
            helper.make_node("MatMul", ["x", f"{name}_et"], [f"{name}_z"]),
            helper.make_node("Add", [f"{name}_y", f"{name}_z"], [f"{name}_sum"]),
        ]
        out = f"{name}_sum"
    nodes[0].metadata_props.add(key="pkg.torch.onnx.stack_trace", value="x" * 1000)
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w, v, u = (rng.standard_normal((5, 4)).astype(np.float32) for _ in range(3))
    main = [
        helper.make_node("If", ["flag"], ["y"], then_branch=_branch("then", "w", extra="v"), else_branch=_branch("else", "w")),
        helper.make_node("Transpose", ["u"], ["ut"], perm=[1, 0]),  # in the main graph too, and a graph output
    ]
    main[1].metadata_props.add(key="pkg.torch.onnx.stack_trace", value="y" * 500)
    graph = helper.make_graph(
        main,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]), helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None), helper.make_tensor_value_info("ut", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(a, n) for a, n in ((w, "w"), (v, "v"), (u, "u"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model


def _run(model: onnx.ModelProto, flag: bool) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.arange(8, dtype=np.float32).reshape(2, 4) / 7
    return session.run(None, {"x": x, "flag": np.array(flag)})


def _transposes(graph) -> int:
    return sum(
        (n.op_type == "Transpose") + sum(_transposes(a.g) for a in n.attribute if a.type == onnx.AttributeProto.GRAPH) for n in graph.node
    )


def test_folding_transposed_weights_keeps_every_output_and_leaves_no_transpose():
    model = _model()
    expected = {flag: _run(model, flag) for flag in (True, False)}
    assert _transposes(model.graph) == 4
    assert fold_weight_transposes(model) == 4
    assert _transposes(model.graph) == 0
    for flag in (True, False):
        for ours, reference in zip(_run(model, flag), expected[flag]):
            np.testing.assert_array_equal(ours, reference)
    names = sorted(t.name for t in model.graph.initializer)
    # W's two transposes (one per branch) share one stored copy; the originals nothing reads any more are gone
    assert names == ["u.transposed", "v.transposed", "w.transposed"]


def test_a_weight_read_untransposed_elsewhere_is_kept():
    model = _model()
    model.graph.node.append(helper.make_node("Identity", ["w"], ["w_copy"]))
    model.graph.output.append(helper.make_tensor_value_info("w_copy", TensorProto.FLOAT, None))
    fold_weight_transposes(model)
    assert {"w", "w.transposed"} <= {t.name for t in model.graph.initializer}
    np.testing.assert_array_equal(_run(model, True)[2], numpy_helper.to_array(next(t for t in _model().graph.initializer if t.name == "w")))


def test_stripping_node_metadata_drops_the_stack_traces_in_branches_too():
    model = _model()
    expected = _run(model, True)
    assert strip_node_metadata(model) == 2 * (len("pkg.torch.onnx.stack_trace") + 1000) + len("pkg.torch.onnx.stack_trace") + 500
    assert strip_node_metadata(model) == 0
    for ours, reference in zip(_run(model, True), expected):
        np.testing.assert_array_equal(ours, reference)

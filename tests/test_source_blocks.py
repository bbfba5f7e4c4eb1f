"""A GGUF source's Q4_0, Q4_1 and Q8_0 blocks carried into MatMulNBits (exporters/source_blocks.py)."""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")


def _gguf_with(path, tensors: dict) -> dict:
    """Write a GGUF holding each weight quantized to its kind; returns each kind's dequantized weight (what a model
    loaded from the file holds)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    dequantized = {}
    for name, (kind, weight) in tensors.items():
        qtype = getattr(gguf.GGMLQuantizationType, kind)
        raw = gguf.quants.quantize(weight, qtype)
        writer.add_tensor(name, raw, raw_dtype=qtype)
        dequantized[name] = gguf.quants.dequantize(raw, qtype).astype(np.float32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dequantized


def _matmul_model(weight: np.ndarray, k: int, n: int):
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="projection")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, n])],
        initializer=[numpy_helper.from_array(weight.T.copy(), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    return model


@pytest.mark.parametrize("kind", ["Q4_1", "Q4_0", "Q8_0"])
def test_carried_blocks_compute_the_dequantized_weight_exactly(tmp_path, kind):
    """At accuracy level 0 (float activations) the carried blocks reproduce the GGUF's dequantized weight to float
    rounding; at level 4 (int8 activations, the fast CPU path) the difference is int8's rounding of the inputs."""
    import onnxruntime as ort

    from dyninfer.exporters.source_blocks import carry_source_blocks, read_source_blocks

    rng = np.random.default_rng(0)
    k, n = 96, 64
    weight = _gguf_with(tmp_path / "m.gguf", {"blk.0.ffn_up.weight": (kind, rng.normal(0, 0.05, (n, k)).astype(np.float32))})
    weight = weight["blk.0.ffn_up.weight"]
    x = rng.normal(0, 1, (1, 3, k)).astype(np.float32)
    for level, tolerance in ((0, 1e-5), (4, 5e-2)):
        model = _matmul_model(weight, k, n)
        assert carry_source_blocks(model, read_source_blocks(tmp_path / "m.gguf"), level) == {kind: 1}
        assert [node.op_type for node in model.graph.node][0] == "MatMulNBits"
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        y = session.run(None, {"x": x})[0]
        np.testing.assert_allclose(y, x @ weight.T, atol=tolerance * np.abs(x @ weight.T).max(), rtol=0)


def test_llamas_permuted_query_rows_are_found_and_other_weights_left_alone(tmp_path):
    """llama.cpp stores Q and K with each head's rotary halves interleaved: the model's weight is found by value in
    the order transformers' loader restores. A weight no GGUF tensor holds is not touched, and a graph with none
    to carry is refused."""
    from dyninfer.core.errors import DyninferError
    from dyninfer.exporters.source_blocks import carry_source_blocks, read_source_blocks

    rng = np.random.default_rng(1)
    k, heads = 64, 4
    stored = _gguf_with(tmp_path / "m.gguf", {"blk.0.attn_q.weight": ("Q8_0", rng.normal(0, 0.05, (k, k)).astype(np.float32))})
    stored = stored["blk.0.attn_q.weight"]
    restored = stored.reshape(heads, k // heads // 2, 2, k).swapaxes(2, 1).reshape(k, k)  # transformers' reverse permute
    sources = read_source_blocks(tmp_path / "m.gguf", heads=(heads, heads))
    model = _matmul_model(restored, k, k)
    assert carry_source_blocks(model, sources, 0) == {"Q8_0": 1}
    with pytest.raises(DyninferError, match="no weight of the exported graph matches"):
        carry_source_blocks(_matmul_model(rng.normal(0, 0.05, (k, k)).astype(np.float32), k, k), sources, 0)

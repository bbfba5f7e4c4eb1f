"""The buffered-KV attention op: its torch reference and ONNX Runtime's GroupQueryAttention it exports to, both
held to a naive attention computed position by position; and the layout's fallback."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from tiny_models import tiny_model

from dyninfer.core.errors import DyninferError
from dyninfer.core.layered import LayeredModel
from dyninfer.core.lenses import LogitLens
from dyninfer.core.policies import ExitPolicy
from dyninfer.exporters import attention
from dyninfer.exporters.onnx_export import choose_kv_layout, kv_geometry
from dyninfer.exporters.step import buffered_step_problem
from dyninfer.runtime.dynamic import DynamicModel

HEADS, KV_HEADS, DIM, CAPACITY, SCALE = 4, 2, 8, 24, 0.3
STEPS = (6, 1, 3, 1, 1)  # a prompt, then single tokens and a multi-token step on a filled buffer


def _naive(queries, keys, values, window, softcap):
    """Attention of the last len(queries) positions over all keys, one query and head at a time (numpy, fp64)."""
    total, new = len(keys), len(queries)
    out = np.zeros((new, HEADS, queries.shape[-1]))
    for i in range(new):
        position = total - new + i
        seen = [j for j in range(position + 1) if window <= 0 or j > position - window]
        for head in range(HEADS):
            kv = head // (HEADS // KV_HEADS)
            scores = np.array([queries[i, head] @ keys[j, kv] * SCALE for j in seen])
            if softcap > 0:
                scores = softcap * np.tanh(scores / softcap)
            weights = np.exp(scores - scores.max())
            out[i, head] = (weights / weights.sum()) @ values[seen, kv]
    return out.reshape(new, -1)


class _Attention(torch.nn.Module):
    def __init__(self, window: int, softcap: float):
        super().__init__()
        self.window, self.softcap = window, softcap

    def forward(self, query, key, value, past_key, past_value, seqlens_k, total_length):
        return attention.group_query_attention(
            query, key, value, past_key, past_value, seqlens_k, total_length, HEADS, KV_HEADS, SCALE, self.softcap, self.window
        )


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    """(window, softcap) -> an ONNX Runtime session of the op exported through dyninfer's translation."""
    from torch.export import Dim

    made = {}

    def session(window: int, softcap: float):
        if (window, softcap) not in made:
            path = tmp_path_factory.mktemp("gqa") / "attention.onnx"
            new = Dim("new", min=1, max=64)
            args = _inputs(np.zeros((2, KV_HEADS, CAPACITY, DIM), np.float32), np.random.default_rng(0), 2, 5)
            shapes = ({1: new}, {1: new}, {1: new}, None, None, None, None)
            program = torch.onnx.export(
                _Attention(window, softcap),
                tuple(torch.from_numpy(a) for a in args),
                dynamic_shapes=shapes,
                custom_translation_table=attention.translation_table(),
                dynamo=True,
            )
            program.save(str(path))
            made[window, softcap] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return made[window, softcap]

    return session


def _inputs(buffers: np.ndarray, rng, filled: int, new: int):
    """query, key, value for `new` positions after `filled`, the buffers, and the lengths."""
    query, key, value = (rng.standard_normal((1, new, heads * DIM)).astype(np.float32) for heads in (HEADS, KV_HEADS, KV_HEADS))
    total = filled + new
    return query, key, value, buffers[0:1], buffers[1:2], np.array([total - 1], np.int32), np.array(total, np.int32)


@pytest.mark.parametrize(("window", "softcap"), [(0, 0.0), (3, 0.0), (5, 2.0), (0, 1.5)])
def test_reference_and_onnx_runtime_attend_like_naive_attention_over_a_shared_buffer(window, softcap, sessions):
    """ONNX Runtime writes the new K/V into the very buffer bound as past and present; the reference returns it."""
    session = sessions(window, softcap)
    rng = np.random.default_rng(1)
    buffers = [ort.OrtValue.ortvalue_from_numpy(np.zeros((1, KV_HEADS, CAPACITY, DIM), np.float32)) for _ in range(2)]
    reference = [torch.zeros(1, KV_HEADS, CAPACITY, DIM) for _ in range(2)]
    keys, values, filled = np.zeros((0, KV_HEADS, DIM)), np.zeros((0, KV_HEADS, DIM)), 0
    names = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    binding = session.io_binding()
    for new in STEPS:
        query, key, value, _, _, seqlens, total = _inputs(np.zeros((2, 1)), rng, filled, new)
        keys = np.concatenate([keys, key[0].reshape(new, KV_HEADS, DIM)])
        values = np.concatenate([values, value[0].reshape(new, KV_HEADS, DIM)])
        expected = _naive(query[0].reshape(new, HEADS, DIM).astype(np.float64), keys, values, window, softcap)
        for name, array in zip(names, (query, key, value)):
            binding.bind_cpu_input(name, array)
        binding.bind_cpu_input(names[5], seqlens)
        binding.bind_cpu_input(names[6], total)
        for name, buffer in zip(names[3:5], buffers):
            binding.bind_ortvalue_input(name, buffer)
        binding.bind_output(outputs[0], "cpu")
        for name, buffer in zip(outputs[1:], buffers):
            binding.bind_ortvalue_output(name, buffer)
        session.run_with_iobinding(binding)
        np.testing.assert_allclose(binding.get_outputs()[0].numpy()[0], expected, atol=1e-5)
        torch_out, *reference = attention.group_query_attention(
            *(torch.from_numpy(a) for a in (query, key, value)),
            *reference,
            torch.from_numpy(seqlens),
            torch.from_numpy(total),
            HEADS,
            KV_HEADS,
            SCALE,
            softcap,
            window,
        )
        np.testing.assert_allclose(torch_out[0].numpy(), expected, atol=1e-5)
        filled += new
        for buffer, torch_buffer, written in zip(buffers, reference, (keys, values)):
            held = buffer.numpy()[0].transpose(1, 0, 2)  # [positions, kv heads, dim]
            np.testing.assert_allclose(held[:filled], written, atol=0)
            assert not held[filled:].any()  # nothing written past the filled positions
            np.testing.assert_array_equal(torch_buffer[0].numpy().transpose(1, 0, 2), held)


ROTARY_DIM = 16  # ONNX Runtime's CPU kernel rotates heads of a multiple of 16 dimensions


class _RotaryAttention(torch.nn.Module):
    def forward(self, query, key, value, past_key, past_value, seqlens_k, total_length, cos, sin):
        return attention.group_query_attention(
            query, key, value, past_key, past_value, seqlens_k, total_length, HEADS, KV_HEADS, SCALE, 0.0, 0, cos, sin
        )


def _rotate_half(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """[positions, heads, D] rotated as Llama does: x * cos + rotate_half(x) * sin, the tables repeated over both halves."""
    first, second = np.split(x, 2, axis=-1)
    c, s = np.concatenate([cos, cos], -1)[:, None], np.concatenate([sin, sin], -1)[:, None]
    return x * c + np.concatenate([-second, first], -1) * s


def test_attention_that_rotates_equals_rotating_first_then_attending(tmp_path):
    """With rotary tables (do_rotary), the reference and ONNX Runtime rotate queries and keys by their positions' rows,
    and the buffers hold rotated keys: naive attention over keys rotated in numpy, over a prompt and two more steps."""
    from torch.export import Dim

    rng = np.random.default_rng(2)
    angles = np.arange(CAPACITY)[:, None] * (10000.0 ** (-np.arange(ROTARY_DIM // 2) / (ROTARY_DIM // 2)))[None]
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    empty = np.zeros((1, KV_HEADS, CAPACITY, ROTARY_DIM), np.float32)
    example = [rng.standard_normal((1, 3, h * ROTARY_DIM)).astype(np.float32) for h in (HEADS, KV_HEADS, KV_HEADS)]
    example += [empty, empty, np.array([2], np.int32), np.array(3, np.int32), cos, sin]
    new = Dim("new", min=1, max=64)
    program = torch.onnx.export(
        _RotaryAttention(),
        tuple(torch.from_numpy(a) for a in example),
        dynamic_shapes=({1: new}, {1: new}, {1: new}, None, None, None, None, None, None),
        custom_translation_table=attention.translation_table(),
        dynamo=True,
    )
    program.save(str(tmp_path / "rotary.onnx"))
    session = ort.InferenceSession(str(tmp_path / "rotary.onnx"), providers=["CPUExecutionProvider"])
    (node,) = [n for n in onnx.load(str(tmp_path / "rotary.onnx")).graph.node if n.op_type == "GroupQueryAttention"]
    assert {a.name: a.i for a in node.attribute}["do_rotary"] == 1  # the kernel rotates, not ops around it
    past = {"ort": [empty, empty], "torch": [torch.from_numpy(empty)] * 2}
    keys, values, filled = np.zeros((0, KV_HEADS, ROTARY_DIM)), np.zeros((0, KV_HEADS, ROTARY_DIM)), 0
    for step in (5, 1, 2):
        query, key, value = (rng.standard_normal((1, step, h * ROTARY_DIM)).astype(np.float32) for h in (HEADS, KV_HEADS, KV_HEADS))
        total = filled + step
        lengths = np.array([total - 1], np.int32), np.array(total, np.int32)
        rows = slice(filled, total)
        keys = np.concatenate([keys, _rotate_half(key[0].reshape(step, KV_HEADS, ROTARY_DIM), cos[rows], sin[rows])])
        values = np.concatenate([values, value[0].reshape(step, KV_HEADS, ROTARY_DIM)])
        queries = _rotate_half(query[0].reshape(step, HEADS, ROTARY_DIM), cos[rows], sin[rows])
        expected = _naive(queries.astype(np.float64), keys, values, 0, 0.0)
        feeds = dict(zip([i.name for i in session.get_inputs()], (query, key, value, *past["ort"], *lengths, cos, sin)))
        out, *past["ort"] = session.run(None, feeds)
        torch_out, *past["torch"] = attention.group_query_attention(
            *(torch.from_numpy(a) for a in (query, key, value)),
            *past["torch"],
            *(torch.from_numpy(a) for a in lengths),
            HEADS,
            KV_HEADS,
            SCALE,
            0.0,
            0,
            torch.from_numpy(cos),
            torch.from_numpy(sin),
        )
        filled = total
        np.testing.assert_allclose(out[0], expected, atol=1e-4)
        np.testing.assert_allclose(torch_out[0].numpy(), expected, atol=1e-4)
        for held in (past["ort"][0][0], past["torch"][0][0].numpy()):  # [kv heads, capacity, D]: rotated keys
            np.testing.assert_allclose(held.transpose(1, 0, 2)[:filled], keys, atol=1e-5)


def _dynamic(model) -> DynamicModel:
    lm = LayeredModel(model)
    return DynamicModel(lm, ExitPolicy("logit", "saturation", [1], 0.5, 0, "propagate"), LogitLens(lm), None)


def test_buffered_step_reproduces_the_concatenated_one():
    dynamic = _dynamic(tiny_model("mistral", layers=2))  # a sliding window of 8, passed by the 10 positions
    geometry = kv_geometry(dynamic.lm)
    assert buffered_step_problem(dynamic, geometry) is None
    assert choose_kv_layout(dynamic, geometry, "cpu", "fp32") == ("buffer", None)


def test_attention_the_contrib_op_cannot_compute_falls_back_to_the_concatenated_cache():
    model = tiny_model("llama", layers=2)
    model.model.layers[1].self_attn.is_causal = False  # the concatenated step's masks still make it causal
    dynamic = _dynamic(model)
    geometry = kv_geometry(dynamic.lm)
    problem = buffered_step_problem(dynamic, geometry)
    assert problem is not None and "causal" in problem
    layout, note = choose_kv_layout(dynamic, geometry, "cpu", "fp32")
    assert layout == "concat" and problem in note
    with pytest.raises(DyninferError, match="does not fit this model") as refused:
        choose_kv_layout(dynamic, geometry, "cpu", "fp32", "buffer")
    assert "--kv-layout concat" in str(refused.value) or "kv_layout" in str(refused.value)


def test_fp32_on_cuda_keeps_the_concatenated_cache():
    """ONNX Runtime's CUDA kernel of the op is fp16/bf16 only: an fp32 CUDA package would run it on the CPU."""
    dynamic = _dynamic(tiny_model("llama", layers=2))
    geometry = kv_geometry(dynamic.lm)
    layout, note = choose_kv_layout(dynamic, geometry, "cuda", "fp32")
    assert layout == "concat" and "fp16" in note
    assert choose_kv_layout(dynamic, geometry, "cuda", "fp16")[0] == "buffer"


def test_a_buffered_step_that_computes_otherwise_is_caught(monkeypatch):
    """The check compares logits, so a family whose attention the buffered route gets wrong keeps the old layout."""
    attend = attention.BufferedCache.attend
    monkeypatch.setattr(attention.BufferedCache, "attend", lambda self, *args: attend(self, *args) * 1.01)
    dynamic = _dynamic(tiny_model("qwen2", layers=2))
    problem = buffered_step_problem(dynamic, kv_geometry(dynamic.lm))
    assert problem is not None and "differ" in problem

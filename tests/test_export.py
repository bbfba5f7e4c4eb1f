"""ONNX export: the package against the torch dynamic model, per architecture, and its custom ops."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from families import family_model
from onnx import TensorProto, helper
from tiny_models import ARCHS, VOCAB, tiny_model

from dyninfer.core.choices import HEAD_MEASURES
from dyninfer.core.errors import DyninferError
from dyninfer.core.layered import LayeredModel
from dyninfer.core.lenses import ExitTranslators, LogitLens, TunedLens
from dyninfer.core.policies import ExitPolicy
from dyninfer.early_exit import confidence as conf
from dyninfer.early_exit.confidence import ExitClassifier
from dyninfer.exporters import ops
from dyninfer.exporters.graph_tidy import all_graphs
from dyninfer.exporters.onnx_export import write_package
from dyninfer.runtime.dynamic import DynamicModel
from dyninfer.runtime.onnx_decoder import OnnxDecoder
from dyninfer.runtime.package_format import MODEL_FILE, PACKAGE_MANIFEST

STEPS = 32
ATTENTION_ARCHS = [a for a in ARCHS if a != "mamba"]
# The architectures exported with another confidence measure than saturation: (measure, vocabulary top-k).
# These two hold the exit logic between several exit points (3 layers, exits after 1 and 2); every other
# family is held to it on 2 layers with one exit point, which covers its own layer (tracing costs seconds
# a layer, and each exit point adds a branch).
OTHER_MEASURES = {"llama": ("classifier", 0), "qwen2": ("softmax", 16)}
ONE_EXIT = {"points": (1,)}
# Heads of 16 dimensions: ONNX Runtime's attention rotates them itself, so the parity tests cover the rotary fusion;
# Qwen2 keeps heads of 8 (tiny_models' default), where the rotary must stay plain ops with a note.
FUSED_HEAD_DIM = 16
PLAIN_ROTARY = "qwen2"


def _random_tuned_lens(lm: LayeredModel) -> TunedLens:
    lens = TunedLens(lm)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        lens.weight.normal_(std=0.05, generator=generator)
        lens.bias.normal_(std=0.05, generator=generator)
    return lens


def _dynamic(arch: str, measure: str = "saturation", top_k: int = 0, points=(1, 2), model=None, tuned: bool = False):
    """A dynamic model whose threshold makes some steps exit early and others run the full depth."""
    model = model if model is not None else tiny_model(arch, layers=3, head_dim=_head_dim(arch))
    lm = LayeredModel(model)
    lens = _random_tuned_lens(lm) if tuned else LogitLens(lm)
    prompt = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(5))
    classifier = None
    if measure == "classifier":
        classifier = ExitClassifier(len(points), lm.hidden_size)
        torch.nn.init.normal_(classifier.weight, std=0.5, generator=torch.Generator().manual_seed(1))
    low, high = -1.0, 1.0 + 1e-6
    for _ in range(40):  # more steps run deep as the threshold rises: bisect on it
        threshold = (low + high) / 2
        policy = ExitPolicy("logit", measure, list(points), threshold, top_k, "propagate")
        dynamic = DynamicModel(lm, policy, lens, classifier)
        run = dynamic.generate(prompt, STEPS)
        deep = sum(e == lm.num_layers for e in run.exit_layers[1:])
        if 3 <= deep <= STEPS - 4:
            return dynamic, prompt
        low, high = (threshold, high) if deep < 3 else (low, threshold)
    raise AssertionError(f"no {measure} threshold gives mixed exits for {arch}")


def _head_dim(arch: str) -> int:
    return 8 if arch == PLAIN_ROTARY else FUSED_HEAD_DIM


# Families whose layout leaves a fusion nothing to do, and why.
PACKED_PROJECTIONS = {"phi3": "its checkpoints already pack q/k/v and gate/up into one matrix each"}
POST_NORMS = {"olmo2": "it norms each sublayer's output before the residual add, so no add feeds a norm"}


def _assert_fused(manifest, family: str, rotary: bool) -> None:
    """Every norm of these families runs as ONNX Runtime's fused kernels, with the residual add where the add feeds the
    norm, sibling projections as one MatMul, and the rotary inside attention (`rotary`) or as plain ops with a note."""
    fused = manifest.fusions
    assert fused["rms_norm"] > 0 and not fused["norms_left_unfused"], fused
    assert (fused["skip_rms_norm"] > 0) != (family in POST_NORMS), fused
    assert (fused["merged_matmuls"] > 0) != (family in PACKED_PROJECTIONS), fused
    assert fused["rotary_in_attention"] is rotary, (fused, manifest.notes)
    assert rotary or any("rotary embedding runs as plain ops" in note for note in manifest.notes), manifest.notes


def _assert_parity(dynamic: DynamicModel, prompt, package, kv_layout: str = "buffer") -> None:
    runtime = OnnxDecoder(package, provider="cpu")
    assert runtime.manifest.kv_layout == kv_layout, runtime.manifest.notes  # every family exported here fits the buffers
    reference = dynamic.generate(prompt, STEPS, return_logits=True)
    ours = runtime.generate(prompt.numpy(), STEPS, return_logits=True)
    assert np.array_equal(ours.tokens, reference.tokens.numpy())
    assert ours.exit_layers == reference.exit_layers
    assert len(set(reference.exit_layers[1:])) > 1  # the comparison covers exits and full-depth steps
    for a, b in zip(ours.logits, reference.logits):  # -inf outside the candidates with vocab top-k
        np.testing.assert_allclose(a, b.numpy(), atol=1e-3, rtol=0)
    for c_ours, c_ref in zip(ours.confidences, reference.confidences):
        assert (c_ours is None) == (c_ref is None)
        if c_ref is not None:
            assert abs(c_ours - c_ref) < 1e-4
    full_ref = dynamic.generate(prompt, STEPS, mode="full")
    full = runtime.generate(prompt.numpy(), STEPS, mode="full")
    assert np.array_equal(full.tokens, full_ref.tokens.numpy())
    assert full.exit_layers == [dynamic.lm.num_layers] * STEPS


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """arch -> (dynamic model, prompt, package dir), each exported once for the tests that read it."""
    packages = {}

    def export(arch: str):
        if arch not in packages:
            if arch in OTHER_MEASURES:
                dynamic, prompt = _dynamic(arch, *OTHER_MEASURES[arch])
            else:
                dynamic, prompt = _dynamic(arch, model=tiny_model(arch, layers=2, head_dim=_head_dim(arch)), **ONE_EXIT)
            path = tmp_path_factory.mktemp(f"onnx-{arch}")
            write_package(path, dynamic)
            packages[arch] = dynamic, prompt, path
        return packages[arch]

    return export


@pytest.mark.slow
@pytest.mark.parametrize("arch", [a for a in ATTENTION_ARCHS if a not in OTHER_MEASURES])
def test_onnx_dynamic_model_equals_torch(arch, exported):
    """Llama and Qwen2 are checked the same way below, with the other confidence measures (one export each)."""
    dynamic, prompt, package = exported(arch)
    _assert_parity(dynamic, prompt, package)
    if arch != "gpt2":  # LayerNorm with a bias: not an RMS norm, and no rotary; its plain ops are checked above
        _assert_fused(OnnxDecoder(package, provider="cpu").manifest, arch, rotary=True)


# Families recognised by structure, exported and held to the torch dynamic model like the ones above (the
# named families, Llama and Qwen2 included, count towards the families that export).
EXPORTED_FAMILIES = ("qwen3", "phi3", "gemma2", "olmo2", "granite")


@pytest.mark.slow
@pytest.mark.parametrize("model_type", EXPORTED_FAMILIES)
def test_families_recognised_by_structure_export_like_torch(model_type, tmp_path):
    dynamic, prompt = _dynamic(model_type, model=family_model(model_type, layers=2, head_dim=FUSED_HEAD_DIM), **ONE_EXIT)
    write_package(tmp_path, dynamic)
    _assert_parity(dynamic, prompt, tmp_path)
    _assert_fused(OnnxDecoder(tmp_path, provider="cpu").manifest, model_type, rotary=True)


@pytest.mark.slow
@pytest.mark.xdist_group("export-llama")  # with the saved-graph test: one export of the llama package
@pytest.mark.parametrize("arch", OTHER_MEASURES)
def test_onnx_equals_torch_for_other_confidence_measures(arch, exported):
    """The classifier reads the hidden state; softmax uses the head and, with top-k, the candidates."""
    dynamic, prompt, package = exported(arch)
    _assert_parity(dynamic, prompt, package)
    _assert_fused(OnnxDecoder(package, provider="cpu").manifest, arch, rotary=arch != PLAIN_ROTARY)
    if dynamic.policy.measure == "softmax":
        manifest = json.loads((package / PACKAGE_MANIFEST).read_text())
        assert manifest["custom_ops"]["nodes"] == {"ExitGate": 2, "SoftmaxConfidence": 2}


@pytest.mark.slow
@pytest.mark.xdist_group("export-llama")
def test_saved_graph_keeps_custom_nodes_with_standard_op_functions(exported):
    dynamic, _, package = exported("llama")
    model = onnx.load(str(package / MODEL_FILE), load_external_data=False)
    gates = [n for n in ops.custom_nodes(model) if n.op_type == "ExitGate"]
    assert len(gates) == len(dynamic.policy.exit_points)
    assert all(n.domain == ops.DOMAIN for n in gates)
    functions = {(f.domain, f.name): f for f in model.functions}
    assert (ops.DOMAIN, "ExitGate") in functions
    for function in functions.values():  # bodies are standard ONNX: no library needed
        assert all(node.domain in ("", "ai.onnx") for node in function.node)
    assert any(o.domain == ops.DOMAIN for o in model.opset_import)

    assert _op_count(model.graph, "If") == len(dynamic.policy.exit_points)  # one run-or-propagate branch per segment
    import onnxruntime as ort

    session = ort.InferenceSession(str(package / MODEL_FILE), providers=["CPUExecutionProvider"])
    assert session.get_providers() == ["CPUExecutionProvider"]


def _op_count(graph, op_type: str) -> int:
    return sum(node.op_type == op_type for g in all_graphs(graph) for node in g.node)


@pytest.mark.slow
@pytest.mark.xdist_group("export-llama")
def test_buffered_package_writes_each_layer_buffer_in_place(exported):
    """One buffer a layer, bound as past and present: ONNX Runtime writes the prompt's keys into it (the model's own,
    from transformers' forward), nothing past them, and allocates no present of its own."""
    from transformers import DynamicCache

    dynamic, prompt, package = exported("llama")
    runtime = OnnxDecoder(package, provider="cpu")
    assert runtime.buffered and runtime.manifest.inputs[2] == "positions"
    model = onnx.load(str(package / MODEL_FILE), load_external_data=False)
    # one per layer run, one per layer a branch fills by propagation
    assert _op_count(model.graph, "GroupQueryAttention") == 2 * dynamic.lm.num_layers - dynamic.policy.exit_points[0]
    length = prompt.shape[1]
    state, step = runtime.prefill(prompt.numpy(), length + 3, logits=True, scores=True)
    past = state.past
    assert [tuple(value.shape()) for value in past] == [(1, h, length + 3, d) for h, d in runtime.manifest.kv_geometry for _ in range(2)]
    present = [value for name, value in zip(runtime.output_names, state.binding.get_outputs()) if name.startswith("present.")]
    assert [value.data_ptr() for value in present] == [value.data_ptr() for value in past]
    assert step.token.shape == (1,) and step.token[0] == step.logits.argmax(-1)[0]
    # greedy decoding leaves the logits where ONNX Runtime put them: only the graph's argmax comes back
    _, greedy_only = runtime.prefill(prompt.numpy(), length + 3, logits=False, scores=False)
    assert greedy_only.logits is None and greedy_only.token[0] == step.token[0]
    cache = DynamicCache()
    with torch.no_grad():
        dynamic.lm.model(prompt, past_key_values=cache, use_cache=True)
    for index, layer in enumerate(cache.layers):
        for buffer, expected in zip(past[2 * index : 2 * index + 2], (layer.keys, layer.values)):
            np.testing.assert_allclose(buffer.numpy()[:, :, :length], expected.numpy(), atol=1e-5)
            assert not buffer.numpy()[:, :, length:].any()


@pytest.mark.slow
def test_concatenated_cache_layout_still_exports_like_torch(tmp_path):
    dynamic, prompt = _dynamic("llama", model=tiny_model("llama", layers=2), **ONE_EXIT)
    manifest = write_package(tmp_path, dynamic, kv_layout="concat")
    assert manifest.kv_layout == "concat" and "positions" not in manifest.inputs
    assert _op_count(onnx.load(str(tmp_path / MODEL_FILE), load_external_data=False).graph, "GroupQueryAttention") == 0
    _assert_parity(dynamic, prompt, tmp_path, kv_layout="concat")


@pytest.mark.slow
def test_a_tuned_lens_package_stores_only_its_exits_translators(tmp_path):
    """All L translators stacked would be stored (and left unquantized) for the few the exits read."""
    dynamic, prompt = _dynamic("qwen2", "softmax", points=(1,), model=tiny_model("qwen2", layers=3), tuned=True)
    write_package(tmp_path, dynamic)
    _assert_parity(dynamic, prompt, tmp_path)
    model = onnx.load(str(tmp_path / MODEL_FILE), load_external_data=False)
    hidden = dynamic.lm.hidden_size
    stored = sorted(list(t.dims) for t in model.graph.initializer if t.name.startswith("exit_heads."))
    assert stored == [[hidden], [hidden, hidden]]  # exit 1's translator alone, not the [3, d, d] stack


def test_a_package_of_format_2_still_runs_like_the_torch_model():
    """A package written by an earlier release (format 2: the KV cache concatenated each step, no next_token output;
    tests/fixtures/package-format-2/README.md) loads and decodes as today's torch dynamic model does."""
    from pathlib import Path

    runtime = OnnxDecoder(Path(__file__).parent / "fixtures" / "package-format-2", provider="cpu")
    assert runtime.manifest.version == 2 and runtime.manifest.kv_layout == "concat" and not runtime.greedy_output
    lm = LayeredModel(tiny_model("llama", layers=3))
    dynamic = DynamicModel(lm, runtime.manifest.policy, LogitLens(lm))
    prompt = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(5))
    reference = dynamic.generate(prompt, 24, return_logits=True)
    ours = runtime.generate(prompt.numpy(), 24, return_logits=True)
    assert np.array_equal(ours.tokens, reference.tokens.numpy()) and ours.exit_layers == reference.exit_layers
    assert len(set(reference.exit_layers[1:])) > 1  # exits and full-depth steps both compared
    for a, b in zip(ours.logits, reference.logits):
        np.testing.assert_allclose(a, b.numpy(), atol=1e-3, rtol=0)


def test_exit_translators_translate_as_the_lens_does():
    lm = LayeredModel(tiny_model("llama", layers=4))
    lens = _random_tuned_lens(lm)
    kept = ExitTranslators(lens, [3, 1, 4])  # index 4 is the model's output: no translator
    hidden = torch.randn(2, lm.hidden_size, generator=torch.Generator().manual_seed(0))
    for index in (1, 3, 4):
        torch.testing.assert_close(kept.translate(index, hidden), lens.translate(index, hidden), rtol=0, atol=1e-6)
    assert sum(p.numel() for p in kept.parameters()) == 2 * (lm.hidden_size**2 + lm.hidden_size)
    with pytest.raises(KeyError):
        kept.translate(2, hidden)


def _run_function(name: str, inputs: dict[str, np.ndarray], n_outputs: int = 1):
    """Run one `ai.dyninfer` op alone through ONNX Runtime (the function inlined by ORT)."""
    import onnxruntime as ort

    input_names, output_names = ops._SIGNATURES[name]
    node = helper.make_node(name, list(input_names), list(output_names), domain=ops.DOMAIN)
    graph = helper.make_graph(
        [node],
        "one_op",
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, list(v.shape)) for k, v in inputs.items()],
        [onnx.ValueInfoProto(name=o) for o in output_names],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    ops.add_function_definitions(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, inputs)[0]


@pytest.mark.parametrize("measure", HEAD_MEASURES)
def test_confidence_functions_equal_the_torch_measures(measure):
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(2)) * 3
    name = {"softmax": "SoftmaxConfidence", "margin": "MarginConfidence", "entropy": "EntropyConfidence"}[measure]
    ours = _run_function(name, {"logits": logits.numpy()})
    np.testing.assert_allclose(ours, conf.from_logits(measure, logits).numpy(), atol=1e-5)
    np.testing.assert_allclose(ops.LOGIT_CONFIDENCE[measure](logits).numpy(), ours, atol=1e-5)


@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.81])
def test_exit_gate_decides_on_the_batch_minimum(threshold):
    confidence = np.array([0.9, 0.5, 0.8], dtype=np.float32)
    ours = _run_function("ExitGate", {"confidence": confidence, "threshold": np.array(threshold, np.float32)})
    assert bool(ours) == (confidence.min() >= threshold)
    assert bool(ops.exit_gate(torch.from_numpy(confidence), torch.tensor(threshold))) == bool(ours)


def test_unexportable_models_are_refused(tmp_path):
    lm = LayeredModel(tiny_model("mamba", layers=2))
    policy = ExitPolicy("logit", "saturation", [1], 0.5, 0, "propagate")
    with pytest.raises(DyninferError, match="recurrent"):
        write_package(tmp_path, DynamicModel(lm, policy, LogitLens(lm)))
    lm = LayeredModel(tiny_model("llama", layers=2))
    recompute = ExitPolicy("logit", "saturation", [1], 0.5, 0, "recompute")
    with pytest.raises(DyninferError, match="`kv_mode` propagate"):
        write_package(tmp_path, DynamicModel(lm, recompute, LogitLens(lm)))
    with pytest.raises(DyninferError, match="fp16"):
        write_package(tmp_path, DynamicModel(lm, policy, LogitLens(lm)), provider="cpu", dtype="fp16")
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_fp16_package_for_cuda_stores_half_weights_and_runs(tmp_path):
    """Built here for another machine (--provider cuda --no-verify); ONNX Runtime's CPU EP still runs it."""
    dynamic, prompt = _dynamic("llama", model=tiny_model("llama", layers=2), **ONE_EXIT)
    manifest = write_package(tmp_path, dynamic, provider="cuda", dtype="fp16")
    assert manifest.dtype == "fp16" and manifest.provider == "cuda"
    model = onnx.load(str(tmp_path / MODEL_FILE), load_external_data=False)
    matrices = [i for i in model.graph.initializer if len(i.dims) == 2]
    assert matrices and all(i.data_type == TensorProto.FLOAT16 for i in matrices)
    runtime = OnnxDecoder(tmp_path, provider="cpu")
    ours = runtime.generate(prompt.numpy(), 4, mode="full", return_logits=True)
    reference = dynamic.generate(prompt, 4, mode="full", return_logits=True)
    assert ours.logits[0].dtype == np.float16
    np.testing.assert_allclose(ours.logits[0].astype(np.float32), reference.logits[0].numpy(), atol=5e-2)


@pytest.mark.slow
@pytest.mark.xdist_group("export-llama")
def test_the_package_obeys_stop_rules_as_the_torch_runtime_does(exported):
    """The package's stop output scores each token as torch does, and both runtimes stop completions and answer
    chains of thought at the same step, in the early-exit and the full mode."""
    from dyninfer.compressors.stop_obey import CompletionStopper, ProbeVocabulary, ReasoningStopper
    from dyninfer.core.choices import COMPLETION, REASONING
    from dyninfer.core.policies import StopPolicy

    dynamic, prompt, package = exported("llama")
    runtime = OnnxDecoder(package, provider="cpu")
    # A random model's chain repeats a few ids: those end steps (the first one lines), so probes happen, and every
    # other id spells a digit, so they read answers.
    chain = [int(t) for t in dynamic.generate(prompt, STEPS, mode="full").tokens[0]]
    boundaries = frozenset(chain) - {3, 4, 5}
    numbers = {i: str(i % 10) for i in range(6, VOCAB) if i not in boundaries}
    vocabulary = ProbeVocabulary(boundaries, numbers, frozenset({5}), [3, 4], frozenset({chain[0]}) & boundaries)
    reasons = set()
    for mode in ("early-exit", "full"):
        full = dynamic.generate(prompt, STEPS, mode=mode, return_scores=True)
        confidence = [float(s[0]) for s in full.stop_scores]
        for threshold in np.quantile(confidence, [0.2, 0.6]):
            policy = StopPolicy(COMPLETION, "confidence", float(threshold), 0.9, 0.1, STEPS)
            ours = runtime.generate(prompt.numpy(), STEPS, mode=mode, stop=CompletionStopper(policy))
            reference = dynamic.generate(prompt, STEPS, mode=mode, stop=CompletionStopper(policy))
            assert np.array_equal(ours.tokens, reference.tokens.numpy()) and ours.stop == reference.stop
            reasons.add(ours.stop["reason"])
        recorder = ReasoningStopper(
            StopPolicy(REASONING, "confidence", None, 0.9, 0.1, STEPS, probe_tokens=3), vocabulary, record_only=True
        )
        chain = dynamic.generate(prompt, STEPS, mode=mode, stop=recorder).tokens[0]
        for probe_at in ("sentences", "lines"):
            sites = vocabulary.sites(probe_at)
            confident = sorted({t.confidence for b, t in recorder.probes if t.ids and int(chain[b - 1]) in sites})
            assert confident, "no probe read an answer: the comparison would be empty"
            threshold = confident[len(confident) // 2]
            policy = StopPolicy(REASONING, "confidence", threshold, 0.9, 0.1, STEPS, probe_tokens=3, probe_at=probe_at)
            ours = runtime.generate(prompt.numpy(), STEPS, mode=mode, stop=ReasoningStopper(policy, vocabulary))
            reference = dynamic.generate(prompt, STEPS, mode=mode, stop=ReasoningStopper(policy, vocabulary))
            assert np.array_equal(ours.tokens, reference.tokens.numpy()) and ours.stop == reference.stop
            reasons.add(ours.stop["reason"])
    assert {"rule", "answered"} <= reasons

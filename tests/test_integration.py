"""Integration: the bundled SmolLM2-135M on built-in corpora (small inputs)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from dyninfer.cli.app import app
from dyninfer.core.data import load_windows
from dyninfer.core.layered import LayeredModel
from dyninfer.core.lenses import LogitLens, collect_hidden_states, mean_kl_per_layer, train_tuned_lens
from dyninfer.core.models import load_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bundled():
    return load_model("default")


def test_probe_runs_on_the_bundled_model_offline():
    # One window of 128 tokens: the lens runs the 49k-row head at every layer, the cost of this test.
    result = CliRunner().invoke(app, ["probe", "--tokens", "128", "--seq-len", "128", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["model"]["architecture"] == "llama" and summary["model"]["num_layers"] == 30
    logit = summary["lenses"]["logit"]
    assert len(logit["agreement"]) == 31 and logit["agreement"][-1] == 1.0
    # A real model gets well above chance on Python docs, and its late layers agree more than early ones.
    assert logit["accuracy"][-1] > 0.2
    assert logit["agreement"][28] > logit["agreement"][10]
    # The head costs about as much as 8 decoder layers on this model (docs/profile.md).
    costs = summary["cost_model"]
    assert 6 < costs["head"] / (sum(costs["layers"]) / len(costs["layers"])) < 9
    assert summary["placement"] == {"device": "cpu", "dtype": "float32"}
    assert summary["memory"]["peak_rss_mib"] > summary["memory"]["weights_mib"] > 400  # 135M float32 weights

    # The same probe in bfloat16. bfloat16 keeps 8 significant bits (a relative rounding of 2^-9 per weight
    # and activation); through 30 layers that moves logits by about a percent, so a token's top-1 changes
    # only where its two best logits nearly tie (measured: 1 to 3% of the tokens at a layer). Tolerances: per
    # layer, agreement and accuracy within 0.05 (6 of these 128 tokens), KL within 0.05 nats plus 5%, the
    # oracle saving within 0.03.
    result = CliRunner().invoke(app, ["probe", "--tokens", "128", "--seq-len", "128", "--dtype", "bfloat16", "--json"])
    assert result.exit_code == 0, result.output
    half = json.loads(result.stdout)
    assert half["placement"] == {"device": "cpu", "dtype": "bfloat16"}
    assert half["memory"]["weights_mib"] == pytest.approx(summary["memory"]["weights_mib"] / 2, rel=0.01)
    low = half["lenses"]["logit"]
    for name in ("agreement", "accuracy"):
        assert max(abs(a - b) for a, b in zip(logit[name], low[name])) <= 0.05, name
    assert all(abs(a - b) <= 0.05 + 0.05 * a for a, b in zip(logit["kl"], low["kl"]))
    assert low["oracle"]["saving"] == pytest.approx(logit["oracle"]["saving"], abs=0.03)


def test_tuned_lens_reduces_kl_on_unseen_text(bundled):
    """Trained on stdlib code (not the corpus defaults were chosen on), judged on held-out code. Small: each
    KL pass runs the 49k-row head at 30 layers (measured: the tuned lens keeps a fifth of the KL here)."""
    torch.manual_seed(0)
    lm = bundled.layered
    windows = load_windows("builtin:stdlib-code", bundled.tokenizer, seq_len=64, seed=1)
    lens, _ = train_tuned_lens(lm, windows.take("train", 1536), steps=3, seed=1, validation_tokens=64)
    held = collect_hidden_states(lm, windows.take("heldout", 64))
    with torch.no_grad():
        logit_kl = mean_kl_per_layer(LogitLens(lm), lm, held)
        tuned_kl = mean_kl_per_layer(lens, lm, held)
    middle = range(5, 29)
    assert sum(tuned_kl[i] for i in middle) < 0.5 * sum(logit_kl[i] for i in middle)
    assert all(tuned_kl[i] < logit_kl[i] for i in middle)


def test_bundled_model_exports_to_onnx_and_matches_torch(bundled, tmp_path):
    """The real model's weights and conventions (GQA, tied head, SDPA, a 49k vocabulary) through the exporter:
    same tokens, exits and logits. Its first 4 of 30 layers keep the suite's time (tracing costs ~6 s a
    layer); the tiny models of every family cover the rest of the depth logic."""
    import copy

    import numpy as np

    from dyninfer.core.policies import ExitPolicy
    from dyninfer.early_exit.confidence import saturation
    from dyninfer.exporters.onnx_export import write_package
    from dyninfer.runtime.dynamic import DynamicModel
    from dyninfer.runtime.onnx_decoder import OnnxDecoder

    model = copy.deepcopy(bundled.model)  # the head stays tied to the embedding in the copy
    model.model.layers = model.model.layers[:4]
    model.config.num_hidden_layers = 4
    lm = LayeredModel(model)
    assert lm.lm_head.weight is lm.backbone.embed_tokens.weight
    prompt = bundled.tokenizer("The with statement wraps a block of code", return_tensors="pt").input_ids
    points = [2, 3]
    with torch.no_grad():
        states = dict(lm.hidden_states(prompt))
    values = torch.cat([saturation(states[p - 1][0], states[p][0]) for p in points])
    for quantile in (0.5, 0.3, 0.7, 0.2, 0.8):  # a threshold at which some steps exit and some do not
        policy = ExitPolicy("logit", "saturation", points, float(values.quantile(quantile)), 0, "propagate")
        dynamic = DynamicModel(lm, policy, LogitLens(lm))
        reference = dynamic.generate(prompt, 12, return_logits=True)
        if len(set(reference.exit_layers[1:])) > 1:
            break
    assert len(set(reference.exit_layers[1:])) > 1
    write_package(tmp_path, dynamic)
    ours = OnnxDecoder(tmp_path).generate(prompt.numpy(), 12, return_logits=True)
    assert np.array_equal(ours.tokens, reference.tokens.numpy())
    assert ours.exit_layers == reference.exit_layers
    for a, b in zip(ours.logits, reference.logits):
        np.testing.assert_allclose(a, b.numpy(), atol=1e-3, rtol=0)


def test_bundled_model_prunes_to_half_its_mlp_neurons_on_unseen_code(tmp_path):
    """Threshold pruning at 50% on stdlib code (not the corpus the defaults were measured on):
    the target is reached on held-out text, quality stays close, and decoding through the
    numba kernels gives the masked model's tokens."""
    from dyninfer.compressors.pruning import pruned
    from dyninfer.profilers.bench import greedy_generate
    from dyninfer.runtime.loader import load_dynamic

    artifact = tmp_path / "pruned"
    result = CliRunner().invoke(
        app,
        [
            "prune",
            "--data",
            "builtin:stdlib-code",
            "--sparsity",
            "0.5",
            "--calibration-tokens",
            "1024",
            "--heldout-tokens",
            "1024",
            "--no-speed",
            "--out",
            str(artifact),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    main = json.loads(result.stdout)["main"]
    assert abs(main["achieved_sparsity"] - 0.5) <= 0.02
    assert main["perplexity_change"] < 0.10 and main["agreement"] > 0.8
    dyn = load_dynamic(str(artifact), require_policy=False)
    lm = dyn.loaded.layered
    prompt = dyn.loaded.tokenizer("def read_config(path):\n    with open(path) as f:", return_tensors="pt").input_ids
    sparse = greedy_generate(lm.model, prompt, 8)  # installed with the auto backend: numba on this CPU
    with pruned(lm, dyn.pruning, "masked"):
        assert torch.equal(greedy_generate(lm.model, prompt, 8), sparse)


def test_bundled_model_steering_extracts_applies_and_writes_a_control_vector(bundled, tmp_path):
    """Activation steering on the real model: the direction points from long to short chains of
    held-out problems (not those it was extracted from), and the GGUF holds it."""
    import gguf

    from dyninfer.compressors.steer_extract import CotPrompter, chain_means, load_cot_split
    from dyninfer.compressors.steering import Steering
    from dyninfer.core.choices import BUILTIN_COT

    artifact = tmp_path / "steer"
    extracted = CliRunner().invoke(app, ["steer", "extract", "--examples", "9", "--heldout", "6", "--out", str(artifact), "--json"])
    assert extracted.exit_code == 0, extracted.output
    layer = json.loads(extracted.stdout)["layers"][0]
    assert layer == 15
    direction = Steering.from_artifact(
        __import__("dyninfer.core.artifacts", fromlist=["Artifact"]).Artifact.load(str(artifact))
    ).activation.directions[layer]
    train, held = load_cot_split(BUILTIN_COT, 0, 9, 6)
    means = chain_means(bundled, CotPrompter(bundled.tokenizer, []), held, [layer])
    unseen_shift = (means["short"] - means["long"])[:, 0]
    assert torch.nn.functional.cosine_similarity(unseen_shift, direction[None], dim=1).mean() > 0.5
    applied = CliRunner().invoke(app, ["steer", "apply", str(artifact), "--alpha", "0.5", "--json"])
    assert applied.exit_code == 0, applied.output
    reader = gguf.GGUFReader(str(artifact / "control_vector.gguf"))
    (tensor,) = reader.tensors
    assert tensor.name == f"direction.{layer}"
    torch.testing.assert_close(torch.from_numpy(tensor.data.copy()).reshape(-1), 0.5 * direction)
    swept = CliRunner().invoke(
        app, ["steer", "sweep", str(artifact), "--alphas", "0,0.5", "--questions", "2", "--max-new-tokens", "12", "--json"]
    )
    assert swept.exit_code == 0, swept.output
    points = json.loads(swept.stdout)["points"]
    assert [p["alpha"] for p in points] == [0.0, 0.5] and 0 < points[0]["mean_length"] <= 12


def test_audit_of_the_bundled_model_on_unseen_code(bundled, tmp_path):
    """A small audit on stdlib code (not the default corpus): every stage runs on the real model."""
    out = tmp_path / "audit"
    result = CliRunner().invoke(
        app,
        [
            "audit",
            "--data",
            "builtin:stdlib-code",
            "--lens",
            "logit",
            "--tokens",
            "64",
            "--fit-tokens",
            "256",
            "--heldout-tokens",
            "64",
            "--seq-len",
            "64",
            "--prompts",
            "64",
            "--heldout-prompts",
            "4",
            "--prompt-tokens",
            "16",
            "--new-tokens",
            "6",
            "--repeats",
            "3",
            "--targets",
            "",
            "--min-consistency",
            "0.5",
            "--out",
            str(out),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    head = summary["headline"]
    # The head is tied to the embedding: its weights are counted once.
    assert head["num_layers"] == 30 and head["params"] == sum(p.numel() for p in bundled.model.parameters())
    assert 0.0 < head["oracle_flop_saving"] < 1.0 and head["consistency"] >= 0.5
    # The LM head (49,152 x 576) is measured as one of the costliest pieces of a decode step.
    pieces = summary["profile"]["measured_cost"]
    assert pieces["head"] > max(pieces["layers"])
    assert (out / "report.html").stat().st_size > 50_000 and "## Cost per layer" in (out / "report.md").read_text()


def test_the_bundled_tokenizer_gives_probes_steps_and_numbers(bundled):
    """Reasoning probes read the real tokenizer: digits are number pieces, line ends and full stops end steps."""
    from dyninfer.compressors.stop_obey import ProbeVocabulary
    from dyninfer.core.policies import PROBE_SUFFIX

    tokenizer = bundled.tokenizer
    vocabulary = ProbeVocabulary.from_tokenizer(tokenizer, PROBE_SUFFIX)
    assert tokenizer.decode(vocabulary.suffix) == PROBE_SUFFIX
    ids = tokenizer(" 128.\n\nSo", add_special_tokens=False)["input_ids"]
    kinds = [(tokenizer.decode([i]), i in vocabulary.numbers, i in vocabulary.boundaries, i in vocabulary.spaces) for i in ids]
    assert [k for k in kinds if k[1]] == [("1", True, False, False), ("2", True, False, False), ("8", True, False, False)]
    assert [k[0] for k in kinds if k[2]] == [t for t, *_ in kinds if t == "." or "\n" in t]  # the stop and the line ends
    assert "." in [k[0] for k in kinds if k[2]] and not any(k[2] for k in kinds if k[0] == "So")
    assert [tokenizer.decode([i]) for i in ids if i in vocabulary.line_ends] == [t for t, *_ in kinds if "\n" in t]  # not the "."
    assert vocabulary.answer([i for i in ids if i in vocabulary.numbers]) == 128.0


def test_a_completion_stop_rule_on_the_bundled_model_saves_tokens_on_unseen_code(tmp_path):
    """A small certification on held-out standard-library code: the rule is certified, run obeys it, and on code
    the model continues right more often than on prose, so it shows fewer tokens than it generates in full."""
    out = tmp_path / "stop"
    args = ["stop", "--data", "builtin:stdlib-code", "--prompt-tokens", "32", "--new-tokens", "16", "--fit-prompts", "16"]
    result = CliRunner().invoke(app, [*args, "--prompts", "48", "--heldout-prompts", "16", "--target", "0.8", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    held, never = summary["certificate"]["heldout"], summary["certificate"]["heldout_never"]
    assert never["tokens_saved"] == 0.0 and 0.0 < never["precision_without"] < 1.0
    # A rule is certified (the model continues some code right, and 0.8 needs only 14 valued units that lose
    # nothing), and on held-out code it saves tokens and shows a higher share of right ones than generating all.
    assert summary["policy"]["threshold"] is not None, summary["statement"]
    assert summary["certificate"]["ltt"]["n"] >= 14
    assert held["tokens_saved"] > 0.0 and held["precision_shown"] > never["precision_without"]
    run = CliRunner().invoke(
        app, ["run", str(out), "import os\nimport sys\n", "--raw", "--mode", "full", "-n", "16", "--stop", "completion", "--json"]
    )
    assert run.exit_code == 0, run.output
    assert json.loads(run.stdout)["stop"]["reason"] in ("rule", "budget")


def test_a_bench_row_of_the_bundled_model_holds_its_weights_in_its_own_process(bundled):
    """bench's transformers row reloads the model in a process of its own: from the GGUF's fp32 conversion (the
    GGUF itself is not something from_pretrained reads), and its memory share holds at least the fp32 weights."""
    from dyninfer.profilers.row_memory import row_peak_memory

    assert bundled.pretrained_path != bundled.source and not bundled.pretrained_path.endswith(".gguf")
    weights_mib = sum(p.numel() * p.element_size() for p in bundled.model.parameters()) / 2**20
    memory = row_peak_memory("transformers", bundled.pretrained_path, [1, 2, 3], 2)
    assert memory["model_rss_mib"] >= 0.9 * weights_mib, (memory, weights_mib)
    assert abs(memory["peak_rss_mib"] - memory["imports_rss_mib"] - memory["model_rss_mib"]) < 0.2  # rounding only

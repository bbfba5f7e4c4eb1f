"""Every decoder family transformers 4.57 ships in the standard rotary layout (tests/families.py), recognised by
structure: parity with transformers' own forward and greedy decoding, CALM propagation, calibrate and run, and
pruning and steering where they apply. ONNX export parity for the families that export is in test_export.py."""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES, VOCAB, family_model
from tiny_models import mixed_saturation_policy

from dyninfer.compressors.pruning import pruned
from dyninfer.compressors.pruning_calibration import calibrate_threshold_plan, collect_mlp_samples
from dyninfer.compressors.steering import ActivationSteering, hooked, steered
from dyninfer.core.cost import count_costs
from dyninfer.core.errors import DyninferError
from dyninfer.core.families import family_of
from dyninfer.core.layered import LayeredModel
from dyninfer.core.lenses import LogitLens
from dyninfer.core.policies import ExitPolicy
from dyninfer.early_exit.certify import run_calibration
from dyninfer.early_exit.trace import exit_layers, simulate, trace_exits
from dyninfer.runtime.dynamic import DynamicModel

pytestmark = pytest.mark.slow  # 2 tests x 43 families: the full suite runs them, the fast loop does not

NEW = 14  # prompt 10 + 14 new tokens: past the sliding window of 8
# Families whose MLP pruning is refused, and why: the error names the feature and the model type.
NO_PRUNING = {
    **dict.fromkeys(
        (
            "mixtral",
            "qwen2_moe",
            "qwen3_moe",
            "olmoe",
            "granitemoe",
            "gpt_oss",
            "hunyuan_v1_moe",
            "dots1",
            "glm4_moe",
            "deepseek_v2",
            "deepseek_v3",
            "ernie4_5_moe",
        ),
        "mixture-of-experts",
    ),
    **dict.fromkeys(("arcee", "nemotron", "bitnet"), "activation 'relu2'"),
    "apertus": "activation 'xielu'",
}
# Families whose calibration, built to certify at target 0.6 on the logit lens, certifies nothing, and why.
# Empty: every tested family certifies (tests/test_families.py would say which stopped).
NOT_CERTIFYING: dict[str, str] = {}
# Families whose certified policy exits on held-out text (teacher-forced) but not along the model's own greedy
# continuations of those prompts, and why: the gap the generation risk exists to close. Empty since share
# losses take the betting p-value (its tighter bound lowers gemma2's threshold enough to exit on its own text).
NO_EXITS_ON_OWN_TEXT: dict[str, str] = {}


def _random(shape, seed):
    return torch.randint(3, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model_type", FAMILIES)
def test_family_runs_like_transformers(model_type):
    model = family_model(model_type)
    lm = LayeredModel(model)  # recognised by structure: no family is named in the adapter
    assert lm.family == family_of(model_type) and lm.num_layers == 3
    ids = _random((2, 20), 1)
    with torch.no_grad():
        reference = model(ids, use_cache=False).logits
        torch.testing.assert_close(lm.forward_logits(ids), reference, rtol=1e-4, atol=1e-4)  # the last layer's lens

    prompt = ids[:1, :10]
    with torch.no_grad():
        greedy = model.generate(prompt, max_new_tokens=NEW, do_sample=False, attention_mask=torch.ones_like(prompt), pad_token_id=0)[:, 10:]
    full = DynamicModel(lm, None, LogitLens(lm)).generate(prompt, NEW, mode="full")
    assert torch.equal(full.tokens, greedy)

    # CALM propagation writes the K/V the layer itself writes for the same hidden state.
    caches = [lm.new_decoding_cache(), lm.new_decoding_cache()]
    state = torch.randn(1, 1, lm.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for cache in caches:
            hidden = lm.embed_at(prompt, 0)
            for i in range(lm.num_layers):
                hidden = lm.layer_at(i, hidden, 0, cache)
        lm.layer_at(1, state, 10, caches[0])
        lm.propagate(1, state, 10, caches[1])
    written, propagated = caches[0].layers[1], caches[1].layers[1]
    torch.testing.assert_close(propagated.keys, written.keys, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(propagated.values, written.values, rtol=1e-5, atol=1e-5)

    # Recompute: every full-depth step of a run that also exits early is the full model's token on that prefix.
    policy, run = mixed_saturation_policy(lm, prompt, "recompute", NEW, min_deep=2)
    with torch.no_grad():
        expected = model(torch.cat([prompt, run.tokens], 1), use_cache=False).logits[0, 9:-1].argmax(-1)
    deep = [s for s, e in enumerate(run.exit_layers) if e == lm.num_layers]
    assert deep and run.tokens[0, deep].tolist() == expected[deep].tolist()
    policy.kv_mode = "propagate"  # the same exits, the skipped layers' K/V propagated instead
    propagated = DynamicModel(lm, policy, LogitLens(lm)).generate(prompt, NEW)
    assert propagated.tokens.shape == (1, NEW) and set(propagated.exit_layers) <= {1, 2, lm.num_layers}


@pytest.mark.parametrize("model_type", FAMILIES)
def test_family_calibrates_prunes_and_steers(model_type):
    lm = LayeredModel(family_model(model_type))
    windows = _random((40, 17), 2)
    result, _ = run_calibration(
        lm,
        LogitLens(lm),
        count_costs(lm, context=16),
        windows[:8],
        windows[8:32],
        windows[32:],
        target=0.6,
        epsilon=0.1,
        measure="softmax",
        min_layer=1,
    )
    policy = ExitPolicy.from_dict(result.policy.to_dict(), lm.num_layers)  # what the artifact would hold
    assert result.calibration_tokens == 24 * 16
    if model_type in NOT_CERTIFYING:
        assert policy.threshold is None, f"{model_type} certifies now: take it off NOT_CERTIFYING"
    else:  # built to certify (a loose target on a shallow model): it must, and the policy must exit when run
        assert policy.exit_points and policy.threshold is not None, result.notes
        assert result.heldout["consistency"] >= 0.5  # held-out windows, teacher-forced: the bound is 0.6 at 90%
        # The runtime obeys the certified rule: along the full model's own continuations of held-out prompts
        # (recompute keeps every state the full model's), each decode step exits where the calibration's
        # simulation of that token says, and some do exit.
        prompts = windows[32:36, :8]
        continuation = DynamicModel(lm, None, None).generate(prompts, 9, mode="full").tokens
        policy.kv_mode = "recompute"
        run = DynamicModel(lm, policy, LogitLens(lm)).generate_rows(prompts, 8, forced=continuation[:, :8])
        sequences = torch.cat([prompts, continuation], 1)
        trace = trace_exits(lm, sequences, policy.exit_points, LogitLens(lm), "softmax", first=8)
        simulated = simulate(trace, policy.threshold, count_costs(lm, context=16), "softmax", False, 0, lm.hidden_size)
        expected = exit_layers(simulated, trace, lm.num_layers).reshape(4, 8)  # step k reads input position 7 + k
        assert run.steps >= 2 and torch.equal(run.exit_depth[:, 1 : run.steps], expected[:, : run.steps - 1])
        assert (expected < lm.num_layers).any() != (model_type in NO_EXITS_ON_OWN_TEXT)

    ids = windows[:2]
    with torch.no_grad():
        dense = lm.forward_logits(ids)
    if model_type in NO_PRUNING:
        with pytest.raises(DyninferError) as refused:
            lm.require_prunable()
        assert NO_PRUNING[model_type] in str(refused.value) and "\n" not in str(refused.value)
    else:  # pruning nothing reproduces the dense MLPs from the weights the adapter reads; half of them does not
        samples = collect_mlp_samples(lm, windows[:4])
        for sparsity, same in ((0.0, True), (0.5, False)):
            with pruned(lm, calibrate_threshold_plan(lm, samples, sparsity), backend="masked"), torch.no_grad():
                assert torch.allclose(lm.forward_logits(ids), dense, atol=1e-4) == same

    # Steering baked into the residual-out module equals adding the vector to the layer's output.
    direction = ActivationSteering({1: torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(4))})
    with torch.no_grad():
        with hooked(lm, direction, 0.5):
            expected = lm.forward_logits(ids)
        with steered(lm, direction, 0.5):
            baked = lm.forward_logits(ids)
        torch.testing.assert_close(baked, expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(lm.forward_logits(ids), dense)  # and it comes out again
    assert not torch.allclose(expected, dense, atol=1e-3)


def test_models_table_lists_what_these_tests_check():
    from dyninfer.core import families

    table = {row["model_type"]: row for row in families.support_table()}
    assert {t for t, row in table.items() if row["prune"] != "yes"} == set(NO_PRUNING) | {"mamba"}
    from test_export import ATTENTION_ARCHS, EXPORTED_FAMILIES

    exported = {"gemma3_text" if a == "gemma3" else a for a in ATTENTION_ARCHS} | set(EXPORTED_FAMILIES)
    assert {t for t, row in table.items() if row["export"] == "yes"} == exported


@pytest.mark.parametrize("model_type", ["phi3", "qwen3_moe"])
def test_a_saved_family_runs_probe_calibrate_and_run_from_the_command_line(model_type, tmp_path):
    """The whole path a user takes: a checkpoint folder of a family the adapter knows only by structure."""
    import json

    from conftest import CALIBRATE_ARGS, random_text, word_tokenizer
    from typer.testing import CliRunner

    from dyninfer.cli.app import app

    family_model(model_type).save_pretrained(tmp_path / "model")
    word_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "text.txt").write_text(random_text(6000))
    base = [str(tmp_path / "model"), "--data", str(tmp_path / "text.txt")]
    out = ["--out", str(tmp_path / "artifact"), "--json"]
    runner = CliRunner()
    probe = runner.invoke(app, ["probe", *base, "--seq-len", "16", "--tokens", "64", "--lens", "logit", *out])
    assert probe.exit_code == 0, probe.output
    assert json.loads(probe.stdout)["model"]["architecture"] == model_type
    calibrate = runner.invoke(app, ["calibrate", *base, *CALIBRATE_ARGS, *out])
    assert calibrate.exit_code == 0, calibrate.output
    run = runner.invoke(app, ["run", str(tmp_path / "artifact"), "tok1 tok2 tok3", "--max-new-tokens", "5", "--json"])
    assert run.exit_code == 0, run.output
    tokens = json.loads(run.stdout)["tokens"]
    assert 1 <= len(tokens) <= 5 and all(1 <= t["exit_layer"] <= 3 for t in tokens)  # at most 5: EOS stops it
    if model_type == "qwen3_moe":  # the stage that does not apply says so, and nothing else changes
        before = (tmp_path / "artifact" / "dyninfer.json").read_bytes()
        tokens = ["--calibration-tokens", "256", "--heldout-tokens", "256"]  # data enough: the refusal is the architecture's
        prune = runner.invoke(app, ["prune", *base, "--seq-len", "16", *tokens, *out])
        assert prune.exit_code == 2 and "MLP pruning does not apply to qwen3_moe" in prune.output
        assert (tmp_path / "artifact" / "dyninfer.json").read_bytes() == before

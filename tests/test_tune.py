"""tune-exits: the curriculum and weights, the LoRA's delta, what the training does to the exits, and the
artifact's LoRA baked by every loader."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_text, save_tiny
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from dyninfer.cli.app import app
from dyninfer.compressors.exit_tuning import TuningSettings, active_depths, depth_weights, layer_drop_rates, layer_groups, tune_exits
from dyninfer.compressors.lora import lora_attached, lora_delta
from dyninfer.compressors.steering import steered
from dyninfer.core.artifacts import Artifact
from dyninfer.core.errors import DyninferError
from dyninfer.core.layered import LayeredModel
from dyninfer.core.lenses import LogitLens

runner = CliRunner()


# --------------------------------------------------------------------------- schedule


def test_rotational_curriculum_trains_every_exit_once_per_rotation():
    depths = list(range(1, 12))
    seen = [active_depths(depths, "rotational", 4, step, 100) for step in range(4)]
    assert sorted(d for step in seen for d in step) == depths  # a partition of the exits
    assert active_depths(depths, "rotational", 4, 4, 100) == seen[0]  # and it repeats


def test_gradual_curriculum_starts_deep_and_ends_with_every_exit():
    depths = [2, 4, 6, 8]
    assert active_depths(depths, "gradual", 1, 0, 40) == [8]
    assert active_depths(depths, "gradual", 1, 39, 40) == depths
    sizes = [len(active_depths(depths, "gradual", 1, s, 40)) for s in range(40)]
    assert sizes == sorted(sizes)  # exits are only ever switched on
    assert active_depths(depths, "all", 1, 0, 40) == depths


@pytest.mark.parametrize("weighting", ["quadratic", "linear", "uniform"])
def test_depth_weights_rise_with_depth_and_sum_to_the_exit_weight(weighting):
    weights = depth_weights([1, 3, 7], weighting, 2.0)
    assert sum(weights.values()) == pytest.approx(2.0)
    assert weights[1] <= weights[3] <= weights[7]
    assert (weights[1] < weights[7]) == (weighting != "uniform")


def test_layer_dropout_rises_exponentially_to_its_maximum():
    rates = layer_drop_rates(5, 0.2)
    assert rates[0] == 0 and rates[-1] == pytest.approx(0.2)
    steps = [b - a for a, b in zip(rates, rates[1:])]
    assert all(s > 0 for s in steps) and steps == sorted(steps)  # convex: LayerSkip's 2^(l/(L-1)) - 1
    assert layer_drop_rates(5, 0.0) == [0.0] * 5


def test_layer_groups_split_the_exits_by_thirds_of_the_model():
    groups = layer_groups(list(range(1, 30)), 30)
    assert groups["shallow"][0] == 1 and groups["deep"][-1] == 29
    assert sorted(d for found in groups.values() for d in found) == list(range(1, 30))
    assert max(groups["shallow"]) < min(groups["middle"]) <= max(groups["middle"]) < min(groups["deep"])


# --------------------------------------------------------------------------- the LoRA and its delta


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: Conv1D weights stored [in, out]
def test_the_baked_delta_is_the_lora_models_forward(arch):
    lm = LayeredModel(tiny_model(arch))
    ids = torch.randint(0, lm.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    original = lm.model(ids).logits
    with lora_attached(lm, rank=4) as peft_model:
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:  # peft starts B at zero: give the LoRA something to do
                    p.normal_(0, 0.2)
            adapted = peft_model(input_ids=ids).logits
        delta = lora_delta(peft_model)
    assert torch.equal(lm.model(ids).logits, original)  # taken out again: the model is the original
    assert not torch.allclose(adapted, original, atol=1e-3)
    with steered(lm, delta, 1.0):
        torch.testing.assert_close(lm.model(ids).logits, adapted, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- what training does


def _sharp_llama(layers: int = 4) -> LayeredModel:
    """A tiny llama whose head is scaled up: peaked final distributions that the shallow exits miss."""
    model = tiny_model("llama", layers=layers)
    with torch.no_grad():
        model.lm_head.weight.mul_(12.0)
    return LayeredModel(model)


def _windows(lm, rows: int, length: int = 25, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, lm.vocab_size, (rows, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _exit_kl(lm: LayeredModel, windows: torch.Tensor, final: torch.Tensor) -> list[float]:
    """KL(final || exit d) for every depth d on `windows`; `final`: the original model's log-probabilities."""
    states = [h for _, h in lm.hidden_states(windows[:, :-1])]
    return [
        float(torch.nn.functional.kl_div(lm.logits_from(h).log_softmax(-1), final, log_target=True, reduction="batchmean")) for h in states
    ]


def test_tuning_brings_the_exits_closer_to_the_original_and_keeps_the_full_model():
    lm = _sharp_llama()
    train, held = _windows(lm, 32), _windows(lm, 8, seed=1)
    with torch.no_grad():
        final = lm.model(held[:, :-1]).logits.log_softmax(-1)
    weights = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    before = _exit_kl(lm, held, final)
    settings = TuningSettings(steps=40, lr=3e-3, rank=8, curriculum="all", exit_token_fraction=1.0, kl_weight=1.0, seed=0)
    delta, record = tune_exits(lm, train, settings)
    assert all(torch.equal(weights[n], p) for n, p in lm.model.named_parameters())  # tuning changed no weight
    with steered(lm, delta, 1.0):
        after = _exit_kl(lm, held, final)
    ratios = [after[d] / before[d] for d in (1, 2, 3)]
    # Every exit moved towards the original's final distribution on unseen windows, by a third on average...
    assert max(ratios) < 0.95 and sum(ratios) / 3 < 0.75, (before, after)
    # ...and the tuned full model stayed close to the original (a tenth of the exits' distance before).
    assert after[4] < 0.1 * sum(before[1:4]) / 3, (before, after)
    summary = record.summary()
    assert summary["exit_depths"] == [1, 2, 3] and summary["tokens"] == 40 * 4 * 24
    assert summary["final_losses"]["shallow"] < summary["first_losses"]["shallow"]


def test_checkpointing_computes_the_same_training():
    lm = _sharp_llama(layers=3)
    train = _windows(lm, 8)
    settings = TuningSettings(steps=3, lr=1e-2, rank=4, layer_dropout=0.5, exit_target="labels", seed=2)
    plain, _ = tune_exits(lm, train, settings)
    settings.checkpointing = True
    again, _ = tune_exits(lm, train, settings)
    for name in plain.names():
        torch.testing.assert_close(plain.delta(name), again.delta(name), atol=1e-6, rtol=1e-5)


def test_refusals():
    lm = _sharp_llama(layers=3)
    with pytest.raises(DyninferError, match="exit_layers` 3 is out of range"):
        tune_exits(lm, _windows(lm, 4), TuningSettings(exit_layers=(3,), steps=1))
    with pytest.raises(DyninferError, match="steps` must be at least 1"):
        tune_exits(lm, _windows(lm, 4), TuningSettings(steps=0))
    mamba = LayeredModel(tiny_model("mamba"))
    with pytest.raises(DyninferError, match="does not apply to mamba"):
        tune_exits(mamba, _windows(mamba, 4), TuningSettings(steps=1))


# --------------------------------------------------------------------------- the artifact


@pytest.mark.slow
def test_cli_tunes_and_every_loader_uses_the_tuned_model(tmp_path):
    model = save_tiny("llama", tmp_path / "model")
    data = tmp_path / "text.txt"
    data.write_text(random_text(20000))
    art, merged = tmp_path / "art", tmp_path / "merged"
    result = runner.invoke(
        app,
        [
            "tune-exits",
            str(model),
            "--data",
            str(data),
            "--seq-len",
            "32",
            "--steps",
            "6",
            "--lr",
            "5e-2",
            "--heldout-tokens",
            "128",
            "--out",
            str(art),
            "--merge-out",
            str(merged),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["placement"]["dtype"] == "float32" and isinstance(summary["notes"], list)
    assert summary["merged_to"] == str(merged) and summary["draft_vocabulary"]["size"] > 0
    from dyninfer.core.artifact_paths import file_mode

    assert {oct(p.stat().st_mode & 0o777) for p in merged.iterdir() if p.is_file()} == {oct(file_mode())}  # not safetensors' 0600
    assert len(summary["original"]["agreement"]) == 4 and summary["original"]["agreement"][-1] == 1.0
    stage = Artifact.load(art).stages["tune"]
    assert stage["windows"]["windows"] and (art / "tuning.safetensors").exists()

    # probe and prune on the artifact measure the tuned model: on the same held-out windows they give what
    # tune-exits measured for it (and not what it measured for the original).
    result = runner.invoke(
        app,
        ["probe", str(model), "--data", str(data), "--seq-len", "32", "--tokens", "128", "--lens", "logit", "--out", str(art), "--json"],
    )
    assert result.exit_code == 0, result.output
    probed = json.loads(result.stdout)["lenses"]["logit"]["agreement"]
    assert probed == pytest.approx(summary["tuned"]["agreement"], abs=1e-6)
    assert probed != pytest.approx(summary["original"]["agreement"], abs=1e-6)
    result = runner.invoke(
        app,
        [
            "prune",
            str(model),
            "--data",
            str(data),
            "--seq-len",
            "32",
            "--calibration-tokens",
            "128",
            "--heldout-tokens",
            "128",
            "--no-speed",
            "--out",
            str(tmp_path / "pruned"),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["dense_perplexity"] == pytest.approx(summary["original"]["perplexity"], rel=1e-6)

    # The merged checkpoint is the tuned model: `run --mode full` on the artifact is its greedy output.
    prompt = "tok1 tok2 tok3 tok4"
    tuned = AutoModelForCausalLM.from_pretrained(merged)
    original = AutoModelForCausalLM.from_pretrained(model)
    assert any(not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), original.state_dict().values()))
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(merged)(prompt, return_tensors="pt").input_ids
    expected = tuned.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :].tolist()
    calibrate = [
        "calibrate",
        str(model),
        "--data",
        str(data),
        "--seq-len",
        "32",
        "--fit-tokens",
        "256",
        "--calibration-tokens",
        "1024",
        "--heldout-tokens",
        "256",
        "--min-layer",
        "1",
        "--target",
        "0.6",
        "--lens",
        "logit",
        "--measure",
        "saturation",
        "--prompts",
        "24",
        "--heldout-prompts",
        "4",
        "--prompt-tokens",
        "12",
        "--new-tokens",
        "6",
        "--out",
        str(art),
    ]
    result = runner.invoke(app, calibrate)
    assert result.exit_code == 0, result.output
    for mode in ("full", "speculative"):  # lossless against the tuned model
        result = runner.invoke(app, ["run", str(art), prompt, "--mode", mode, "-n", "8", "--raw", "--json"])
        assert result.exit_code == 0, result.output
        assert [t["id"] for t in json.loads(result.stdout)["tokens"]] == expected, mode

    assert "tuned on" not in " ".join(json.loads((art / "calibrate" / "summary.json").read_text()).get("notes", []))

    # bench: the tuned model is the baseline, the original decodes beside it; the draft layer is planned.
    result = runner.invoke(app, ["bench", str(art), "--prompts", "2", "--new-tokens", "8", "--json"])
    assert result.exit_code == 0, result.output
    bench = json.loads(result.stdout)
    modes = {m["mode"]: m for m in bench["modes"]}
    assert set(modes) >= {"baseline (transformers, tuned model)", "transformers (original model)", "speculative"}
    assert modes["speculative"]["consistency"] == 1.0  # lossless against the tuned model
    plan = bench["speculation_plan"]
    assert plan["source"].startswith("the probe") and 1 <= plan["layer"] < 3 and bench["draft_layer"] == plan["layer"]
    # Last (its masks change what runs): prune starts from the tuned dense model.
    result = runner.invoke(
        app,
        [
            "prune",
            str(model),
            "--data",
            str(data),
            "--seq-len",
            "32",
            "--calibration-tokens",
            "128",
            "--heldout-tokens",
            "128",
            "--no-speed",
            "--out",
            str(art),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["dense_perplexity"] == pytest.approx(summary["tuned"]["perplexity"], rel=1e-6)


def test_calibration_never_draws_a_window_the_tuning_trained_on(tmp_path):
    from conftest import word_tokenizer

    from dyninfer.core.data import load_windows
    from dyninfer.core.records import TuneRecord
    from dyninfer.jobs.calibrate import CalibrateConfig, draw_units, tuning_notes
    from dyninfer.runtime.loader import lens_provenance

    data = tmp_path / "text.txt"
    data.write_text(random_text(20000))
    windows = load_windows(str(data), word_tokenizer(), seq_len=32, seed=0)
    tuned_rows = windows.order("train")[:200]  # what tune-exits takes: the start of the same random order
    record = TuneRecord(windows=lens_provenance(windows, tuned_rows))
    config = CalibrateConfig(
        data=str(data), seq_len=32, fit_tokens=256, calibration_tokens=1024, heldout_tokens=256, risk="teacher-forced-consistency"
    )
    plain = draw_units(config, windows, set())
    assert set(plain.units.tolist()) & set(tuned_rows.tolist())  # without the record it would reuse them
    seen, notes = tuning_notes(record, windows, plain)
    assert seen == set(tuned_rows.tolist()) and notes == []
    draw = draw_units(config, windows, seen)
    assert not (set(draw.fit.tolist()) | set(draw.units.tolist())) & seen
    # Another window length cuts the corpus differently: the overlapping held-out windows are reported.
    other = load_windows(str(data), word_tokenizer(), seq_len=20, seed=1)
    _, notes = tuning_notes(
        record,
        other,
        draw_units(
            config.__class__(
                data=str(data), seq_len=20, fit_tokens=100, calibration_tokens=200, heldout_tokens=400, risk="teacher-forced-consistency"
            ),
            other,
            set(),
        ),
    )
    assert notes and "held-out numbers are optimistic" in notes[0]


# --------------------------------------------------------------------------- self-speculation


def test_tokens_per_cycle_matches_a_simulation_of_drafting_and_verifying():
    from dyninfer.runtime.speculation import tokens_per_cycle

    rng = torch.Generator().manual_seed(0)
    for acceptance, k in ((0.3, 4), (0.8, 8), (0.95, 3)):
        accepted = torch.rand(200_000, k, generator=rng) < acceptance
        run = accepted.int().cumprod(1).sum(1)  # drafts accepted before the first rejection
        emitted = run + (run < k).int()  # the full model's token replaces the first rejected draft
        assert float(emitted.float().mean()) == pytest.approx(tokens_per_cycle(acceptance, k), rel=1e-2)


def test_the_plan_trades_acceptance_against_cost():
    from dyninfer.runtime.speculation import StepCosts, expected_speedup, needed_acceptance, plan_speculation

    costs = StepCosts(num_layers=10, layer_one=1.0, layer_many=1.2, many=8, head=2.0, draft_head=0.5)
    assert expected_speedup(0.0, 5, 4, costs) < 1 < expected_speedup(1.0, 2, 8, costs)
    assert all(expected_speedup(a, 4, 4, costs) < expected_speedup(a + 0.1, 4, 4, costs) for a in (0.1, 0.5, 0.8))
    needed = needed_acceptance(3, 6, costs, 1.3)
    assert expected_speedup(needed, 3, 6, costs) == pytest.approx(1.3, rel=1e-6)
    # A flat agreement curve: the shallowest layer pays best. A steep one: a deeper layer.
    flat = plan_speculation([0.0] + [0.9] * 9 + [1.0], costs, 8, "test")
    steep = plan_speculation([0.0, 0.0, 0.05, 0.1, 0.2, 0.5, 0.9, 0.95, 0.97, 0.99, 1.0], costs, 8, "test")
    assert flat.layer == 1 and steep.layer > 4 and steep.acceptance == pytest.approx(0.9, abs=0.1)
    with pytest.raises(DyninferError, match="covers 3 layers"):
        plan_speculation([0.0, 0.5, 0.9, 1.0], costs, 8, "test")


def test_draft_vocabulary_is_the_most_frequent_tokens():
    from dyninfer.compressors.exit_tuning import draft_vocabulary

    windows = torch.tensor([[5, 5, 5, 2, 2, 9], [5, 2, 7, 7, 7, 7]])
    assert draft_vocabulary(windows, 16, 3).tolist() == [5, 7, 2]
    assert draft_vocabulary(windows, 16, 100).tolist() == [5, 7, 2, 9]  # never a token that does not occur


@pytest.mark.parametrize("vocabulary", [None, [3, 4], list(range(0, 128, 2))])
def test_speculation_with_a_restricted_draft_head_is_lossless(vocabulary):
    from dyninfer.runtime.dynamic import DynamicModel

    lm = _sharp_llama(layers=4)
    prompt = _windows(lm, 1, length=10, seed=4)
    ids = None if vocabulary is None else torch.tensor(vocabulary)
    dynamic = DynamicModel(lm, None, LogitLens(lm), draft_vocabulary=ids)
    full = dynamic.generate(prompt, 24, mode="full")
    spec = dynamic.generate(prompt, 24, mode="speculative", draft_layer=2, draft_threshold=0.2)
    assert torch.equal(spec.tokens, full.tokens)
    assert spec.drafted > 0
    if vocabulary == [3, 4]:  # almost nothing is a candidate: the full head scores most drafts
        assert spec.draft_fallbacks > 0

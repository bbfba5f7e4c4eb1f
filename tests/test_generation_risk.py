"""Generation risk: per-row exits equal batch-1 runs, the consistency measures, the lazy LTT, validity."""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
import torch
from test_dynamic import NEW, _mixed_policy
from tiny_models import ARCHS, VOCAB, tiny_model
from typer.testing import CliRunner

from dyninfer.certification import exits as generation_risk
from dyninfer.certification.exits import PromptSet, certify_generation, full_continuations
from dyninfer.cli.app import app
from dyninfer.compressors.ltt import (
    SHARE_P_VALUE,
    fixed_sequence_test,
    hoeffding_bentkus_p_value,
    learn_then_test,
    min_examples,
)
from dyninfer.core import stages
from dyninfer.core.artifacts import Artifact
from dyninfer.core.consistency import consistency, prefix_share, rouge_l, token_share
from dyninfer.core.cost import CostModel
from dyninfer.core.errors import DyninferError
from dyninfer.core.layered import LayeredModel
from dyninfer.core.lenses import LogitLens
from dyninfer.core.policies import ExitPolicy
from dyninfer.early_exit.plan import ExitPlan
from dyninfer.runtime.dynamic import DynamicModel

KV_CASES = [(arch, kv) for arch in ARCHS for kv in ("propagate", "recompute") if not (arch == "mamba" and kv == "recompute")]


@pytest.mark.parametrize("arch, kv_mode", KV_CASES)
def test_rows_exit_as_they_would_alone(arch, kv_mode):
    """generate_rows over a batch gives each row the tokens and exits of `generate` on that row alone."""
    lm = LayeredModel(tiny_model(arch, layers=4))
    prompts = torch.randint(0, VOCAB, (5, 10), generator=torch.Generator().manual_seed(5))
    policy, _ = _mixed_policy(lm, prompts[:1], kv_mode)
    dynamic = DynamicModel(lm, policy, LogitLens(lm))
    rows = dynamic.generate_rows(prompts, NEW)
    for i in range(prompts.shape[0]):
        alone = dynamic.generate(prompts[i : i + 1], NEW)
        assert torch.equal(rows.tokens[i], alone.tokens[0])
        assert rows.exit_depth[i].tolist() == alone.exit_layers
    deep = rows.exit_depth[:, 1:] == lm.num_layers
    assert deep.any() and (~deep).any()  # mixed exits, so the check means something
    # Teacher forcing along the free run's own tokens reproduces it.
    forced = dynamic.generate_rows(prompts, NEW, forced=rows.tokens)
    assert torch.equal(forced.tokens, rows.tokens)


def test_forced_run_gives_the_exact_prefix_and_stops():
    lm = LayeredModel(tiny_model("llama", layers=4))
    prompts = torch.randint(0, VOCAB, (6, 10), generator=torch.Generator().manual_seed(2))
    policy, _ = _mixed_policy(lm, prompts[:1], "propagate")
    dynamic = DynamicModel(lm, policy, LogitLens(lm))
    full = full_continuations(lm, prompts, NEW)
    free = dynamic.generate_rows(prompts, NEW)
    forced = dynamic.generate_rows(prompts, NEW, forced=full)
    np.testing.assert_array_equal(prefix_share(forced.tokens, full), prefix_share(free.tokens, full))
    # Row i first differs from the full continuation at d_i (NEW if never); decoding stops once every row has.
    differs = free.tokens != full
    first_difference = torch.where(differs.any(1), differs.float().argmax(1), torch.full((6,), NEW))
    assert forced.steps == min(NEW, int(first_difference.max()) + 1)
    assert (forced.tokens[:, forced.steps :] == -1).all()
    # The rows that do differ, alone: now every row has differed before the end, so the run stops early.
    rows = differs.any(1)
    assert 2 <= int(rows.sum()) < 6
    stopped = dynamic.generate_rows(prompts[rows], NEW, forced=full[rows])
    assert stopped.steps == int(first_difference[rows].max()) + 1 < NEW
    assert (stopped.tokens[:, stopped.steps :] == -1).all() and (stopped.tokens[:, : stopped.steps] >= 0).all()


def _lcs(a, b):
    """Longest common subsequence by plain recursion (the independent reference)."""

    @functools.cache
    def go(i, j):
        if i == len(a) or j == len(b):
            return 0
        return go(i + 1, j + 1) + 1 if a[i] == b[j] else max(go(i + 1, j), go(i, j + 1))

    return go(0, 0)


def test_consistency_measures_by_hand_and_against_a_reference():
    reference = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]])
    generated = torch.tensor([[1, 2, 9, 4], [9, 1, 2, 3]])
    np.testing.assert_allclose(token_share(generated, reference), [0.75, 0.0])
    np.testing.assert_allclose(prefix_share(generated, reference), [0.5, 0.0])
    np.testing.assert_allclose(rouge_l(generated, reference), [0.75, 0.75])  # LCS 3 of 4 both ways
    rng = np.random.default_rng(0)
    for _ in range(30):
        a, b = rng.integers(0, 4, 9), rng.integers(0, 4, 9)
        assert rouge_l(a, b)[0] == pytest.approx(_lcs(tuple(a), tuple(b)) / 9)
    assert consistency("tokens", reference, reference).tolist() == [1.0, 1.0]


def test_min_examples_is_the_smallest_certifying_count():
    for delta, epsilon in ((0.05, 0.05), (0.1, 0.1), (0.01, 0.05), (0.3, 0.01)):
        n = min_examples(delta, epsilon)
        assert hoeffding_bentkus_p_value(0.0, n, delta) <= epsilon < hoeffding_bentkus_p_value(0.0, n - 1, delta)
    assert min_examples(0.05, 0.05) == 59


def test_lazy_fixed_sequence_test_equals_the_full_test_and_stops_early():
    rng = np.random.default_rng(3)
    rates = np.linspace(0.0, 0.3, 15)
    losses = np.clip(rates[:, None] + rng.normal(0, 0.05, (15, 200)), 0, 1)
    lambdas = list(np.linspace(1.0, 0.0, 15))
    asked = []

    def losses_of(j):
        asked.append(j)
        return losses[j]

    lazy, used = fixed_sequence_test(lambdas, losses_of, delta=0.1, epsilon=0.05, method="betting")
    full = learn_then_test(losses, lambdas, delta=0.1, epsilon=0.05, method="betting")
    assert lazy.chosen == full.chosen and lazy.chosen_index is not None
    assert asked == list(range(lazy.chosen_index + 2))  # up to the first candidate not rejected, no further
    assert lazy.untested == 15 - len(asked) and used.shape == (len(asked), 200)


def _violation_rate(trials: int, units: int, tokens_per_unit: int, as_tokens: bool, seed: int) -> float:
    """Prompts (units) with a hard minority; the losses of one unit are correlated across its tokens.

    Each candidate has an error rate for easy units; hard units (3%) err 20 times as often. LTT
    (delta 0.1, epsilon 0.05) certifies on a fresh draw of units each trial; a violation is a chosen
    candidate whose population risk exceeds delta. `as_tokens` counts every token of a unit as its
    own example, which breaks the independence LTT assumes (what 16-token blocks of one window did).
    """
    rng = np.random.default_rng(seed)
    delta, epsilon, hard_share, factor = 0.1, 0.05, 0.03, 20.0
    rates = np.linspace(0.0, 0.15, 31)  # candidates strict -> loose (easy-unit error rate)
    true_risk = np.minimum(rates * factor, 1.0) * hard_share + rates * (1 - hard_share)
    violations = 0
    for _ in range(trials):
        hard = rng.random(units) < hard_share
        p = np.clip(rates[:, None] * np.where(hard, factor, 1.0)[None, :], 0, 1)  # [candidates, units]
        # One uniform per token, shared across candidates: a token wrong at a strict threshold stays wrong.
        u = rng.random((units, tokens_per_unit))
        errors = u[None, :, :] < p[:, :, None]  # [candidates, units, tokens]
        losses = errors.reshape(len(rates), -1).astype(float) if as_tokens else errors.mean(axis=2)
        result = learn_then_test(losses, list(rates), delta=delta, epsilon=epsilon, method="hoeffding-bentkus")
        if result.chosen_index is not None and true_risk[result.chosen_index] > delta:
            violations += 1
    return violations / trials


def test_guarantee_holds_with_correlated_units_and_fails_when_tokens_count_as_units():
    trials, epsilon = 1000, 0.05
    slack = 3 * math.sqrt(epsilon * (1 - epsilon) / trials)
    assert _violation_rate(trials, units=100, tokens_per_unit=16, as_tokens=False, seed=0) <= epsilon + slack
    # The same kind of data with every token counted as an example: the guarantee breaks.
    assert _violation_rate(300, units=100, tokens_per_unit=16, as_tokens=True, seed=0) > 2 * epsilon


def _plan(lm, points):
    """An exit plan at `points` (saturation checks) with a fit trace, and a cost model where checks pay."""
    fit = torch.randint(0, VOCAB, (6, 17), generator=torch.Generator().manual_seed(9))
    lens = LogitLens(lm)
    cheap = CostModel(context=0, embed=0.0, layers=[10.0] * lm.num_layers, norm=0.0, head=1.0, translator=0.0, checks={"saturation": 0.1})
    return lens, cheap, ExitPlan(0.6, points, None, _trace_points(lm, lens, fit, points), list(range(len(points))))


def _trace_points(lm, lens, windows, points):
    from dyninfer.early_exit.trace import trace_exits

    return trace_exits(lm, windows, points, lens, "saturation")


def test_certify_generation_uses_the_dynamic_models_own_generations(monkeypatch):
    """The LTT losses are 1 - token share of batch-1 greedy runs; testing stops at the first failure."""
    lm = LayeredModel(tiny_model("llama", layers=4))
    lens, costs, plan = _plan(lm, [1, 2])
    prompts = torch.randint(0, VOCAB, (40, 8), generator=torch.Generator().manual_seed(4))
    full = full_continuations(lm, prompts, 6)
    calibration, heldout = PromptSet(prompts[:30], full[:30]), PromptSet(prompts[30:], full[30:])
    held_trace = _trace_points(lm, lens, torch.randint(0, VOCAB, (2, 17)), [1, 2])
    result = certify_generation(
        lm,
        lens,
        costs,
        plan,
        calibration,
        heldout,
        held_trace,
        measure="saturation",
        consistency_measure="tokens",
        kv_mode="propagate",
        epsilon=0.1,
    )
    assert result.risk == "generation" and len(result.curve) == len(result.ltt.lambdas)
    last = len(result.ltt.lambdas) - 1
    assert result.ltt.rejected[:last] == [True] * last and (result.ltt.rejected[last] is False or result.ltt.untested == 0)
    # Recompute one tested candidate's risk independently: each prompt alone through `generate`.
    j = min(1, last)
    policy = ExitPolicy("logit", "saturation", [1, 2], result.ltt.lambdas[j], 0, "propagate")
    dynamic = DynamicModel(lm, policy if j else None, lens)
    shares = [
        float(
            (
                dynamic.generate(calibration.prompts[i : i + 1], 6, mode="early-exit" if j else "full").tokens[0]
                == calibration.continuations[i]
            )
            .double()
            .mean()
        )
        for i in range(30)
    ]
    assert result.ltt.risks[j] == pytest.approx(1 - np.mean(shares))
    assert result.generated["prompts"] == 10 and 0.0 <= result.generated["tokens"] <= 1.0


def test_too_few_prompts_says_how_many_are_needed():
    lm = LayeredModel(tiny_model("llama", layers=4))
    lens, costs, plan = _plan(lm, [1, 2])
    plan.target = 0.95
    prompts = torch.randint(0, VOCAB, (10, 8))
    few = PromptSet(prompts, full_continuations(lm, prompts, 4))
    with pytest.raises(DyninferError, match=f"at least {min_examples(0.05, 0.05, SHARE_P_VALUE)} are needed"):
        certify_generation(
            lm, lens, costs, plan, few, few, _trace_points(lm, lens, prompts[:1], [1, 2]), measure="saturation", epsilon=0.05
        )


GEN = [
    "--seq-len",
    "32",
    "--fit-tokens",
    "256",
    "--heldout-tokens",
    "256",
    "--min-layer",
    "1",
    "--target",
    "0.7",
    "--lens",
    "logit",
    "--measure",
    "saturation",
    "--prompts",
    "40",
    "--heldout-prompts",
    "8",
    "--prompt-tokens",
    "12",
    "--new-tokens",
    "6",
]


@pytest.fixture(scope="module")
def gen_text(tmp_path_factory):
    from conftest import random_text

    path = tmp_path_factory.mktemp("gen") / "text.txt"
    path.write_text(random_text(12000, seed=3))
    return path


def test_calibrate_generation_cli_caches_continuations(tiny_llama_dir, gen_text, tmp_path, monkeypatch):
    out = tmp_path / "art"
    result = CliRunner().invoke(app, ["calibrate", str(tiny_llama_dir), "--data", str(gen_text), *GEN, "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["risk"] == "generation" and summary["units"].startswith("40 prompts of 12 tokens")
    assert set(summary["generated"]) >= {"tokens", "prefix", "rougeL", "certified_measure", "predicted_speedup"}
    group = Artifact.load(out).tensors[stages.GENERATION_GROUP]
    assert group["calibration.prompts"].shape == (40, 12) and group["calibration.continuations"].shape == (40, 6)
    # The continuations are the full model's greedy ones (HF generate, independently).
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    first = group["calibration.prompts"][:3]
    expected = hf.generate(
        first, max_new_tokens=6, min_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(first), pad_token_id=0
    )[:, 12:]
    assert torch.equal(group["calibration.continuations"][:3], expected)
    # A second calibration of the same model and prompts reuses them.
    generating = []  # whether each first (never-exit) candidate run had to generate its prompts' continuations
    original_full = generation_risk.CandidateRuns.full
    monkeypatch.setattr(
        generation_risk.CandidateRuns,
        "full",
        lambda runs, *a, **k: generating.append(runs.prompts.continuations is None) or original_full(runs, *a, **k),
    )
    again = CliRunner().invoke(
        app, ["calibrate", str(tiny_llama_dir), "--data", str(gen_text), *GEN, "--kv-mode", "recompute", "--out", str(out), "--json"]
    )
    assert again.exit_code == 0, again.output
    assert generating and not any(generating) and json.loads(again.stdout)["policy"]["kv_mode"] == "recompute"


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--prompts", "20", "--target", "0.95"], f"at least {min_examples(0.05, 0.05, SHARE_P_VALUE)} are needed"),
        (["--new-tokens", "0"], "--new-tokens must be at least 1"),
        (["--prompt-tokens", "40"], "longer than the windows"),
        (["--prompts", "5000"], "one window per unit"),
        (["--new-tokens", "600"], "exceed the model's context"),
        (["--consistency", "bleu"], "--consistency must be one of"),
    ],
)
def test_generation_bad_input(tiny_llama_dir, gen_text, tmp_path, args, fragment):
    out = tmp_path / "art"
    result = CliRunner().invoke(app, ["calibrate", str(tiny_llama_dir), "--data", str(gen_text), *GEN, *args, "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert fragment in result.stderr and "Traceback" not in result.output
    assert not out.exists()


def test_generation_grid_is_strict_to_loose_by_exit_share():
    from dyninfer.early_exit.plan import generation_grid
    from dyninfer.early_exit.trace import Trace

    confidence = torch.rand(3, 4000, generator=torch.Generator().manual_seed(0))
    trace = Trace(
        [1, 2, 3],
        confidence,
        torch.ones(3, 4000, dtype=torch.bool),
        torch.ones(3, 4000, dtype=torch.bool),
        torch.ones(4000, dtype=torch.bool),
    )
    grid = generation_grid(trace, size=12, lowest=1e-3, highest=0.5)
    assert grid[0] > confidence.max() and grid == sorted(set(grid), reverse=True)
    best = confidence.max(0).values
    shares = [float((best >= t).double().mean()) for t in grid[1:]]
    expected = np.geomspace(1e-3, 0.5, 11)
    np.testing.assert_allclose(shares, expected, rtol=0.15, atol=2 / 4000)


REUSE_CASES = [(arch, kv) for arch, kv in KV_CASES if arch != "mamba"]


@pytest.mark.parametrize("arch, kv_mode", REUSE_CASES)
def test_candidate_runs_equal_runs_generated_anew(arch, kv_mode):
    """Each candidate continued from the previous one's runs is, token for token and exit for exit, the run
    generated from the prompt (batch 1 on both sides, so no rounding differs), for less decoding."""
    lm = LayeredModel(tiny_model(arch, layers=4))
    prompts = torch.randint(0, VOCAB, (6, 10), generator=torch.Generator().manual_seed(7))
    new_tokens = 8
    full = full_continuations(lm, prompts, new_tokens)
    middle, _ = _mixed_policy(lm, prompts[:1], kv_mode)
    policy = ExitPolicy("logit", "saturation", [1, 2], None, 0, kv_mode)
    # Strict to loose, around the threshold at which exits are mixed.
    thresholds = sorted({min(1.0, middle.threshold + step) for step in (0.05, 0.02, 0.01, 0.0, -0.01, -0.03, -0.1)}, reverse=True)
    runs = generation_risk.CandidateRuns(DynamicModel(lm, policy, LogitLens(lm)), PromptSet(prompts, full), "tokens", batch_size=1)
    plain = DynamicModel(lm, ExitPolicy("logit", "saturation", [1, 2], None, 0, kv_mode), LogitLens(lm))
    depths = []
    for threshold in thresholds:
        fast = runs.run(threshold)
        plain.policy.threshold = threshold
        anew = [plain.generate_rows(prompts[i : i + 1], new_tokens) for i in range(prompts.shape[0])]
        assert torch.equal(fast.tokens, torch.cat([r.tokens for r in anew])), threshold
        assert torch.equal(fast.exit_depth, torch.cat([r.exit_depth for r in anew])), threshold
        np.testing.assert_array_equal(fast.scores, [float((r.tokens[0] == full[i]).double().mean()) for i, r in enumerate(anew)])
        depths.append(fast.exit_depth[:, 1:].double().mean().item())
    assert depths[0] > depths[-1]  # the candidates exit more and more, so later runs did differ
    assert 0 < runs.positions_decoded < runs.positions_asked  # and part of the decoding was saved


def test_candidate_runs_generate_a_stricter_threshold_anew_and_go_on_from_their_last_run():
    """Out of order (stricter than the last run), a candidate is generated from its prompts; the next looser one
    still continues the records, and both equal runs generated anew."""
    lm = LayeredModel(tiny_model("llama", layers=4))
    prompts = torch.randint(0, VOCAB, (4, 8), generator=torch.Generator().manual_seed(1))
    middle, _ = _mixed_policy(lm, prompts[:1], "propagate")
    policy = ExitPolicy("logit", "saturation", [1, 2], None, 0, "propagate")
    prompt_set = PromptSet(prompts, None, new_tokens=6)
    runs = generation_risk.CandidateRuns(DynamicModel(lm, policy, LogitLens(lm)), prompt_set, "tokens", batch_size=1)
    assert torch.equal(runs.full(), full_continuations(lm, prompts, 6, batch_size=1))  # never exiting is the full model
    assert torch.equal(prompt_set.continuations, runs.full())
    plain = DynamicModel(lm, ExitPolicy("logit", "saturation", [1, 2], None, 0, "propagate"), LogitLens(lm))
    for threshold in (middle.threshold, middle.threshold + 0.05, middle.threshold - 0.05):
        plain.policy.threshold = threshold
        anew = torch.cat([plain.generate_rows(prompts[i : i + 1], 6).tokens for i in range(4)])
        assert torch.equal(runs.run(threshold).tokens, anew), threshold


@pytest.mark.parametrize("batch_size", [1, 32])
def test_certified_result_is_the_same_with_and_without_reuse(batch_size):
    """The acceptance check of the fast path: the same seed and data certify the same threshold and exit points,
    with the same p-values and held-out numbers, whether candidates continue one another or are generated anew.
    Two targets on the same points share their runs."""
    lm = LayeredModel(tiny_model("llama", layers=4))
    lens, costs, plan = _plan(lm, [1, 2])
    prompts = torch.randint(0, VOCAB, (40, 8), generator=torch.Generator().manual_seed(4))
    full = full_continuations(lm, prompts, 6)
    held_trace = _trace_points(lm, lens, torch.randint(0, VOCAB, (2, 17)), [1, 2])
    results = {}
    for reuse in (False, True):
        cache: dict = {}
        for target in (0.6, 0.5):
            plan.target = target
            results[reuse, target] = certify_generation(
                lm,
                lens,
                costs,
                plan,
                PromptSet(prompts[:30], full[:30]),
                PromptSet(prompts[30:], full[30:]),
                held_trace,
                measure="saturation",
                epsilon=0.1,
                batch_size=batch_size,
                reuse=reuse,
                runs_cache=cache,
            )
    for target in (0.6, 0.5):
        plain, fast = results[False, target], results[True, target]
        assert fast.policy.threshold == plain.policy.threshold and fast.policy.exit_points == plain.policy.exit_points
        assert fast.ltt.lambdas == plain.ltt.lambdas and fast.ltt.p_values == pytest.approx(plain.ltt.p_values, abs=1e-12)
        assert [c.consistency for c in fast.curve] == pytest.approx([c.consistency for c in plain.curve], abs=1e-12)
        assert fast.generated == plain.generated
    assert len(results[True, 0.5].ltt.lambdas) > 2  # several candidates were tested, so reuse was exercised
    work = results[True, 0.5].work
    assert work["candidate_positions_decoded"] < work["candidate_positions_from_prompts"]

"""Calibration: cost accounting, exit semantics, vocabulary pruning, the guarantee, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_models import VOCAB, tiny_model
from typer.testing import CliRunner

from dyninfer.certification.calibrate import calibrate_exits
from dyninfer.cli.app import app
from dyninfer.compressors.ltt import SHARE_P_VALUE, learn_then_test, min_examples
from dyninfer.core.artifacts import Artifact
from dyninfer.core.cost import CostModel, count_costs
from dyninfer.core.errors import DyninferError
from dyninfer.core.layered import LayeredModel
from dyninfer.core.lenses import LogitLens
from dyninfer.core.policies import ExitPolicy
from dyninfer.early_exit.plan import candidate_thresholds, select_exit_points
from dyninfer.early_exit.rule import batch_leaves, first_exit, leaves
from dyninfer.early_exit.trace import Trace, simulate, trace_exits, window_losses

COSTS = CostModel(context=0, embed=0.0, layers=[10.0] * 6, norm=1.0, head=40.0, translator=5.0)


def _trace(confidence, agrees, points=(2, 4)):
    confidence = torch.tensor(confidence, dtype=torch.float32)
    agrees = torch.tensor(agrees, dtype=torch.bool)
    return Trace(list(points), confidence, agrees, agrees.clone(), torch.ones(confidence.shape[1], dtype=torch.bool))


def test_simulated_costs_and_exits_by_hand():
    # token 0 exits at the first point, token 1 at the second, token 2 never.
    trace = _trace([[0.9, 0.1, 0.2], [0.5, 0.8, 0.3]], [[1, 0, 1], [1, 1, 0]])
    sim = simulate(trace, 0.7, COSTS, "softmax", translated=False, vocab_top_k=0, hidden_size=8)
    assert sim.exit_row.tolist() == [0, 1, -1]
    check = 1.0 + 40.0  # norm + head
    assert sim.cost.tolist() == [20 + check, 40 + 2 * check, 60 + 1 + 40 + 2 * check]
    assert sim.consistent.tolist() == [True, True, True]
    # With vocabulary pruning the second check scores only K rows; a tuned lens adds its translator.
    pruned = simulate(trace, 0.7, COSTS, "softmax", translated=True, vocab_top_k=4, hidden_size=8)
    first, later = 5 + 1 + 40, 5 + 1 + 2 * 4 * 8
    assert pruned.cost.tolist()[1] == 40 + first + later
    # A state measure pays a cheap check and the head once, at the exit.
    cheap = simulate(trace, 0.7, COSTS, "saturation", translated=False, vocab_top_k=0, hidden_size=8)
    assert cheap.cost.tolist()[0] == 20 + 3 * 8 + 1 + 40
    # A measured cost model (from `profile`) prices the checks by what they took, not by FLOPs.
    measured = CostModel(
        context=0,
        embed=0.0,
        layers=[10.0] * 6,
        norm=1.0,
        head=40.0,
        translator=5.0,
        unit="ms/token",
        checks={"saturation": 7.0, "classifier": 2.0, "head_row": 0.5},
    )
    assert simulate(trace, 0.7, measured, "saturation", False, 0, 8).cost.tolist()[0] == 20 + 7 + 1 + 40
    assert simulate(trace, 0.7, measured, "classifier", False, 0, 8).cost.tolist()[0] == 20 + 2 + 1 + 40
    assert simulate(trace, 0.7, measured, "softmax", False, 4, 8).cost.tolist()[1] == 40 + 41 + 1 + 4 * 0.5


def test_never_exits_without_threshold_or_points():
    trace = _trace([[0.99, 0.99]], [[0, 0]], points=(3,))
    sim = simulate(trace, None, COSTS, "softmax", False, 0, 8)
    assert sim.exit_row.tolist() == [-1, -1] and sim.consistent.all()


def test_no_exit_points_means_the_full_model():
    trace = Trace(
        [], torch.empty(0, 4), torch.empty(0, 4, dtype=torch.bool), torch.empty(0, 4, dtype=torch.bool), torch.ones(4, dtype=torch.bool)
    )
    sim = simulate(trace, float("inf"), COSTS, "softmax", False, 0, 8)
    assert sim.exit_row.tolist() == [-1] * 4 and sim.cost.tolist() == [COSTS.full_cost()] * 4


def test_window_losses_are_rates_per_window():
    trace = _trace([[1, 1, 1, 1, 0, 0]], [[0, 1, 1, 1, 1, 1]], points=(2,))
    sim = simulate(trace, 0.5, COSTS, "softmax", False, 0, 8)
    np.testing.assert_allclose(window_losses(sim, trace, "teacher-forced-consistency", 3), [0.5, 0.0, 0.0])
    np.testing.assert_allclose(window_losses(sim, trace, "teacher-forced-consistency", 2), [1 / 3, 0.0])
    # Accuracy drop counts tokens the exit got wrong where the full model was right.
    trace.final_correct[:] = torch.tensor([True, False, True, True, True, True])
    np.testing.assert_allclose(window_losses(sim, trace, "teacher-forced-accuracy-drop", 3), [0.5, 0.0, 0.0])


def test_candidate_thresholds_run_strict_to_loose_and_start_with_no_exit():
    confidence = torch.rand(2, 500, generator=torch.Generator().manual_seed(0))
    grid = candidate_thresholds(confidence)
    assert grid == sorted(grid, reverse=True)
    assert grid[0] > confidence.max().item()


def test_expensive_checks_place_no_exit_points():
    trace = _trace([[0.9] * 50], [[1] * 50], points=(5,))
    dear = CostModel(context=0, embed=0.0, layers=[1.0] * 6, norm=0.0, head=1000.0, translator=0.0)
    assert select_exit_points(trace, dear, "softmax", False, 0, 8, target=0.9) == []  # a check costs more than it saves
    assert select_exit_points(trace, COSTS, "softmax", False, 0, 8, target=0.9) == [5]


@pytest.mark.slow
def test_guarantee_holds_on_synthetic_traces_with_known_truth():
    """Confidence predicts agreement with a known law; the certified threshold's true risk <= delta."""
    rng = np.random.default_rng(0)
    delta, epsilon, trials, violations = 0.1, 0.1, 60, 0

    def draw(n):
        c = rng.random(n)
        agrees = rng.random(n) < (0.5 + 0.5 * c)  # P(agree | c) = 0.5 + 0.5c
        return _trace([c.tolist()], [agrees.tolist()], points=(3,))

    certified = 0
    for _ in range(trials):
        cal = draw(4000)
        thresholds = candidate_thresholds(cal.confidence, n=60)
        losses = np.stack(
            [window_losses(simulate(cal, t, COSTS, "softmax", False, 0, 8), cal, "teacher-forced-consistency", 500) for t in thresholds]
        )
        ltt = learn_then_test(losses, thresholds, delta=delta, epsilon=epsilon)
        if ltt.chosen_index in (None, 0):  # 0: the "never exit" candidate (infinity), certified for free
            continue
        certified += 1
        lam = ltt.chosen
        # True risk: exiting tokens have c >= lam, each disagrees with prob 0.5(1 - c).
        true_risk = 0.5 * ((1 - lam) - (1 - lam**2) / 2)  # integral over c in [lam, 1] of 0.5(1 - c)
        violations += true_risk > delta
    # Exiting every token has true risk 0.25 > delta, exiting none has 0: 500 windows certify a threshold in between
    # every time, so an uncertified trial is a failure of the procedure, not luck (and violations are counted over
    # all trials: a procedure that certified nothing could not pass).
    assert certified == trials
    assert violations / trials <= epsilon + 3 * np.sqrt(epsilon * (1 - epsilon) / trials)


@torch.no_grad()
def test_trace_with_full_vocabulary_pruning_equals_unpruned():
    lm = LayeredModel(tiny_model("qwen2", layers=4))
    windows = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(0))
    lens = LogitLens(lm)
    plain = trace_exits(lm, windows, [1, 2, 3], lens, "softmax")
    everything = trace_exits(lm, windows, [1, 2, 3], lens, "softmax", vocab_top_k=VOCAB)
    torch.testing.assert_close(everything.confidence, plain.confidence)
    assert torch.equal(everything.agrees, plain.agrees)
    pruned = trace_exits(lm, windows, [1, 2, 3], lens, "softmax", vocab_top_k=4)
    assert torch.equal(pruned.agrees[0], plain.agrees[0])  # the first check sees the full vocabulary
    assert (pruned.confidence[1:] >= plain.confidence[1:] - 1e-6).all()  # renormalised over fewer tokens


def test_policy_round_trips():
    policy = ExitPolicy("tuned", "margin", [4, 9], 0.5, 16, "recompute")
    assert ExitPolicy.from_dict(json.loads(json.dumps(policy.to_dict()))) == policy


CAL = [
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
    "0.8",
    "--prompts",
    "24",
    "--heldout-prompts",
    "4",
    "--prompt-tokens",
    "12",
    "--new-tokens",
    "6",
]


@pytest.fixture(scope="module")
def long_text(tmp_path_factory):
    from conftest import random_text

    path = tmp_path_factory.mktemp("cal") / "long.txt"
    path.write_text(random_text(20000))
    return path


@pytest.mark.parametrize("measure, risk", [("softmax", "teacher-forced-consistency"), ("classifier", "generation")])
def test_calibrate_cli_writes_policy(tiny_llama_dir, long_text, tmp_path, measure, risk):
    out = tmp_path / "art"
    result = CliRunner().invoke(
        app,
        [
            "calibrate",
            str(tiny_llama_dir),
            "--data",
            str(long_text),
            *CAL,
            "--lens",
            "logit",
            "--measure",
            measure,
            "--risk",
            risk,
            "--out",
            str(out),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    policy = summary["policy"]
    # Built to certify (a loose target on a 3-layer model): exit points, a threshold, and the bound stated for them.
    assert policy["measure"] == measure and policy["exit_points"] and all(1 <= p < 3 for p in policy["exit_points"])
    assert policy["threshold"] is not None
    assert "with probability >= 95%" in summary["statement"] and "the risk is <= 0.2" in summary["statement"]
    exits = summary["heldout"]["exit_distribution"]
    assert set(exits) <= {str(p) for p in policy["exit_points"]} | {"3"}  # exits only at allowed points
    assert sum(exits.values()) == pytest.approx(1.0) and exits["3"] < 1.0  # and some held-out tokens do exit
    stage = Artifact.load(out).stages["calibrate"]
    assert stage["policy"] == policy
    if measure == "classifier":
        weight = Artifact.load(out).tensors["exits"]["classifier.weight"]
        assert weight.shape == (len(policy["exit_points"]), 32)
    for name in ("curve.csv", "curve.png", "summary.json"):
        assert (out / "calibrate" / name).is_file()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--target", "1.5"], "--target must be between 0 and 1"),
        (["--measure", "vibes"], "--measure must be one of"),
        (["--kv-mode", "none"], "--kv-mode must be one of"),
        (["--calibration-tokens", "100000", "--risk", "teacher-forced-consistency"], "one window per unit"),
        # the number the certificate's own p-value rule needs at target 0.8, epsilon 0.05 (test_ltt checks min_examples)
        (
            ["--calibration-tokens", "256", "--risk", "teacher-forced-consistency"],
            f"at least {min_examples(0.2, 0.05, SHARE_P_VALUE)} are needed",
        ),
    ],
)
def test_calibrate_bad_options(tiny_llama_dir, long_text, args, fragment):
    result = CliRunner().invoke(app, ["calibrate", str(tiny_llama_dir), "--data", str(long_text), *CAL, "--lens", "logit", *args])
    assert result.exit_code == 2, result.output
    assert fragment in result.stderr and "Traceback" not in result.output


@pytest.mark.slow
@pytest.mark.parametrize("measure", ["classifier", "softmax"])
def test_several_targets_on_shared_traces_equal_one_run_per_target(measure):
    """Tracing the points any target chose once and reading each target's rows gives what tracing its points alone gives."""
    from dyninfer.early_exit.certify import run_calibration, run_calibrations

    lm = LayeredModel(tiny_model("llama", layers=6))
    windows = torch.randint(0, VOCAB, (48, 17), generator=torch.Generator().manual_seed(1))
    fit, cal, held = windows[:8], windows[8:40], windows[40:]
    lens = LogitLens(lm)
    targets = [0.05, 0.3, 0.8]
    options = dict(measure=measure, min_layer=1)
    cheap = CostModel(
        context=0,
        embed=0.0,
        layers=[10.0] * 6,
        norm=0.0,
        head=1.0,
        translator=0.0,
        checks={"classifier": 0.1, "saturation": 0.1, "head_row": 0.01},
    )  # checks pay off
    together = run_calibrations(lm, lens, cheap, fit, cal, held, targets=targets, **options)
    for target, (result, classifier) in zip(targets, together):
        alone, alone_classifier = run_calibration(lm, lens, cheap, fit, cal, held, target=target, **options)
        assert result.policy == alone.policy
        assert result.heldout == alone.heldout
        assert [c.consistency for c in result.curve] == [c.consistency for c in alone.curve]
        if classifier is not None:
            assert torch.equal(classifier.weight, alone_classifier.weight)
    assert any(r.policy.exit_points and r.policy.threshold is not None for r, _ in together)  # not all trivial


def test_the_exit_rule_by_hand():
    confidence = torch.tensor([[0.2, 0.9, 0.5, float("nan")], [0.8, 0.1, 0.4, 0.9]])  # [points, tokens]
    assert first_exit(confidence, 0.7).tolist() == [1, 0, -1, 1]  # the first point that passes; NaN never does
    assert first_exit(confidence, None).tolist() == [-1] * 4 and first_exit(confidence[:0], 0.5).tolist() == [-1] * 4
    assert leaves(torch.tensor([0.7, 0.69]), 0.7).tolist() == [True, False]  # reaching the threshold is enough
    assert bool(batch_leaves(torch.tensor([0.9, 0.75]), 0.7)) and not bool(batch_leaves(torch.tensor([0.9, 0.6]), 0.7))


@pytest.mark.parametrize("risk", ["teacher-forced-consistency", "generation"])
def test_calibrate_exits_certifies_every_risk_without_the_job(risk):
    """The library call: windows in, certified policies out, one per target, for either risk."""
    lm = LayeredModel(tiny_model("llama", layers=3))
    windows = torch.randint(3, VOCAB, (72, 17), generator=torch.Generator().manual_seed(2))
    results = calibrate_exits(
        lm,
        LogitLens(lm),
        count_costs(lm, context=16),
        windows[:8],
        windows[8:64],
        windows[64:],
        targets=[0.6, 0.8],
        risk=risk,
        epsilon=0.1,
        min_layer=1,
        prompt_tokens=8,
        new_tokens=6,
    )
    assert [r.target for r, _ in results] == [0.6, 0.8]
    for result, classifier in results:
        assert result.risk == risk and classifier is None  # softmax: no classifier
        assert result.policy.exit_points and result.policy.threshold is not None, result.notes
        assert (result.generated is not None) == (risk == "generation")
        assert ("56 prompts of 8 tokens" in result.units) == (risk == "generation")


def test_calibrate_exits_refuses_what_it_cannot_certify_on_and_continues_bare_prompts():
    from dyninfer.certification.exits import PromptSet

    lm = LayeredModel(tiny_model("llama", layers=3))
    windows = torch.randint(3, VOCAB, (40, 17), generator=torch.Generator().manual_seed(3))
    costs, lens = count_costs(lm, context=16), LogitLens(lm)
    common = dict(targets=[0.6], epsilon=0.1, min_layer=1, prompt_tokens=8, new_tokens=4)
    with pytest.raises(DyninferError, match="unknown risk 'vibes'"):
        calibrate_exits(lm, lens, costs, windows[:8], windows[8:32], windows[32:], risk="vibes", **common)
    with pytest.raises(DyninferError, match="certifies on calibration windows, not on prompts"):
        calibrate_exits(
            lm, lens, costs, windows[:8], PromptSet(windows[8:32, :8], None), windows[32:], risk="teacher-forced-consistency", **common
        )
    with pytest.raises(DyninferError, match="fewer than a prompt's 8"):
        calibrate_exits(lm, lens, costs, windows[:8], windows[8:32, :5], windows[32:], **common)
    prompts = PromptSet(windows[8:32, :8], None)  # no continuations yet: the full model's are computed
    ((result, _),) = calibrate_exits(lm, lens, costs, windows[:8], prompts, windows[32:], **common)
    assert prompts.continuations.shape == (24, 4) and result.units.startswith("24 prompts of 8 tokens")

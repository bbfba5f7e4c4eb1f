"""Stop rules: the decisions, values and losses against brute force; the guarantee's validity on synthetic
units with known risk; the runtime obeying a rule exactly as its certification simulated it."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from dyninfer.compressors.stop_certify import certify_completion, certify_reasoning
from dyninfer.compressors.stop_obey import completion_scores as scores
from dyninfer.compressors.stop_simulate import (
    NEVER,
    CompletionRuns,
    Probe,
    ReasoningRun,
    completion_grid,
    completion_losses,
    reasoning_grid,
    shown_tokens,
    text_values,
    token_values,
)
from dyninfer.core.choices import COMPLETION, REASONING
from dyninfer.core.errors import DyninferError
from dyninfer.core.policies import StopPolicy


def _brute_shown(score_row, threshold):
    for t, s in enumerate(score_row):
        if s < threshold:
            return t
    return len(score_row)


def _brute_value(generated, reference, k):
    value = 0
    for a, b in zip(generated[:k], reference[:k]):
        if a != b:
            break
        value += 1
    return value


def test_completion_decisions_and_values_match_brute_force():
    rng = np.random.default_rng(0)
    n, length = 30, 12
    confidence = rng.uniform(0.05, 1.0, size=(n, length))
    reference = rng.integers(0, 3, size=(n, length))
    generated = np.where(rng.uniform(size=(n, length)) < 0.7, reference, (reference + 1) % 3)
    values = token_values(generated, reference)
    for i in range(n):
        for k in range(length + 1):
            assert values[i, k] == _brute_value(generated[i], reference[i], k)
    for signal in ("confidence", "prefix"):
        score = scores(confidence, signal)
        for threshold in (0.0, 0.1, 0.3, 0.6, 0.95):
            shown = shown_tokens(score, threshold)
            losses = completion_losses(values, shown)
            for i in range(n):
                row = confidence[i] if signal == "confidence" else np.cumprod(confidence[i])
                k = _brute_shown(row, threshold)
                assert shown[i] == k
                full = _brute_value(generated[i], reference[i], length)
                expected = 0.0 if full == 0 else (full - _brute_value(generated[i], reference[i], k)) / full
                assert losses[i] == pytest.approx(expected)


def test_a_looser_threshold_never_stops_later_so_losses_grow_along_the_grid():
    rng = np.random.default_rng(1)
    confidence = rng.uniform(size=(50, 20))
    reference = rng.integers(0, 2, size=(50, 20))
    generated = np.where(rng.uniform(size=(50, 20)) < 0.8, reference, 1 - reference)
    values = token_values(generated, reference)
    for signal in ("confidence", "prefix"):
        grid = completion_grid(scores(confidence, signal))
        assert grid[0] == NEVER[COMPLETION] and grid == sorted(grid)
        losses = np.stack([completion_losses(values, shown_tokens(scores(confidence, signal), t)) for t in grid])
        assert losses[0].sum() == 0  # the strictest candidate never stops
        assert np.all(np.diff(losses, axis=0) >= -1e-12)


def test_text_values_count_the_common_prefix_in_characters_and_complete_lines():
    reference = "def f(x):\n    return x\n"
    shown = ["", "def", "def f(x):\n", "def f(x):\n    ret", "def f(x):\n    retu!"]
    assert list(text_values(shown, reference, "characters")) == [0, 3, 10, 17, 18]
    assert list(text_values(shown, reference, "lines")) == [0, 0, 1, 1, 1]


def _runs(rng, n, length, p_right=0.75):
    """Completions where a token's confidence says how likely it is to be right (a calibrated model)."""
    confidence = rng.uniform(0.2, 1.0, size=(n, length))
    right = rng.uniform(size=(n, length)) < confidence * p_right / 0.6
    reference = np.zeros((n, length), dtype=int)
    generated = np.where(right, 0, 1)
    return CompletionRuns(confidence, token_values(generated, reference), generated == reference)


def test_the_certified_completion_rule_keeps_its_bound_on_fresh_units_in_all_but_epsilon_of_draws():
    """Validity: over many random draws of calibration units, the certified rule's true risk (measured on a large
    fresh sample from the same distribution) exceeds delta at most epsilon of the time, within binomial slack."""
    rng = np.random.default_rng(2)
    population = _runs(rng, 20000, 16)
    fit = _runs(rng, 200, 16)
    target, epsilon = 0.9, 0.1
    grid = completion_grid(scores(fit.confidence, "confidence"))
    valued = population.values[:, -1] > 0
    true_risk = {t: float(completion_losses(population.values, shown_tokens(population.confidence, t))[valued].mean()) for t in grid}
    assert max(true_risk.values()) > 1 - target  # the grid reaches rules that break the bound: the test can fail
    trials, violations, certified = 200, 0, 0
    for _ in range(trials):
        cal = population.subset(rng.choice(population.size, 150, replace=False))
        cert = certify_completion(cal, grid, "confidence", target, epsilon)
        chosen = cert.ltt.chosen
        if chosen is not None and chosen != NEVER[COMPLETION]:
            certified += 1
        violations += chosen is not None and true_risk[chosen] > 1 - target
    assert certified > trials // 2  # it certifies something useful most of the time
    # binomial slack: P(Binom(200, 0.1) > 32) < 0.5%
    assert violations <= 32


def _reasoning_run(probes, chain, full, answer):
    return ReasoningRun(chain, full, answer, [Probe(b, a, c, 5) for b, a, c in probes])


def test_reasoning_stop_answers_at_the_first_confident_probe_and_counts_every_probe():
    run = _reasoning_run([(10, 3.0, 0.4), (20, 7.0, 0.8), (30, 7.0, 0.9)], chain=50, full=7.0, answer=7.0)
    assert run.stop("confidence", 0.85) == (7.0, 30 + 15)
    assert run.stop("confidence", 0.5) == (7.0, 20 + 10)
    assert run.stop("confidence", 0.3) == (3.0, 10 + 5)
    assert run.stop("confidence", NEVER[REASONING]) == (7.0, 50)  # never stops: the chain, and no probe runs
    # stable: a probe counts only when its answer equals the previous probe's
    assert run.probe_scores("stable") == [0.0, 0.0, 0.9]
    assert run.stop("stable", 0.3) == (7.0, 30 + 15)


def test_a_rule_probing_at_line_ends_sees_and_pays_for_only_those_probes():
    probes = [
        Probe(10, 3.0, 0.9, 5, line_end=False),
        Probe(20, 7.0, 0.6, 5),
        Probe(30, 7.0, 0.8, 5, line_end=False),
        Probe(40, 7.0, 0.7, 5),
    ]
    run = ReasoningRun(60, 7.0, 7.0, probes)
    lines = run.at("lines")
    assert [p.boundary for p in lines.probes] == [20, 40] and run.at("sentences").probes == probes
    assert run.stop("confidence", 0.65) == (3.0, 10 + 5)  # every sentence end: the first probe is confident
    assert lines.stop("confidence", 0.65) == (7.0, 40 + 10)  # line ends: two probes paid, the second confident
    assert lines.probe_scores("stable") == [0.0, 0.7]  # stable compares consecutive probes at the rule's sites
    with pytest.raises(DyninferError):
        run.at("words")


def test_reasoning_certificate_is_about_the_right_answers_of_the_full_chains():
    rng = random.Random(0)
    runs = []
    for _ in range(300):
        answer = float(rng.randint(1, 9))
        right = rng.random() < 0.6
        full = answer if right else answer + 1
        early = answer if rng.random() < 0.9 else answer + 2
        runs.append(_reasoning_run([(5, early, rng.random()), (15, full, 0.99)], chain=40, full=full, answer=answer))
    grid = reasoning_grid(runs[:100], "confidence")
    assert grid[0] == NEVER[REASONING] and grid[1:] == sorted(grid[1:], reverse=True)
    cert = certify_reasoning(runs[100:], grid, "confidence", target=0.9, epsilon=0.05)
    right = [r for r in runs[100:] if r.right(r.full_answer)]
    assert cert.ltt.n == len(right)  # units: the problems the full chain answers right
    j = cert.ltt.chosen_index
    assert j is not None
    lost = sum(r.right(r.full_answer) and not r.right(r.stop("confidence", cert.ltt.lambdas[j])[0]) for r in runs[100:])
    assert cert.ltt.risks[j] == pytest.approx(lost / len(right))
    with pytest.raises(DyninferError, match="no right answers"):
        certify_reasoning([_reasoning_run([], 10, 1.0, 2.0)], grid, "confidence", 0.9, 0.05)


def test_among_certified_rules_the_one_saving_most_is_chosen_so_probes_that_seldom_fire_never_run():
    rng = random.Random(1)
    runs = []
    for k in range(240):
        if k % 2:  # unsure all along: three probes no rule above 0.3 fires at, wrong answers
            probes = [(10, 9.0, 0.3), (20, 9.0, 0.3), (30, 9.0, 0.3)]
        else:  # sure, but only at the end: the probes cost more than the tokens they save
            probes = [(10, 9.0, 0.3), (20, 9.0, 0.3), (35, 7.0, 0.8 + 0.1 * rng.random())]
        runs.append(_reasoning_run(probes, chain=40, full=7.0, answer=7.0))
    grid = [NEVER[REASONING], 0.8, 0.3]
    cert = certify_reasoning(runs, grid, "confidence", target=0.95, epsilon=0.05)
    assert cert.ltt.rejected[:2] == [True, True] and not cert.ltt.rejected[2]  # 0.8 is certified, 0.3 is not
    assert cert.curve[1]["tokens_saved"] < 0  # it keeps every right answer, and costs more than it saves
    assert cert.threshold is None and "never stopping" in cert.statement()


def test_stop_policy_round_trips_and_refuses_damage():
    policy = StopPolicy(COMPLETION, "prefix", 0.25, 0.95, 0.05, 64)
    assert StopPolicy.from_dict(policy.to_dict()) == policy
    for bad in (
        {"signal": "stable"},
        {"threshold": math.nan},
        {"target": 1.5},
        {"workload": "poetry"},
        {"new_tokens": 0},
        {"probe_at": "words"},
    ):
        with pytest.raises(DyninferError):
            StopPolicy.from_dict(policy.to_dict() | bad)
    reasoning = StopPolicy(REASONING, "stable", 0.5, 0.95, 0.05, 64, probe_at="lines")
    assert StopPolicy.from_dict(reasoning.to_dict()) == reasoning and "line ends" in reasoning.describe()
    made_before = {k: v for k, v in reasoning.to_dict().items() if k != "probe_at"}
    assert StopPolicy.from_dict(made_before).probe_at == "sentences"  # rules made before probe sites probed every sentence end
    with pytest.raises(DyninferError, match="incomplete"):
        StopPolicy.from_dict({"workload": COMPLETION})


# --------------------------------------------------------------------------- the runtime obeys what was certified


@pytest.fixture(scope="module")
def tiny_dynamic():
    from tiny_models import tiny_model

    from dyninfer.core.layered import LayeredModel
    from dyninfer.runtime.dynamic import DynamicModel

    return DynamicModel(LayeredModel(tiny_model("llama", seed=3)), None, None)


def test_the_runtime_stops_a_completion_where_the_simulation_on_the_full_generation_stops(tiny_dynamic):
    from dyninfer.compressors.stop_obey import CompletionStopper

    torch.manual_seed(0)
    prompts = torch.randint(2, 120, (6, 10))
    full = tiny_dynamic.generate(prompts, 12, mode="full", return_logits=True)
    # the scores from the logits themselves, not the runtime's own stop scores
    confidence = torch.stack([torch.softmax(s.float(), -1).max(-1).values for s in full.logits], dim=1).numpy()
    for signal in ("confidence", "prefix"):
        score = scores(confidence, signal)
        for threshold in np.quantile(score, [0.1, 0.5, 0.9]):
            expected = shown_tokens(score, float(threshold))
            for row in range(prompts.shape[0]):
                policy = StopPolicy(COMPLETION, signal, float(threshold), 0.9, 0.1, 12)
                out = tiny_dynamic.generate(prompts[row : row + 1], 12, mode="full", stop=CompletionStopper(policy))
                assert out.tokens.shape[1] == expected[row]
                assert torch.equal(out.tokens[0], full.tokens[row, : expected[row]])
                assert out.stop["reason"] == ("rule" if expected[row] < 12 else "budget")


@pytest.mark.slow
def test_the_runtime_answers_a_chain_where_the_recorded_probes_say_the_rule_stops(tiny_dynamic):
    from dyninfer.compressors.stop_obey import ProbeVocabulary, ReasoningStopper

    # A vocabulary where some ids end steps and some spell digits, so a random model probes and answers.
    # line ends: a third of the step ends
    vocabulary = ProbeVocabulary(
        frozenset(range(10, 40)), {i: str(i % 10) for i in range(40, 110)}, frozenset({5}), [3, 4], frozenset(range(10, 20))
    )
    record = StopPolicy(REASONING, "confidence", None, 0.9, 0.1, 40, probe_tokens=3)
    torch.manual_seed(1)
    checked = 0
    for _ in range(6):
        prompt = torch.randint(2, 120, (1, 8))
        recorder = ReasoningStopper(record, vocabulary, record_only=True)
        full = tiny_dynamic.generate(prompt, 40, mode="full", stop=recorder)
        chain = full.tokens[0].tolist()
        probes = [Probe(b, t.value(vocabulary), t.confidence, t.cost, chain[b - 1] in vocabulary.line_ends) for b, t in recorder.probes]
        recorded = ReasoningRun(full.tokens.shape[1], None, 0.0, probes)
        for signal, probe_at in [(s, p) for s in ("confidence", "stable") for p in ("sentences", "lines")]:
            run = recorded.at(probe_at)
            confident = [s for s in run.probe_scores(signal) if s > 0]
            for threshold in sorted(set(confident))[:2]:
                answer, spent = run.stop(signal, threshold)
                policy = StopPolicy(REASONING, signal, threshold, 0.9, 0.1, 40, probe_tokens=3, probe_at=probe_at)
                stopper = ReasoningStopper(policy, vocabulary)
                out = tiny_dynamic.generate(prompt, 40, mode="full", stop=stopper)
                assert out.stop["reason"] == "answered"
                assert all(chain[b - 1] in vocabulary.sites(probe_at) for b, _ in stopper.probes)
                boundary, trial = stopper.probes[-1]
                assert trial.value(vocabulary) == answer
                assert boundary + stopper.probe_tokens == spent
                # what is shown: the chain up to the boundary, the forced continuation, the answer
                assert out.tokens[0].tolist() == full.tokens[0, :boundary].tolist() + vocabulary.suffix + trial.ids
                checked += 1
    assert checked >= 8


def test_batched_chains_are_probed_row_by_row_as_each_prompt_alone(tiny_dynamic):
    from dyninfer.compressors.cot_data import CotExample
    from dyninfer.compressors.stop_obey import ProbeVocabulary, ReasoningStopper
    from dyninfer.profilers.stop_runs import reasoning_runs

    vocabulary = ProbeVocabulary(
        frozenset(range(10, 40)), {i: str(i % 10) for i in range(40, 110)}, frozenset({5}), [3, 4], frozenset(range(10, 20))
    )
    record = StopPolicy(REASONING, "confidence", None, 0.9, 0.1, 24, probe_tokens=3)
    torch.manual_seed(2)
    # two prompt lengths (batches hold one length), and an end-of-sequence token one chain reaches early
    prompts = [torch.randint(2, 120, (1, 6 + 2 * (k % 2))) for k in range(7)]
    eos = int(tiny_dynamic.generate(prompts[0], 6, mode="full").tokens[0, 4])
    alone = []
    for prompt in prompts:
        recorder = ReasoningStopper(record, vocabulary, record_only=True)
        out = tiny_dynamic.generate(prompt, 24, mode="full", eos_token_id=eos, stop=recorder)
        alone.append((out.tokens.shape[1], recorder.probes, out.tokens[0].tolist()))
    assert any(length < 24 for length, _, _ in alone) and sum(len(p) for _, p, _ in alone) >= 7
    problems = [CotExample(f"q{k}", "", "", 1.0) for k in range(7)]
    batched = reasoning_runs(tiny_dynamic, prompts, problems, record, vocabulary, lambda ids: "", batch_size=3, eos_token_id=eos)
    for run, (length, probes, chain) in zip(batched, alone):
        assert run.chain_tokens == length
        assert [p.line_end for p in run.probes] == [chain[b - 1] in vocabulary.line_ends for b, _ in probes]
        assert [(p.boundary, p.answer, p.cost) for p in run.probes] == [(b, t.value(vocabulary), t.cost) for b, t in probes]
        assert [p.confidence for p in run.probes] == pytest.approx([t.confidence for _, t in probes], abs=1e-5)


def test_reasoning_units_leave_out_the_problems_a_steering_direction_was_made_or_swept_on():
    from dyninfer.compressors.steer_extract import load_cot_split
    from dyninfer.core.artifacts import Artifact, BaseModelInfo
    from dyninfer.core.records import SteerRecord
    from dyninfer.jobs.configs import StopConfig
    from dyninfer.jobs.stop import split_problems, steering_questions

    artifact = Artifact(BaseModelInfo("m", "0" * 64, "llama", 2, 8, 32))
    split = {"data": "builtin:arithmetic:1", "seed": 0, "examples": 40, "heldout": 8, "shots": 0}
    SteerRecord(methods={"valve": {"split": split}}).write(artifact)
    train, held = load_cot_split("builtin:arithmetic:1", 0, 40, 8)
    excluded = steering_questions(artifact)
    assert excluded == {p.question for p in train + held}
    config = StopConfig(workload="reasoning", data="builtin:arithmetic:1", fit_prompts=10, prompts=30, heldout_prompts=10)
    units = split_problems(config, excluded)
    questions = [p.question for part in units.values() for p in part]
    assert len(questions) == 50 == len(set(questions))
    assert not excluded & set(questions)
    assert split_problems(config)["fit"][0].question in excluded  # the same seed's stream starts with the steering's problems

"""The dynamic model against the full model's own greedy decoding, per architecture."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ARCHS, VOCAB, mixed_saturation_policy, tiny_model

from dyninfer.core.errors import DyninferError
from dyninfer.core.layered import LayeredModel
from dyninfer.core.lenses import LogitLens
from dyninfer.core.policies import ExitPolicy
from dyninfer.early_exit.trace import trace_exits
from dyninfer.runtime.dynamic import DynamicModel

NEW = 24
ATTENTION_ARCHS = [a for a in ARCHS if a != "mamba"]


def _setup(arch, layers=4):
    model = tiny_model(arch, layers=layers)
    lm = LayeredModel(model)
    prompt = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(5))
    return model, lm, prompt


def _hf_greedy(model, prompt, n=NEW):
    with torch.no_grad():
        return model.generate(
            prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(prompt), pad_token_id=0
        )[:, prompt.shape[1] :]


def _mixed_policy(lm, prompt, kv_mode, points=(1, 2)):
    """A saturation threshold at which some tokens exit early and some run the full depth."""
    return mixed_saturation_policy(lm, prompt, kv_mode, NEW, points)


@pytest.mark.parametrize("arch", ARCHS)
def test_full_mode_is_the_models_greedy_decoding(arch):
    model, lm, prompt = _setup(arch)
    run = DynamicModel(lm, None, LogitLens(lm)).generate(prompt, NEW, mode="full")
    assert torch.equal(run.tokens, _hf_greedy(model, prompt))
    assert run.exit_layers == [lm.num_layers] * NEW


@pytest.mark.parametrize("arch", ARCHS)
def test_recompute_keeps_deep_tokens_exact(arch):
    """Catch-up fills skipped layers exactly: every full-depth step equals the full model on that prefix."""
    model, lm, prompt = _setup(arch)
    policy, run = _mixed_policy(lm, prompt, "recompute")
    sequence = torch.cat([prompt, run.tokens], dim=1)
    with torch.no_grad():
        reference = model(sequence, use_cache=False).logits[0, prompt.shape[1] - 1 : -1].argmax(-1)
    for step, depth in enumerate(run.exit_layers):
        assert depth in policy.exit_points + [lm.num_layers]
        if depth == lm.num_layers:
            assert run.tokens[0, step] == reference[step], step


@pytest.mark.parametrize("arch", ARCHS)
def test_propagate_runs_and_exits_only_at_exit_points(arch):
    _, lm, prompt = _setup(arch)
    policy, run = _mixed_policy(lm, prompt, "propagate", points=(2, 3))
    assert run.tokens.shape == (1, NEW)
    assert all(e in (2, 3, lm.num_layers) for e in run.exit_layers)  # never before the first exit point
    assert len(run.confidences) == NEW
    assert all(c is not None and c >= policy.threshold for c, e in zip(run.confidences, run.exit_layers) if e < lm.num_layers)


@pytest.mark.parametrize("arch", ATTENTION_ARCHS)
@pytest.mark.parametrize("threshold", [0.0, 0.009, 1.1])
def test_speculative_is_lossless(arch, threshold):
    model, lm, prompt = _setup(arch)
    policy = ExitPolicy("logit", "softmax", [1, 2], threshold, 0, "propagate")
    run = DynamicModel(lm, policy, LogitLens(lm)).generate(prompt, NEW, mode="speculative", max_draft=5)
    assert torch.equal(run.tokens, _hf_greedy(model, prompt))
    assert run.drafted >= run.accepted >= 0


def test_speculative_needs_no_policy_and_checks_its_arguments():
    model, lm, prompt = _setup("gpt2")
    dm = DynamicModel(lm, None, LogitLens(lm))
    run = dm.generate(prompt, NEW, mode="speculative", draft_layer=1, draft_threshold=0.0, max_draft=4)
    assert torch.equal(run.tokens, _hf_greedy(model, prompt))
    assert run.drafted > 0 and set(run.exit_layers) <= {1, lm.num_layers}
    with pytest.raises(DyninferError, match="`draft_layer`"):
        dm.generate(prompt, 4, mode="speculative", draft_layer=lm.num_layers)


def test_speculative_refuses_recurrent_and_sampling():
    _, lm, prompt = _setup("mamba")
    policy = ExitPolicy("logit", "softmax", [1], 0.5, 0, "propagate")
    with pytest.raises(DyninferError, match="roll back"):
        DynamicModel(lm, policy, LogitLens(lm)).generate(prompt, 4, mode="speculative")
    _, lm, prompt = _setup("llama")
    with pytest.raises(DyninferError, match="greedy"):
        DynamicModel(lm, policy, LogitLens(lm)).generate(prompt, 4, mode="speculative", sample=True)


def test_uncertified_policy_never_exits():
    model, lm, prompt = _setup("qwen2")
    policy = ExitPolicy("logit", "softmax", [1, 2], None, 0, "propagate")
    run = DynamicModel(lm, policy, LogitLens(lm)).generate(prompt, NEW)
    assert torch.equal(run.tokens, _hf_greedy(model, prompt)) and run.exit_layers == [lm.num_layers] * NEW


def test_batch_exits_together_and_matches_per_sequence_full_decoding():
    model, lm, _ = _setup("llama")
    prompts = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(9))
    full = DynamicModel(lm, None, LogitLens(lm)).generate(prompts, 12, mode="full")
    for row in range(2):
        assert torch.equal(full.tokens[row : row + 1], _hf_greedy(model, prompts[row : row + 1], 12))
    # CALM's batch rule: the batch leaves at the first point where every row is confident. In recompute mode every
    # state is the full model's along the tokens the batch chose, so a teacher-forced trace of those tokens gives
    # each row's confidence at each decode step independently of the runtime.
    threshold = 0.95  # saturation here runs 0.88-0.99: rows often disagree
    policy = ExitPolicy("logit", "saturation", [1, 2], threshold, 0, "recompute")
    run = DynamicModel(lm, policy, LogitLens(lm)).generate(prompts, 12)
    assert run.tokens.shape == (2, 12) and len(run.exit_layers) == 12  # one exit decision per step
    trace = trace_exits(lm, torch.cat([prompts, run.tokens], 1), [1, 2], LogitLens(lm), "saturation", first=8)
    confident = (trace.confidence >= threshold).reshape(2, 2, -1)  # [point, row, step - 1]
    everyone, anyone = confident.all(1), confident.any(1)
    expected = [next((p for p, ok in zip([1, 2], everyone[:, t]) if ok), lm.num_layers) for t in range(11)]
    assert run.exit_layers[1:] == expected  # step t reads input position 7 + t
    assert (everyone != anyone).any()  # some step where one row alone would have left: the rule was exercised


def test_vocabulary_pruning_picks_among_the_first_checks_candidates():
    _, lm, prompt = _setup("gemma3")
    policy = ExitPolicy("logit", "softmax", [1, 2, 3], 0.0, 3, "propagate")  # exits at the first point
    run = DynamicModel(lm, policy, LogitLens(lm)).generate(prompt, 6)
    assert run.exit_layers[1:] == [1] * 5
    pruned = ExitPolicy("logit", "softmax", [1, 2], 1.0 - 1e-9, 3, "propagate")  # never confident enough
    assert DynamicModel(lm, pruned, LogitLens(lm)).generate(prompt, 6).exit_layers == [lm.num_layers] * 6


def test_sampling_is_seeded():
    _, lm, prompt = _setup("llama")
    dm = DynamicModel(lm, None, LogitLens(lm))
    a = dm.generate(prompt, 16, mode="full", sample=True, seed=1)
    b = dm.generate(prompt, 16, mode="full", sample=True, seed=1)
    c = dm.generate(prompt, 16, mode="full", sample=True, seed=2)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)


def test_bad_generation_arguments():
    _, lm, prompt = _setup("llama")
    dm = DynamicModel(lm, None, LogitLens(lm))
    with pytest.raises(DyninferError, match="no early-exit policy"):
        dm.generate(prompt, 4, mode="early-exit")
    with pytest.raises(DyninferError, match="at least 1"):
        dm.generate(prompt, 0, mode="full")
    with pytest.raises(DyninferError, match="empty"):
        dm.generate(prompt[:, :0], 4, mode="full")

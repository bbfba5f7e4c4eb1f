"""Probe metrics against an independent computation (output_hidden_states + head + scipy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import rel_entr
from scipy.stats import entropy
from tiny_models import ARCHS, VOCAB, tiny_model

from dyninfer.core.cost import CostModel, count_costs
from dyninfer.core.layered import LayeredModel
from dyninfer.core.lenses import LogitLens
from dyninfer.profilers.exit_probe import ECE_BINS, oracle_saving, prediction_depth, run_probe


def _reference_logits(arch: str, model, ids) -> list[np.ndarray]:
    """Per hidden-state index logits, from the model's own output_hidden_states."""
    with torch.no_grad():
        out = model(ids, output_hidden_states=True, use_cache=False)
        hs = out.hidden_states
        if arch == "mamba":  # Mamba lists each layer's output then the normed final state
            states = [model.backbone.embeddings(ids)] + list(hs[:-2])
            norm = model.backbone.norm_f
        else:  # the others list the embedding output, layers 1..L-1, then the normed final state
            states = list(hs[:-1])
            norm = model.transformer.ln_f if arch == "gpt2" else model.model.norm
        logits = []
        for h in states:
            z = model.lm_head(norm(h))
            cap = getattr(model.config, "final_logit_softcapping", None)
            logits.append(torch.tanh(z / cap) * cap if cap else z)
        logits.append(out.logits)
    return [z.reshape(-1, z.shape[-1]).double().numpy() for z in logits]


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _ece(conf: np.ndarray, hit: np.ndarray) -> float:
    total = 0.0
    for b in range(ECE_BINS):
        lo, hi = b / ECE_BINS, (b + 1) / ECE_BINS
        members = (conf >= lo) & ((conf < hi) if b < ECE_BINS - 1 else (conf <= hi))
        if members.any():
            total += members.sum() * abs(hit[members].mean() - conf[members].mean())
    return total / len(conf)


def _brute_depth(top1: np.ndarray) -> np.ndarray:
    depths = []
    for t in range(top1.shape[1]):
        d = top1.shape[0] - 1
        while d > 0 and top1[d - 1, t] == top1[-1, t]:
            d -= 1
        depths.append(d)
    return np.array(depths)


@pytest.mark.parametrize("arch", ARCHS)
def test_logit_lens_metrics_match_independent_computation(arch):
    model = tiny_model(arch)
    lm = LayeredModel(model)
    windows = torch.randint(0, VOCAB, (3, 17), generator=torch.Generator().manual_seed(3))
    costs = count_costs(lm, context=16)
    result = run_probe(lm, windows, [LogitLens(lm)], costs, batch_size=2)

    logits = _reference_logits(arch, model, windows[:, :-1])
    targets = windows[:, 1:].reshape(-1).numpy()
    probs = [_softmax(z) for z in logits]
    final_top1 = logits[-1].argmax(-1)
    rows = result.layers
    assert list(rows["layer"]) == list(range(lm.num_layers + 1))
    assert result.n_tokens == targets.size
    for index, p in enumerate(probs):
        row = rows.iloc[index]
        top1 = logits[index].argmax(-1)
        assert row.agreement == pytest.approx((top1 == final_top1).mean(), abs=1e-12)
        assert row.accuracy == pytest.approx((top1 == targets).mean(), abs=1e-12)
        assert row.kl == pytest.approx(rel_entr(probs[-1], p).sum(-1).mean(), abs=1e-4)
        assert row.entropy == pytest.approx(entropy(p, axis=-1).mean(), rel=1e-4)
        assert row.max_prob == pytest.approx(p.max(-1).mean(), rel=1e-5)
        assert row.ece == pytest.approx(_ece(p.max(-1), (top1 == targets).astype(float)), abs=1e-5)
    assert rows.iloc[-1].agreement == 1.0 and rows.iloc[-1].kl == pytest.approx(0.0, abs=1e-6)

    top1_all = np.stack([z.argmax(-1) for z in logits])
    expected_depth = np.bincount(_brute_depth(top1_all), minlength=lm.num_layers + 1)
    assert list(result.depth["tokens"]) == list(expected_depth)
    assert rows["can_exit_by"].iloc[-1] == pytest.approx(1.0)


def test_prediction_depth_matches_brute_force():
    rng = np.random.default_rng(0)
    top1 = rng.integers(0, 3, size=(9, 500))  # few classes: plenty of agree/disagree patterns
    np.testing.assert_array_equal(prediction_depth(top1), _brute_depth(top1))


def test_prediction_depth_requires_staying_equal():
    # Agrees at index 1, disagrees at 2, agrees again from 3: depth is 3, not 1.
    top1 = np.array([[5], [7], [1], [7], [7]])
    assert prediction_depth(top1).tolist() == [3]


def test_oracle_saving_hand_computed():
    costs = CostModel(context=0, embed=0.0, layers=[1.0, 1.0, 1.0], norm=0.0, head=2.0, translator=0.5)
    counts = np.array([1, 0, 1, 2])  # depths 0, 2, 3, 3
    plain = oracle_saving(counts, costs, translated=False)
    assert plain.full_cost == 5.0
    assert plain.expected_cost == pytest.approx((2 + 4 + 5 + 5) / 4)
    assert plain.saving == pytest.approx(1 - 4.0 / 5.0)
    assert plain.mean_depth == pytest.approx((0 + 2 + 3 + 3) / 4)
    tuned = oracle_saving(counts, costs, translated=True)  # the translator is paid below the top only
    assert tuned.expected_cost == pytest.approx((2.5 + 4.5 + 5 + 5) / 4)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_flop_counts_match_hand_count(attn):
    from tiny_models import tiny_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation=attn).eval()
    context = 16
    costs = count_costs(LayeredModel(model), context=context)
    d, kv, heads, head_dim, ffn = 32, 2 * 8, 4, 8, 64
    linear_macs = d * d + d * kv + d * kv + d * d + 3 * d * ffn  # q, k, v, o, gate/up/down
    attention_macs = 2 * heads * head_dim * (context + 1)  # scores and weighted sum over context + 1 keys
    assert costs.layers == [2.0 * (linear_macs + attention_macs)] * 3
    assert costs.head == 2.0 * d * VOCAB
    assert costs.full_cost() == pytest.approx(sum(costs.layers) + costs.head + costs.embed + costs.norm)
    assert costs.exit_cost(0) == pytest.approx(costs.embed + costs.norm + costs.head)

"""The fidelity risk: the deployed step teacher-forced along the full model's continuations, position by position
against the full model's distributions (certification/fidelity.py)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from tiny_models import mixed_saturation_policy, tiny_model

from dyninfer.certification.fidelity import (
    FidelitySetting,
    certify_fidelity,
    certify_fidelity_path,
    decoder_logits,
    measure_fidelity,
    rows_logits,
)
from dyninfer.compressors.ltt import betting_p_value
from dyninfer.core.errors import DyninferError
from dyninfer.core.layered import LayeredModel
from dyninfer.core.lenses import LogitLens
from dyninfer.runtime.dynamic import DynamicModel


@pytest.fixture(scope="module")
def setup():
    lm = LayeredModel(tiny_model("llama", layers=3))
    prompts = torch.randint(0, 128, (8, 10), generator=torch.Generator().manual_seed(1))
    policy, _ = mixed_saturation_policy(lm, prompts[:1], "propagate", 16)
    continuations = DynamicModel(lm, None, None).generate(prompts, 12, mode="full").tokens
    return lm, policy, prompts.numpy(), continuations.numpy()


def test_each_row_exits_as_it_would_alone(setup):
    """The torch side batches rows (each deciding its own exits); a package runs batch 1: the same risk."""
    lm, policy, prompts, continuations = setup
    dynamic = DynamicModel(lm, policy, LogitLens(lm))
    batched, depths = rows_logits(dynamic)(prompts, continuations, policy.threshold)
    alone, alone_depths = decoder_logits(dynamic)(prompts, continuations, policy.threshold)
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    assert (depths == alone_depths).all() and len(np.unique(depths[:, 1:])) > 1  # exits and full-depth positions


def test_measures_against_an_independent_computation(setup):
    """With exits disabled the dynamic model is the full model: every position agrees, KL ~ 0. With exits on, the
    measures equal those computed here from the two models' own logits (numpy, no dyninfer code)."""
    lm, policy, prompts, continuations = setup
    dynamic = DynamicModel(lm, policy, LogitLens(lm))
    disabled = measure_fidelity(rows_logits(dynamic), lm, (prompts, continuations), None, batch_size=3).measures()
    assert disabled["same_top1"] == 1.0 and disabled["mean_kl"] < 1e-6 and abs(disabled["perplexity_ratio"] - 1) < 1e-6
    run = measure_fidelity(rows_logits(dynamic), lm, (prompts, continuations), policy.threshold, batch_size=3)
    ids = torch.from_numpy(np.concatenate([prompts, continuations], axis=1))
    with torch.no_grad():
        full = lm.model(ids).logits[:, prompts.shape[1] - 1 : -1].double().log_softmax(-1).numpy()
    exited = decoder_logits(dynamic)(prompts, continuations, policy.threshold)[0].astype(np.float64)
    exited = exited - np.log(np.exp(exited - exited.max(-1, keepdims=True)).sum(-1, keepdims=True)) - exited.max(-1, keepdims=True)
    kl = (np.exp(full) * (full - exited)).sum(-1)
    assert np.array_equal(run.disagree, full.argmax(-1) != exited.argmax(-1)) and 0 < run.disagree.mean() < 1
    np.testing.assert_allclose(run.kl, kl, atol=1e-5)
    measures = run.measures()
    assert measures["same_top1"] == pytest.approx(1 - run.disagree.mean()) and measures["kl_p99"] >= measures["mean_kl"] > 0
    nll = -np.take_along_axis(exited, continuations[..., None], -1)[..., 0]
    nll_full = -np.take_along_axis(full, continuations[..., None], -1)[..., 0]
    assert measures["perplexity_ratio"] == pytest.approx(np.exp(nll.mean() - nll_full.mean()), rel=1e-5)


def test_the_certificate_tests_exits_disabled_first_and_stops_where_the_risk_breaks(setup):
    lm, policy, prompts, continuations = setup
    dynamic = DynamicModel(lm, policy, LogitLens(lm))
    rows = rows_logits(dynamic)
    strict, loose = policy.threshold, policy.threshold - 0.5  # the loose one exits almost everywhere
    certified = certify_fidelity(rows, lm, (prompts, continuations), None, [strict, loose], target=0.5, epsilon=0.5)
    assert [point["threshold"] for point in certified.curve][0] is None  # exits disabled come first, certified
    assert certified.full_depth_certified and certified.curve[0]["same_top1"] == 1.0
    # each tested candidate's p-value is the betting p-value of its per-prompt disagreement shares
    run = measure_fidelity(rows, lm, (prompts, continuations), certified.curve[-1]["threshold"])
    assert certified.ltt.p_values[-1] == pytest.approx(betting_p_value(run.disagree.mean(axis=1), 0.5, 0.5))
    chosen = certified.ltt.chosen_index
    assert certified.threshold == [None, strict, loose][chosen]
    with pytest.raises(DyninferError, match="cannot certify fidelity"):
        certify_fidelity(rows, lm, (prompts, continuations), None, [strict], target=0.95, epsilon=0.05)


def _noisy(lm: LayeredModel, scale: float, seed: int) -> LayeredModel:
    """A copy of the model with every weight moved by Gaussian noise of `scale` times its own spread."""
    model = copy.deepcopy(lm.model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale * p.std().clamp_min(1e-3))
    return LayeredModel(model)


def test_a_path_of_decoders_certifies_the_last_setting_before_the_first_failure(setup):
    """`export --weights auto`'s path: candidates of falling fidelity, each with exits disabled, then a threshold on the
    last. The test stops at the first that fails; the setting before it is certified, with its label."""
    lm, policy, prompts, continuations = setup
    decoders = {name: DynamicModel(model, policy, LogitLens(model)) for name, model in (("exact", lm), ("close", _noisy(lm, 0.05, 1)))}
    decoders["far"] = DynamicModel(_noisy(lm, 3.0, 2), policy, LogitLens(lm))
    path = [FidelitySetting(rows_logits(d), None, {"weights": name}) for name, d in decoders.items()]
    path.append(FidelitySetting(rows_logits(decoders["far"]), policy.threshold, {"weights": "far"}))
    certified = certify_fidelity_path(path, lm, (prompts, continuations), None, target=0.5, epsilon=0.5)
    labels = [point["weights"] for point in certified.curve]
    assert labels == ["exact", "close", "far"]  # computed as far as the test went: the threshold on "far" never ran
    top1 = [point["same_top1"] for point in certified.curve]
    assert top1[0] == 1.0 and top1[1] > 0.5 > top1[2]  # independent of the test: the settings' own agreement
    assert certified.ltt.p_values[1] <= 0.5 < certified.ltt.p_values[2]
    assert certified.chosen == 1 and certified.threshold is None and certified.full_depth_certified

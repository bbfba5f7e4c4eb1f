"""Dynamic MLP pruning on tiny models of every attention family: masks, kernels, calibration, predictors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_model

from dyninfer.compressors.pruning import (
    PruningPlan,
    SparseMLP,
    counting_active,
    dense_inside,
    install_pruning,
    pruned,
    remove_pruning,
    sparse_modules,
)
from dyninfer.compressors.pruning_calibration import (
    calibrate_threshold_plan,
    collect_mlp_samples,
    greedy_allocation,
    neuron_labels,
    predictor_recall,
    train_predictors,
)
from dyninfer.core.errors import DyninferError
from dyninfer.core.layered import LayeredModel
from dyninfer.core.records import PruneRecord
from dyninfer.profilers.bench import greedy_generate

ATTENTION_ARCHS = ("llama", "qwen2", "mistral", "gemma3", "gpt2")


def _lm(arch: str, layers: int = 3) -> LayeredModel:
    return LayeredModel(tiny_model(arch, layers=layers).requires_grad_(False))


def _windows(n: int, length: int = 33, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, 100, (n, length), generator=torch.Generator().manual_seed(seed))


def _module_hidden(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """h computed by the Hugging Face module's own sub-modules (independent of MlpWeights)."""
    if hasattr(mlp, "gate_proj"):
        return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    return mlp.act(mlp.c_fc(x))


@pytest.mark.parametrize("arch", ATTENTION_ARCHS)
def test_nothing_pruned_equals_the_dense_mlp_on_every_path(arch):
    lm = _lm(arch)
    n = lm.mlp_weights(0).neurons
    plan = PruningPlan("threshold", 0.0, "uniform", [0.0] * 3, [-1.0] * 3)  # every |h| > -1
    x_prefill, x_token = torch.randn(2, 5, lm.hidden_size), torch.randn(1, 1, lm.hidden_size)
    with torch.no_grad():
        expected = [lm.mlp(0)(x_prefill), lm.mlp(0)(x_token)]
        for backend in ("masked", "reference", "cpu"):
            with pruned(lm, plan, backend):
                module = lm.mlp(0)
                assert isinstance(module, SparseMLP) and module.weights.neurons == n
                torch.testing.assert_close(module(x_prefill), expected[0], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(module(x_token), expected[1], atol=1e-5, rtol=1e-5)
    assert not sparse_modules(lm)  # removed again


@pytest.mark.parametrize("arch", ATTENTION_ARCHS)
@pytest.mark.parametrize("method", ["threshold", "threshold_inputs", "predictor"])
def test_sparse_kernels_equal_the_masked_dense_mlp(arch, method):
    """Decoding one token through the kernels computes exactly the masked function."""
    lm = _lm(arch)
    samples = collect_mlp_samples(lm, _windows(4))
    if method == "predictor":
        plan, _ = train_predictors(lm, samples, 0.5, rank=8, steps=20)
    else:
        plan = calibrate_threshold_plan(lm, samples, 0.5, input_sparsity=0.3 if method == "threshold_inputs" else 0.0)
    tokens = [samples.inputs[i][:6] for i in range(3)]
    with torch.no_grad():
        with pruned(lm, plan, "masked"):
            expected = [lm.mlp(i)(t[:, None]) for i, t in enumerate(tokens)]
        for backend in ("reference", "cpu"):
            with pruned(lm, plan, backend):
                for i, t in enumerate(tokens):
                    got = torch.cat([lm.mlp(i)(row.view(1, 1, -1)) for row in t])
                    torch.testing.assert_close(got, expected[i], atol=1e-5, rtol=1e-4)
    assert expected[0].abs().sum() > 0  # not trivially zero


def test_masks_really_drop_neurons():
    lm = _lm("llama")
    samples = collect_mlp_samples(lm, _windows(4))
    plan = calibrate_threshold_plan(lm, samples, 0.5)
    x = samples.inputs[1][:8]
    with torch.no_grad():
        dense = lm.mlp(1)(x)
        h = _module_hidden(lm.mlp(1), x)
        keep = h.abs() > plan.thresholds[1]
        expected = F.linear(torch.where(keep, h, 0.0), lm.mlp(1).down_proj.weight)
        with pruned(lm, plan, "masked"):
            got = lm.mlp(1)(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, dense, atol=1e-4)
    assert 0.3 < 1 - keep.float().mean() < 0.7


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method,target", [("threshold", 0.5), ("threshold", 0.25), ("predictor", 0.4)])
def test_achieved_sparsity_matches_the_target_on_heldout_text(arch, method, target):
    lm = _lm(arch)
    train, heldout = _windows(24, seed=1), _windows(24, seed=2)
    samples = collect_mlp_samples(lm, train)
    if method == "threshold":
        plan = calibrate_threshold_plan(lm, samples, target)
    else:
        plan, _ = train_predictors(lm, samples, target, rank=8, steps=40)
    with torch.no_grad(), pruned(lm, plan, "masked"), counting_active(lm) as counts:
        for window in heldout:
            lm.model(window[None], use_cache=False)
    n = lm.mlp_weights(0).neurons
    achieved = [1 - active / (tokens * n) for active, tokens in counts]
    for layer_sparsity in achieved:
        assert abs(layer_sparsity - target) <= 0.02, achieved


@pytest.mark.slow
def test_predictor_recall_against_independent_topk_sets():
    lm = _lm("qwen2")
    samples = collect_mlp_samples(lm, _windows(16, seed=3))
    held = collect_mlp_samples(lm, _windows(4, seed=4))
    plan, training = train_predictors(lm, samples, 0.5, rank=16, steps=150)
    rows = predictor_recall(lm, plan, held)
    n = lm.mlp_weights(0).neurons
    for i, row in enumerate(rows):
        x = held.inputs[i]
        with torch.no_grad():
            contribution = _module_hidden(lm.mlp(i), x).abs() * lm.mlp(i).down_proj.weight.norm(dim=0)
            truth = torch.zeros_like(contribution, dtype=torch.bool)
            truth.scatter_(-1, contribution.topk(n // 2, dim=-1).indices, True)
            chosen = plan.predictors[i](x) > plan.thresholds[i]
        expected = (chosen & truth).sum().item() / truth.sum().item()
        assert row["recall"] == pytest.approx(expected, abs=1e-6)
        assert row["recall"] > 0.55  # better than chance (0.5) after training
    assert len(training.final_loss) == 3


def test_mass_labels_are_the_smallest_set_holding_the_mass():
    h = torch.tensor([[0.1, -4.0, 3.0, 0.5, -2.0, 0.4]])
    labels = neuron_labels(h, label="mass", sparsity=0.0, mass=0.75)
    # |h| sorted: 4, 3, 2, 0.5, 0.4, 0.1 (sum 10): 4 + 3 = 7 < 7.5, + 2 = 9 >= 7.5 -> three neurons
    assert labels.tolist() == [[False, True, True, False, True, False]]
    topk = neuron_labels(h, label="topk", sparsity=0.5, mass=0.0)
    assert topk.tolist() == [[False, True, True, False, True, False]]


def test_greedy_allocation_spends_sparsity_where_it_is_cheap():
    step = 0.25
    grid = torch.arange(0, 1.0, step)  # 0, .25, .5, .75
    errors = torch.stack([grid * 0.01, grid**2, grid * 10.0])  # layer 0 cheap, layer 2 dear
    allocation = greedy_allocation(errors, target=0.5, step=step)
    assert sum(allocation) / 3 == pytest.approx(0.5)
    assert allocation[0] == pytest.approx(0.75) and allocation[2] == 0.0


def test_plan_round_trips_through_artifact_tensors():
    lm = _lm("llama")
    samples = collect_mlp_samples(lm, _windows(4))
    plan, _ = train_predictors(lm, samples, 0.5, rank=4, steps=5)
    stage = PruneRecord(plan=plan.describe())
    loaded = PruningPlan.from_artifact(stage, plan.tensors(), lm)
    assert loaded.thresholds == pytest.approx(plan.thresholds) and loaded.method == "predictor"
    x = samples.inputs[0][:3]
    torch.testing.assert_close(loaded.predictors[0](x), plan.predictors[0](x))
    with pytest.raises(DyninferError, match="layers"):
        PruningPlan.from_artifact(stage, plan.tensors(), _lm("llama", layers=2))


def test_pruned_decoding_through_the_kernels_matches_masked_decoding():
    lm = _lm("llama")
    plan = calibrate_threshold_plan(lm, collect_mlp_samples(lm, _windows(4)), 0.4)
    prompt = _windows(1, length=6, seed=9)
    with pruned(lm, plan, "masked"):
        masked = greedy_generate(lm.model, prompt, 12)
    with pruned(lm, plan, "cpu"):
        sparse = greedy_generate(lm.model, prompt, 12)
        with dense_inside(lm):
            dense = greedy_generate(lm.model, prompt, 12)
        assert sparse_modules(lm)  # restored after the dense block
    assert torch.equal(masked, sparse)
    assert torch.equal(dense, greedy_generate(lm.model, prompt, 12))


def test_recurrent_models_have_no_mlp_to_prune():
    lm = _lm("mamba")
    with pytest.raises(DyninferError, match="no MLP"):
        install_pruning(lm, PruningPlan("threshold", 0.5, "uniform", [0.5] * 3, [0.0] * 3))
    dense = _lm("llama")
    modules = [dense.mlp(i) for i in range(3)]
    remove_pruning(dense)  # a no-op on a dense model
    assert all(dense.mlp(i) is module for i, module in enumerate(modules))

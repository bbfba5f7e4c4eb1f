"""`prune`: workspace -> MLP statistics -> masks per sparsity -> quality, cost and speed.

For each sparsity (the target, plus `sweep` points) the job builds a plan (thresholds, or
trained predictors), then measures on held-out windows: perplexity and next-token agreement
against the dense model, the achieved sparsity per layer, the predictors' recall, FLOPs and
weight bytes per token (the dense MLP counted with torch's flop counter), and, unless
`speed` is off, the MLP-block and end-to-end decoding speed, dense vs sparse in one run.
The target's plan is recorded in the artifact (`masks.safetensors` + the `prune` stage); `save`
writes the artifact and its `prune/` report folder (the summary and the sweep plot).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from dyninfer.compressors.pruning import PruningPlan, counting_active, pruned
from dyninfer.compressors.pruning_calibration import (
    MlpSamples,
    PredictorTraining,
    calibrate_threshold_plan,
    collect_mlp_samples,
    predictor_recall,
    train_predictors,
)
from dyninfer.core import distributed, stages
from dyninfer.core.artifacts import Artifact
from dyninfer.core.cost import count_costs
from dyninfer.core.errors import DyninferError, option
from dyninfer.core.layered import LayeredModel
from dyninfer.core.progress import ProgressFn
from dyninfer.core.records import PruneRecord
from dyninfer.jobs.configs import PruneConfig
from dyninfer.jobs.plots import pruning_sweep_png
from dyninfer.profilers.exit_probe import heldout_quality
from dyninfer.profilers.prune_bench import SpeedResult, measure_speed
from dyninfer.runtime.loader import ModelSession, Workspace, workspace_for


@dataclass
class SparsityPoint:
    """Everything measured for one sparsity."""

    sparsity: float
    plan: PruningPlan
    perplexity: float
    perplexity_change: float  # relative to dense
    agreement: float  # next-token argmax equal to the dense model's, held-out positions
    layer_sparsity: list[float]  # achieved on held-out tokens
    mlp_flops_dense: float  # per token, all layers
    mlp_flops_sparse: float
    mlp_bytes_dense: float  # weight bytes read per decoded token, all layers
    mlp_bytes_sparse: float
    model_flops_dense: float
    recall: list[float] | None = None  # predictor: per layer, of the true needed set
    speed: SpeedResult | None = None
    training_loss: list[float] | None = None

    @property
    def achieved_sparsity(self) -> float:
        return sum(self.layer_sparsity) / len(self.layer_sparsity)

    def to_dict(self) -> dict:
        # Not asdict(): it would deep-copy the plan's predictor modules only to drop them.
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("plan", "speed")}
        out["achieved_sparsity"] = self.achieved_sparsity
        out["flops_saved"] = 1 - self.mlp_flops_sparse / self.mlp_flops_dense
        out["model_flops_saved"] = (self.mlp_flops_dense - self.mlp_flops_sparse) / self.model_flops_dense
        out["plan"] = self.plan.describe()
        out["speed"] = self.speed.to_dict() if self.speed else None
        if self.recall:
            out["mean_recall"] = sum(self.recall) / len(self.recall)
        return out


@dataclass
class PruneReport:
    config: PruneConfig
    base_model: dict
    data: dict
    dense_perplexity: float
    points: list[SparsityPoint]
    timings: dict
    notes: list[str] = dataclasses.field(default_factory=list)
    artifact: Artifact | None = None
    placement: dict | None = None  # where the model ran ({device, dtype})

    @property
    def main(self) -> SparsityPoint:
        return next(p for p in self.points if math.isclose(p.sparsity, self.config.sparsity, abs_tol=1e-6))

    def summary(self) -> dict:
        return {
            "command": "prune",
            "model": self.base_model,
            "data": self.data,
            "config": asdict(self.config),
            "dense_perplexity": self.dense_perplexity,
            "main": self.main.to_dict(),
            "points": [p.to_dict() for p in self.points],
            "timings": self.timings,
            "notes": self.notes,
            "placement": self.placement,
        }

    def figure(self) -> bytes:
        return pruning_sweep_png(
            [p.to_dict() for p in self.points], self.dense_perplexity, f"{self.base_model['spec']}: {self.config.method} pruning"
        )

    def files(self) -> dict[str, bytes]:
        """The prune/ report folder: the summary and the quality/speed sweep plot."""
        return {"summary.json": json.dumps(self.summary(), indent=2, default=str).encode(), "sweep.png": self.figure()}


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@torch.no_grad()
def _mlp_costs(
    lm: LayeredModel, plan: PruningPlan, layer_sparsity: list[float], input_sparsity: list[float]
) -> tuple[float, float, float, float]:
    """(dense FLOPs, sparse FLOPs, dense bytes, sparse bytes) of all MLPs per decoded token.

    Dense parts are counted with torch's flop counter on one token; the sparse path runs the
    same products on the active fraction of rows (plus the predictor, counted the same way).
    """
    dense_f = sparse_f = dense_b = sparse_b = 0.0
    for i in range(lm.num_layers):
        w = lm.mlp_weights(i)
        x = torch.zeros(1, w.first.shape[1], dtype=w.first.dtype, device=w.first.device)
        h = torch.zeros(1, w.neurons, dtype=w.first.dtype, device=w.first.device)
        first = _flops(lambda: F.linear(x, w.first)) * (2 if w.kind == "gated" else 1)  # gate + up
        down = _flops(lambda: F.linear(h, w.down))
        keep, keep_in = 1.0 - layer_sparsity[i], 1.0 - input_sparsity[i]
        element = w.first.element_size()
        dense_f += first + down
        dense_b += (first + down) / 2 * element  # one weight read per multiply-add
        if plan.method == "predictor":
            predictor = _flops(lambda: plan.predictors[i](x))
            sparse_f += (first + down) * keep + predictor
            sparse_b += ((first + down) * keep + predictor) / 2 * element
        else:
            sparse_f += first * keep_in + down * keep
            sparse_b += (first * keep_in + down * keep) / 2 * element
    return dense_f, sparse_f, dense_b, sparse_b


@torch.no_grad()
def _evaluate(lm: LayeredModel, windows: torch.Tensor, plan: PruningPlan | None) -> tuple[float, torch.Tensor, list]:
    """(perplexity, argmax predictions, per-layer [active, tokens] counts) on `windows` (sharded when data-parallel)."""
    with pruned(lm, plan, backend="masked"), counting_active(lm) as counts:
        perplexity, argmax = heldout_quality(lm, windows)
        counted = distributed.current().sum(np.array([list(c) for c in counts], dtype=np.float64)).tolist() if counts else []
    return perplexity, argmax, counted


def _input_sparsity_achieved(plan: PruningPlan, samples: MlpSamples) -> list[float]:
    if not plan.input_thresholds:
        return [0.0] * plan.num_layers
    return [float((x.abs() <= t).float().mean()) for x, t in zip(samples.inputs, plan.input_thresholds)]


@dataclass
class _DenseBaseline:
    """What every sparsity is measured against: the held-out windows and their MLP samples, the dense
    model's perplexity, predictions and FLOPs, and the inputs of the speed measurement."""

    heldout: torch.Tensor
    samples: MlpSamples
    perplexity: float
    argmax: torch.Tensor
    model_flops: float
    prompts: torch.Tensor
    mlp_inputs: list[torch.Tensor]


def _open_prunable_workspace(
    config: PruneConfig, progress: ProgressFn | None, existing: str | Artifact | None, session: ModelSession | None
) -> Workspace:
    """The workspace with the dense model (masks taken out); refuses models and ranks pruning cannot use."""
    ws = workspace_for(
        config,
        config.data,
        config.seq_len,
        existing=existing,
        progress=progress,
        session=session,
        apply_pruning=False,
        check_data=lambda windows, stored: (
            windows.take("train", config.calibration_tokens, option="calibration_tokens"),
            windows.take("heldout", config.heldout_tokens, option="heldout_tokens"),
        ),
    )
    lm = ws.lm
    lm.require_prunable()  # refuses families without dense MLPs (recurrent, mixture of experts) before any work
    lm.require_weights("prune")
    if config.method != "threshold" and config.rank > lm.hidden_size:  # a predictor [d x rank] beyond full rank
        raise DyninferError(
            f"{option('rank')} {config.rank} is more than the model's hidden size {lm.hidden_size}: a low-rank predictor "
            f"gains nothing past it; pass {option('rank')} {lm.hidden_size} or less"
        )
    return ws


def _dense_baseline(lm: LayeredModel, heldout: torch.Tensor, config: PruneConfig) -> _DenseBaseline:
    held_samples = collect_mlp_samples(lm, heldout[: max(1, min(4, heldout.shape[0]))])
    dense_ppl, dense_argmax, _ = _evaluate(lm, heldout, None)
    model_flops = count_costs(lm, context=config.seq_len).full_cost()
    prompts = heldout[: config.prompts, : config.prompt_tokens]
    # One decoding token per layer for the MLP-block timing: a held-out position's real MLP input.
    mlp_inputs = [x[-1:].view(1, 1, -1).to(lm.device, lm.lm_head.weight.dtype) for x in held_samples.inputs]
    return _DenseBaseline(heldout, held_samples, dense_ppl, dense_argmax, model_flops, prompts, mlp_inputs)


def _learn_plan(
    lm: LayeredModel, samples: MlpSamples, sparsity: float, config: PruneConfig, progress: ProgressFn | None
) -> tuple[PruningPlan, PredictorTraining | None]:
    """The plan for `sparsity` by `config.method`, and the predictors' training (None for thresholds)."""
    if config.method == "threshold":
        return calibrate_threshold_plan(lm, samples, sparsity, allocation=config.allocation, input_sparsity=config.input_sparsity), None
    return train_predictors(
        lm,
        samples,
        sparsity,
        rank=config.rank,
        label=config.label,
        mass=config.mass,
        steps=config.steps,
        seed=config.seed,
        progress=progress,
    )


def _measure_point(
    lm: LayeredModel,
    sparsity: float,
    plan: PruningPlan,
    training: PredictorTraining | None,
    base: _DenseBaseline,
    config: PruneConfig,
    progress: ProgressFn | None,
) -> SparsityPoint:
    """Quality, achieved sparsity, cost and (unless `config.speed` is off) speed of `plan` against the dense model."""
    ppl, argmax, counts = _evaluate(lm, base.heldout, plan)
    achieved = [1.0 - active / (tokens * lm.mlp_weights(i).neurons) for i, (active, tokens) in enumerate(counts)]
    costs = _mlp_costs(lm, plan, achieved, _input_sparsity_achieved(plan, base.samples))
    recall = [r["recall"] for r in predictor_recall(lm, plan, base.samples)] if plan.predictors else None
    speed = None
    if config.speed:
        speed = measure_speed(lm, plan, base.mlp_inputs, base.prompts, config.new_tokens, backend=config.backend, progress=progress)
    return SparsityPoint(
        sparsity,
        plan,
        ppl,
        ppl / base.perplexity - 1,
        float((argmax == base.argmax).float().mean()),
        achieved,
        *costs,
        base.model_flops,
        recall,
        speed,
        training.final_loss if training else None,
    )


def _record_main_plan(report: PruneReport, artifact: Artifact) -> None:
    """Write the target sparsity's plan into the artifact: the `prune` stage and its masks."""
    main = report.main
    PruneRecord.from_dict({k: v for k, v in report.summary().items() if k != "points"} | {"plan": main.plan.describe()}).write(artifact)
    artifact.put_tensors(stages.MASKS_GROUP, main.plan.tensors())
    report.artifact = artifact


def run(
    config: PruneConfig, progress: ProgressFn | None = None, existing: str | Artifact | None = None, session: ModelSession | None = None
) -> PruneReport:
    """Learn masks at each sparsity from the dense model (an artifact's old masks are taken out first)."""
    config.validate()
    torch.manual_seed(config.seed)
    ws = _open_prunable_workspace(config, progress, existing, session)
    lm, windows = ws.lm, ws.windows
    calibration = windows.take("train", config.calibration_tokens, option="calibration_tokens")
    heldout = windows.take("heldout", config.heldout_tokens, option="heldout_tokens")
    samples = collect_mlp_samples(lm, calibration, progress)
    base = _dense_baseline(lm, heldout, config)
    points = []
    for n, sparsity in enumerate(config.sparsities()):
        if progress:
            progress("pruning at each sparsity", n, len(config.sparsities()))
        plan, training = _learn_plan(lm, samples, sparsity, config, progress)
        points.append(_measure_point(lm, sparsity, plan, training, base, config, progress))
    report = PruneReport(
        config, ws.loaded.base_model_info(), windows.describe(), base.perplexity, points, ws.timings, placement=ws.loaded.placement
    )
    if config.method == "threshold" and config.input_sparsity == 0:
        report.notes.append(
            "only the down projection skips rows (gate and up are dense to compute |h|): the MLP "
            "block's speedup is bounded by 1/(2/3 + (1-s)/3); `input_sparsity` or `method` "
            "predictor sparsify gate/up too"
        )
    _record_main_plan(report, ws.artifact)
    return report


def save(report: PruneReport, out: str | os.PathLike, on_wait: Callable[[], None] | None = None) -> Path:
    """Save the artifact (masks) and its prune/ report folder."""
    return report.artifact.save(out, reports={stages.PRUNE: report.files()}, on_wait=on_wait)

"""What the fit data decides before calibration: the exit points (greedy, by predicted speedup under the
cost model), the exit classifier (CALM's meta classifier) and the candidate thresholds, strict to loose.

Everything here sees only the fit windows, so the calibration windows stay exchangeable with
deployment text and fixed-sequence testing over the grid stays valid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dyninfer.core import distributed
from dyninfer.core.choices import RISKS
from dyninfer.core.cost import CostModel
from dyninfer.core.errors import DyninferError
from dyninfer.core.layered import LayeredModel
from dyninfer.core.lenses import local_hidden_states
from dyninfer.core.progress import ProgressFn
from dyninfer.early_exit import confidence as conf
from dyninfer.early_exit.trace import Trace, simulate, trace_exits


def candidate_thresholds(confidence: torch.Tensor, n: int = 120) -> list[float]:
    """Strict to loose: never exit (infinity: other text can be more confident than any seen), then
    descending quantiles."""
    values = confidence.flatten().double()
    if values.numel() == 0:
        return [float("inf")]
    qs = torch.quantile(
        values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(0))[:200_000]],
        torch.linspace(1.0, 0.0, n, dtype=torch.float64),
    )
    grid = [float("inf")] + [float(q) for q in qs]
    return sorted(set(grid), reverse=True)


def generation_grid(trace: Trace, size: int = 24, lowest: float = 5e-4, highest: float = 0.5) -> list[float]:
    """Candidate thresholds for generation risk, strict to loose, from the FIT trace alone.

    Free generation compounds every exit that changes a token, so the useful thresholds let few
    tokens leave: the grid is geometric in the share of fit tokens that exit (from `lowest` to
    `highest`, steps of about 35% at the defaults), after "never exit". The exit share is used
    rather than the simulated risk because a classifier scored on its own training tokens looks
    almost never wrong. Fixing the grid before the calibration prompts are seen keeps
    fixed-sequence testing valid.
    """
    never = float("inf")  # confidences on other text can exceed every one seen here
    if trace.confidence.numel() == 0:
        return [never]
    # A token exits at threshold t when its highest confidence over the points reaches t.
    best = trace.confidence.double().max(0).values.sort(descending=True).values
    grid = [never]
    for share in np.geomspace(lowest, highest, size - 1):
        k = max(1, round(share * best.numel()))
        t = float(best[k - 1])
        if t < grid[-1]:
            grid.append(t)
    return grid


def _best_empirical(trace: Trace, costs: CostModel, measure: str, translated: bool, vocab_top_k: int, d: int, target: float) -> float:
    """Highest predicted speedup with empirical consistency >= target (fit half, no guarantee)."""
    best = 1.0
    full = costs.full_cost()
    for threshold in candidate_thresholds(trace.confidence, n=40):
        sim = simulate(trace, threshold, costs, measure, translated, vocab_top_k, d)
        if sim.consistent.double().mean().item() >= target:
            best = max(best, full / sim.cost.mean().item())
    return best


def select_exit_points(
    trace: Trace,
    costs: CostModel,
    measure: str,
    translated: bool,
    vocab_top_k: int,
    d: int,
    target: float,
    max_points: int = 8,
    progress: ProgressFn | None = None,
) -> list[int]:
    """Greedy forward selection of exit points by predicted speedup at the target (fit half)."""
    chosen: list[int] = []
    best = 1.0
    rows_by_point = {p: r for r, p in enumerate(trace.points)}
    while len(chosen) < max_points:
        gains = {}
        for p in trace.points:
            if p in chosen:
                continue
            rows = sorted(rows_by_point[q] for q in chosen + [p])
            gains[p] = _best_empirical(trace.subset(rows), costs, measure, translated, vocab_top_k, d, target)
        if not gains:
            break
        point, speed = max(gains.items(), key=lambda kv: kv[1])
        if progress:
            progress("choosing exit points", len(chosen) + 1, max_points)
        if speed <= best * 1.001:
            break
        chosen.append(point)
        best = speed
    return sorted(chosen)


@torch.no_grad()
def _fit_classifier(lm: LayeredModel, windows: torch.Tensor, points: list[int], lens, first: int = 0) -> conf.ExitClassifier:
    """CALM's meta classifier: label = this point's top-1 equals the final top-1.

    Data-parallel: each rank keeps the features of its share of the windows and the classifier
    trains the DDP way (`ExitClassifier.fit`), so no rank holds every window's hidden states.
    """
    world = distributed.current()
    mine = windows[world.shard(windows.shape[0], "classifier windows")] if world.size > 1 else windows
    states = local_hidden_states(lm, mine, first=first)
    final_top1 = lm.logits_from(states[-1]).argmax(-1)
    features = [lm.final_norm(states[index]) for index in points]
    labels = [lens.logits(index, states[index]).argmax(-1) == final_top1 for index in points]
    classifier = conf.ExitClassifier(len(points), lm.hidden_size)
    with torch.enable_grad():
        classifier.fit(features, labels, world=world)
    return classifier


@dataclass
class ExitPlan:
    """What the fit windows decided for one target: the exit points, their classifier and trace rows."""

    target: float
    points: list[int]
    classifier: conf.ExitClassifier | None
    fit_trace: Trace  # the chosen points' rows of the fit trace
    rows: list[int]  # the chosen points' rows among all candidate points


@dataclass
class ExitPlans:
    plans: list[ExitPlan]
    candidates: list[int]  # every candidate exit point
    all_points: conf.ExitClassifier | None  # the classifier over every candidate (classifier measure)


def check_calibration_options(targets: list[float], measure: str, risk: str) -> None:
    conf.check_measure(measure)
    if risk not in RISKS:
        raise DyninferError(f"unknown risk '{risk}'; choose from: {', '.join(RISKS)}")
    for target in targets:
        if not 0.0 < target < 1.0:
            raise DyninferError(f"`target` must be between 0 and 1 (exclusive), got {target}")


def plan_exits(
    lm: LayeredModel,
    lens,
    costs: CostModel,
    fit_windows: torch.Tensor,
    *,
    targets: list[float],
    measure: str,
    vocab_top_k: int = 0,
    min_layer: int | None = None,
    max_points: int = 8,
    first: int = 0,
    progress: ProgressFn | None = None,
) -> ExitPlans:
    """Fit the classifier (if used) and choose each target's exit points on the fit windows.

    `first`: learn from the predictions from this position on only (generation risk: the fit
    sequences are prompts and the full model's continuations, and the continuations are what the
    exits will see).
    """
    d, n_layers = lm.hidden_size, lm.num_layers
    first = max(1, n_layers // 4 if min_layer is None else min_layer)
    candidates = list(range(first, n_layers))
    if not candidates:
        raise DyninferError(f"no exit points between layer {first} and {n_layers - 1}; lower `min_layer`")
    all_points, choose_on = None, fit_windows
    if measure == "classifier":
        # The classifier scored on its own training tokens looks almost never wrong, which would make every
        # exit point look free: train it on the first half of the fit windows, choose points on the second.
        half = max(1, fit_windows.shape[0] // 2)
        all_points = _fit_classifier(lm, fit_windows[:half], candidates, lens, first)
        choose_on = fit_windows[half:] if fit_windows.shape[0] > 1 else fit_windows
    fit_trace = trace_exits(
        lm, choose_on, candidates, lens, measure, classifier=all_points, vocab_top_k=vocab_top_k, first=first, progress=progress
    )
    plans = []
    for target in targets:
        chosen = select_exit_points(fit_trace, costs, measure, lens.kind == "tuned", vocab_top_k, d, target, max_points, progress)
        rows = [candidates.index(p) for p in chosen]
        plans.append(ExitPlan(target, chosen, _classifier_rows(all_points, rows), fit_trace.subset(rows), rows))
    return ExitPlans(plans, candidates, all_points)


def _classifier_rows(all_points: conf.ExitClassifier | None, rows: list[int]) -> conf.ExitClassifier | None:
    """The classifier of every candidate point cut down to `rows` (in that order); None without a classifier."""
    if all_points is None:
        return None
    weight, bias = all_points.weight.detach()[rows], all_points.bias.detach()[rows]
    return conf.ExitClassifier.from_tensors({"classifier.weight": weight, "classifier.bias": bias})


def trace_plan(
    lm: LayeredModel,
    lens,
    plans: ExitPlans,
    plan: ExitPlan,
    windows: torch.Tensor,
    measure: str,
    vocab_top_k: int,
    shared: dict | None = None,
    progress: ProgressFn | None = None,
) -> Trace:
    """The teacher-forced trace of `windows` at `plan`'s points.

    Without `vocab_top_k` a check's confidence does not depend on which other points are checked,
    so one trace over the points any plan chose (kept in `shared`, keyed by the windows) serves every
    target; the candidates no plan chose are not scored (each costs the full head per token).
    """
    union = sorted({row for p in plans.plans for row in p.rows})
    if vocab_top_k or shared is None or not union:
        return trace_exits(lm, windows, plan.points, lens, measure, classifier=plan.classifier, vocab_top_k=vocab_top_k, progress=progress)
    key = id(windows)
    if key not in shared:
        points = [plans.candidates[row] for row in union]
        classifier = _classifier_rows(plans.all_points, union)
        shared[key] = trace_exits(lm, windows, points, lens, measure, classifier=classifier, progress=progress)
    return shared[key].subset([union.index(row) for row in plan.rows])

"""Calibrated early exit: choose exit points and a threshold with a Learn-then-Test guarantee.

Pipeline (CALM, on teacher-forced text from the data's train split):
1. The calibration tokens are split in two halves of whole windows. On the *fit* half we
   train the exit classifier (if that measure is used) and choose the set of exit points
   greedily with the per-layer cost model: a check costs something (the LM head for the
   softmax-type measures), so points that let few tokens leave are not worth checking.
2. On the *test* half we trace, per token and exit point, the confidence and whether the
   exit prediction equals the full model's (consistency) and the true next token.
3. Candidate thresholds run from strict to loose; per-example losses are the inconsistency
   rate of short contiguous blocks of tokens (the examples); Learn-then-Test certifies the
   loosest threshold whose risk is <= 1 - target with probability >= 1 - epsilon.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from dyninfer.compressors import confidence as conf
from dyninfer.compressors.ltt import LTTResult, learn_then_test, naive_choice
from dyninfer.core.adapters import LayeredModel
from dyninfer.core.cost import CostModel
from dyninfer.core.errors import DyninferError, is_integer, is_number
from dyninfer.core.lenses import LENS_KINDS, collect_hidden_states
from dyninfer.core.progress import ProgressFn, silent

RISKS = ("consistency", "accuracy-drop")
# How the dynamic model fills the caches of layers a token skipped: CALM state propagation, or a
# recompute when a later token needs them.
KV_MODES = ("propagate", "recompute")


@dataclass
class ExitPolicy:
    """What the dynamic model does: where it may exit, how it decides, and what it costs."""

    lens: str
    measure: str
    exit_points: list[int]  # hidden-state indices (after decoder layer i), ascending
    threshold: float | None  # exit when confidence >= threshold; None: never exit (nothing certified)
    vocab_top_k: int  # 0: full vocabulary at every check; K: after the first check, only its top-K
    kv_mode: str = "propagate"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, num_layers: int | None = None) -> ExitPolicy:
        """The policy an artifact holds, every field checked (exit points against `num_layers`)."""

        def invalid(what: str) -> DyninferError:
            return DyninferError(f"the artifact's early-exit policy is invalid ({what}); run `dyninfer calibrate` "
                                 "into it again")

        if not isinstance(d, dict):
            raise invalid(f"a {type(d).__name__}, not an object")
        missing = [k for k in ("lens", "measure", "exit_points", "threshold", "vocab_top_k") if k not in d]
        if missing:
            raise invalid(f"no {', '.join(missing)}")
        for name, allowed in (("lens", LENS_KINDS), ("measure", conf.MEASURES), ("kv_mode", KV_MODES)):
            if d.get(name, allowed[0]) not in allowed:
                raise invalid(f"{name} {d.get(name)!r} is not one of {', '.join(allowed)}")
        points, threshold, top_k = d["exit_points"], d["threshold"], d["vocab_top_k"]
        if not isinstance(points, list) or not all(is_integer(p) for p in points) or points != sorted(set(points)):
            raise invalid(f"exit_points {points!r} is not a list of ascending layer numbers")
        if num_layers is not None and any(not 1 <= p < num_layers for p in points):
            raise invalid(f"exit_points {points} are not all between 1 and {num_layers - 1} for this "
                          f"{num_layers}-layer model")
        if threshold is not None and not (is_number(threshold) and not math.isnan(threshold)):
            raise invalid(f"threshold {threshold!r} is not a number")
        if not is_integer(top_k) or top_k < 0:
            raise invalid(f"vocab_top_k {top_k!r} is not a whole number >= 0")
        return cls(d["lens"], d["measure"], list(points), None if threshold is None else float(threshold), top_k,
                   d.get("kv_mode", KV_MODES[0]))


@dataclass
class Trace:
    """Teacher-forced record per exit point (rows) and token (columns)."""

    points: list[int]
    confidence: torch.Tensor  # [P, N]
    agrees: torch.Tensor  # [P, N] exit top-1 == final top-1
    correct: torch.Tensor  # [P, N] exit top-1 == true next token
    final_correct: torch.Tensor  # [N]

    def subset(self, rows: list[int]) -> Trace:
        return Trace([self.points[r] for r in rows], self.confidence[rows], self.agrees[rows], self.correct[rows],
                     self.final_correct)


@torch.no_grad()
def trace_exits(
    lm: LayeredModel,
    windows: torch.Tensor,
    points: list[int],
    lens,
    measure: str,
    *,
    classifier: conf.ExitClassifier | None = None,
    vocab_top_k: int = 0,
    batch_size: int = 2,
    progress: ProgressFn | None = None,
) -> Trace:
    """Run `windows` (teacher forcing) and record confidence and agreement at each point."""
    report = progress or silent
    if measure not in conf.HEAD_MEASURES:
        vocab_top_k = 0  # state measures compute no logits to prune; the exit uses the full head
    cols: dict[str, list[torch.Tensor]] = {"confidence": [], "agrees": [], "correct": [], "final": []}
    n_batches = (windows.shape[0] + batch_size - 1) // batch_size
    for b, start in enumerate(range(0, windows.shape[0], batch_size)):
        batch = windows[start : start + batch_size]
        inputs, targets = batch[:, :-1], batch[:, 1:].reshape(-1)
        states = [h.reshape(-1, h.shape[-1]) for _, h in lm.hidden_states(inputs)]
        final_top1 = lm.logits_from(states[-1]).argmax(-1)
        confidence, agrees, correct = [], [], []
        candidates = None
        for row, index in enumerate(points):
            hidden = states[index]
            logits = lens.logits(index, hidden)
            if vocab_top_k and candidates is not None:
                # Dynamic vocabulary pruning: later checks only score the first check's top-K
                # (gathering from full logits gives exactly those K logits).
                logits = logits.gather(1, candidates)
                top1 = candidates.gather(1, logits.argmax(-1, keepdim=True)).squeeze(1)
            else:
                top1 = logits.argmax(-1)
                if vocab_top_k:
                    candidates = logits.topk(vocab_top_k, dim=-1).indices
            c = conf.from_logits(measure, logits) if measure in conf.HEAD_MEASURES else None
            if measure == "saturation":
                c = conf.saturation(states[index - 1], hidden)
            elif measure == "classifier":
                c = classifier(row, lm.final_norm(hidden))
            confidence.append(c.float())
            agrees.append(top1 == final_top1)
            correct.append(top1 == targets)
        n = final_top1.numel()
        cols["confidence"].append(torch.stack(confidence) if points else torch.empty(0, n))
        cols["agrees"].append(torch.stack(agrees) if points else torch.empty(0, n, dtype=torch.bool))
        cols["correct"].append(torch.stack(correct) if points else torch.empty(0, n, dtype=torch.bool))
        cols["final"].append(final_top1 == targets)
        report("tracing exits", b + 1, n_batches)
    return Trace(list(points), torch.cat(cols["confidence"], 1), torch.cat(cols["agrees"], 1),
                 torch.cat(cols["correct"], 1), torch.cat(cols["final"]))


def check_cost(costs: CostModel, measure: str, translated: bool, first: bool, vocab_top_k: int, d: int) -> float:
    """Cost of one confidence check at an exit point (in the cost model's unit)."""
    if measure in conf.STATE_MEASURES:
        return costs.check(measure, d)
    extra = costs.translator if translated else 0.0
    if vocab_top_k and not first:
        return extra + costs.norm + vocab_top_k * costs.check("head_row", d)
    return extra + costs.norm + costs.head


@dataclass
class Simulation:
    """Outcome of one threshold on a trace: where tokens exit and what it costs."""

    exit_row: torch.Tensor  # [N] row of the exit point used, or -1 for the full model
    consistent: torch.Tensor  # [N]
    correct: torch.Tensor  # [N]
    cost: torch.Tensor  # [N] FLOPs


def simulate(trace: Trace, threshold: float | None, costs: CostModel, measure: str, translated: bool,
             vocab_top_k: int, hidden_size: int) -> Simulation:
    n_points, n = trace.confidence.shape
    if threshold is None or n_points == 0:
        passes = torch.zeros(n_points, n, dtype=torch.bool)
    else:
        passes = trace.confidence >= threshold
    if n_points == 0:  # no exit points: every token runs the full model
        first = torch.full((n,), -1)
    else:
        first = torch.where(passes.any(0), passes.float().argmax(0), torch.full((n,), -1))
    cumulative_layers = np.concatenate([[0.0], np.cumsum(costs.layers)])
    check = [check_cost(costs, measure, translated, r == 0, vocab_top_k, hidden_size) for r in range(n_points)]
    cumulative_checks = np.concatenate([[0.0], np.cumsum(check)])
    exit_extra = 0.0 if measure in conf.HEAD_MEASURES else costs.norm + costs.head + (costs.translator if translated else 0.0)
    full = costs.full_cost() + cumulative_checks[-1]  # a token that never exits paid every check
    point_cost = [costs.embed + cumulative_layers[p] + cumulative_checks[r + 1] + exit_extra
                  for r, p in enumerate(trace.points)]
    cost = torch.full((n,), float(full), dtype=torch.float64)
    consistent = torch.ones(n, dtype=torch.bool)
    correct = trace.final_correct.clone()
    for r in range(n_points):
        chosen = first == r
        cost[chosen] = point_cost[r]
        consistent[chosen] = trace.agrees[r][chosen]
        correct[chosen] = trace.correct[r][chosen]
    return Simulation(first, consistent, correct, cost)


def exit_layers(sim: Simulation, trace: Trace, num_layers: int) -> torch.Tensor:
    """The layer each token left at (num_layers for tokens that ran the full model)."""
    points = torch.tensor(trace.points + [num_layers])
    return points[sim.exit_row]  # row -1 picks the appended full depth


def block_losses(sim: Simulation, trace: Trace, risk: str, block: int) -> np.ndarray:
    """Per-example losses: each example is `block` consecutive tokens; loss = rate in [0, 1]."""
    if risk == "consistency":
        per_token = (~sim.consistent).double()
    else:  # accuracy-drop: the exit is wrong where the full model was right
        per_token = (~sim.correct & trace.final_correct).double()
    n_blocks = per_token.numel() // block
    return per_token[: n_blocks * block].reshape(n_blocks, block).mean(1).numpy()


def candidate_thresholds(confidence: torch.Tensor, n: int = 120) -> list[float]:
    """Strict to loose: above every confidence seen (no exit), then descending quantiles."""
    values = confidence.flatten().double()
    qs = torch.quantile(values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(0))[:200_000]],
                        torch.linspace(1.0, 0.0, n, dtype=torch.float64))
    grid = [float(values.max().item()) + 1e-6] + [float(q) for q in qs]
    return sorted(set(grid), reverse=True)


def _best_empirical(trace: Trace, costs: CostModel, measure: str, translated: bool, vocab_top_k: int, d: int,
                    target: float) -> float:
    """Highest predicted speedup with empirical consistency >= target (fit half, no guarantee)."""
    best = 1.0
    full = costs.full_cost()
    for threshold in candidate_thresholds(trace.confidence, n=40):
        sim = simulate(trace, threshold, costs, measure, translated, vocab_top_k, d)
        if sim.consistent.double().mean().item() >= target:
            best = max(best, full / sim.cost.mean().item())
    return best


def select_exit_points(trace: Trace, costs: CostModel, measure: str, translated: bool, vocab_top_k: int, d: int,
                       target: float, max_points: int = 8, progress: ProgressFn | None = None) -> list[int]:
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


@dataclass
class CurvePoint:
    threshold: float
    consistency: float
    accuracy: float
    predicted_speedup: float
    mean_exit_layer: float
    p_value: float


@dataclass
class CalibrationResult:
    policy: ExitPolicy
    target: float
    epsilon: float
    risk: str
    block: int
    ltt: LTTResult
    naive_threshold: float | None
    curve: list[CurvePoint]
    heldout: dict  # consistency, accuracy, predicted_speedup, exit-depth distribution on held-out data
    naive_heldout: dict
    full_accuracy_heldout: float
    fit_tokens: int
    calibration_tokens: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["ltt"] = self.ltt.to_dict()
        out["statement"] = self.ltt.statement()
        return out


def evaluate(trace: Trace, threshold: float | None, costs: CostModel, policy: ExitPolicy, d: int) -> dict:
    sim = simulate(trace, threshold, costs, policy.measure, policy.lens == "tuned", policy.vocab_top_k, d)
    layers = exit_layers(sim, trace, costs.num_layers)
    histogram = {str(p): float((layers == p).double().mean()) for p in policy.exit_points + [costs.num_layers]}
    return {
        "consistency": float(sim.consistent.double().mean()),
        "accuracy": float(sim.correct.double().mean()),
        "predicted_speedup": float(costs.full_cost() / sim.cost.mean()),
        "mean_exit_layer": float(layers.double().mean()),
        "exit_distribution": histogram,
        "tokens": int(sim.cost.numel()),
    }


@torch.no_grad()
def _fit_classifier(lm: LayeredModel, windows: torch.Tensor, points: list[int], lens) -> conf.ExitClassifier:
    """CALM's meta classifier: label = this point's top-1 equals the final top-1."""
    states = collect_hidden_states(lm, windows)
    final_top1 = lm.logits_from(states[-1]).argmax(-1)
    features = [lm.final_norm(states[index]) for index in points]
    labels = [lens.logits(index, states[index]).argmax(-1) == final_top1 for index in points]
    classifier = conf.ExitClassifier(len(points), lm.hidden_size)
    with torch.enable_grad():
        classifier.fit(features, labels)
    return classifier


def run_calibration(
    lm: LayeredModel,
    lens,
    costs: CostModel,
    fit_windows: torch.Tensor,
    calibration_windows: torch.Tensor,
    heldout_windows: torch.Tensor,
    *,
    target: float = 0.95,
    **options,
) -> tuple[CalibrationResult, conf.ExitClassifier | None]:
    """Calibrate one policy at `target` (see `run_calibrations` for the options)."""
    return run_calibrations(lm, lens, costs, fit_windows, calibration_windows, heldout_windows, targets=[target],
                            **options)[0]


def run_calibrations(
    lm: LayeredModel,
    lens,
    costs: CostModel,
    fit_windows: torch.Tensor,
    calibration_windows: torch.Tensor,
    heldout_windows: torch.Tensor,
    *,
    targets: list[float],
    measure: str = "softmax",
    epsilon: float = 0.05,
    risk: str = "consistency",
    block: int = 16,
    vocab_top_k: int = 0,
    min_layer: int | None = None,
    max_points: int = 8,
    progress: ProgressFn | None = None,
) -> list[tuple[CalibrationResult, conf.ExitClassifier | None]]:
    """One policy per target, each with its own exit points and certified threshold.

    The data is traced once for all targets when a check's confidence does not depend on
    which other points are checked (everything but `vocab_top_k`, whose later checks score
    the first check's top-K): each target then reads its points' rows.
    """
    conf.check_measure(measure)
    if risk not in RISKS:
        raise DyninferError(f"unknown risk '{risk}'; choose from: {', '.join(RISKS)}")
    for target in targets:
        if not 0.0 < target < 1.0:
            raise DyninferError(f"`target` must be between 0 and 1 (exclusive), got {target}")
    if block < 1:
        raise DyninferError(f"`block` must be at least 1, got {block}")
    d, n_layers = lm.hidden_size, lm.num_layers
    translated = lens.kind == "tuned"
    first = max(1, n_layers // 4 if min_layer is None else min_layer)
    candidates = list(range(first, n_layers))
    if not candidates:
        raise DyninferError(f"no exit points between layer {first} and {n_layers - 1}; lower `min_layer`")

    all_points = _fit_classifier(lm, fit_windows, candidates, lens) if measure == "classifier" else None
    fit_trace = trace_exits(lm, fit_windows, candidates, lens, measure, classifier=all_points,
                            vocab_top_k=vocab_top_k, progress=progress)
    shared = len(targets) > 1 and not vocab_top_k
    if shared:
        shared_traces = [trace_exits(lm, w, candidates, lens, measure, classifier=all_points, progress=progress)
                         for w in (calibration_windows, heldout_windows)]
    results = []
    for target in targets:
        chosen = select_exit_points(fit_trace, costs, measure, translated, vocab_top_k, d, target, max_points,
                                    progress)
        rows = [candidates.index(p) for p in chosen]
        classifier = None
        if all_points is not None:  # keep only the chosen points' rows, in order
            classifier = conf.ExitClassifier.from_tensors(
                {"classifier.weight": all_points.weight.detach()[rows], "classifier.bias": all_points.bias.detach()[rows]}
            )
        if shared:
            cal_trace, held_trace = (trace.subset(rows) for trace in shared_traces)
        else:
            cal_trace, held_trace = (trace_exits(lm, w, chosen, lens, measure, classifier=classifier,
                                                 vocab_top_k=vocab_top_k, progress=progress)
                                     for w in (calibration_windows, heldout_windows))
        result = _certify(lens.kind, measure, chosen, vocab_top_k, costs, d, n_layers, target, epsilon, risk, block,
                          fit_trace, cal_trace, held_trace)
        results.append((result, classifier))
    return results


def _certify(lens_kind: str, measure: str, chosen: list[int], vocab_top_k: int, costs: CostModel, d: int,
             n_layers: int, target: float, epsilon: float, risk: str, block: int, fit_trace: Trace,
             cal_trace: Trace, held_trace: Trace) -> CalibrationResult:
    """Learn-then-Test over the threshold grid on the calibration trace; report on held-out."""
    translated = lens_kind == "tuned"
    policy = ExitPolicy(lens_kind, measure, chosen, None, vocab_top_k)
    notes = []
    if not chosen:
        notes.append("no exit point pays for its checks at this target on the fit data; the policy never exits")
    thresholds = candidate_thresholds(cal_trace.confidence) if chosen else [float("inf")]
    sims = [simulate(cal_trace, t, costs, measure, translated, vocab_top_k, d) for t in thresholds]
    losses = np.stack([block_losses(s, cal_trace, risk, block) for s in sims])
    if losses.shape[1] < 1:
        raise DyninferError(f"calibration data has fewer than {block} tokens; use more data or a smaller `block`")
    ltt = learn_then_test(losses, thresholds, delta=1.0 - target, epsilon=epsilon)
    naive_index = naive_choice(losses, thresholds, delta=1.0 - target)
    policy.threshold = ltt.chosen if ltt.chosen_index is not None and ltt.chosen_index > 0 else None
    naive_threshold = thresholds[naive_index] if naive_index not in (None, 0) else None
    curve = []
    full = costs.full_cost()
    for t, s, p in zip(thresholds, sims, ltt.p_values):
        layers = exit_layers(s, cal_trace, n_layers)
        curve.append(CurvePoint(t, float(s.consistent.double().mean()), float(s.correct.double().mean()),
                                float(full / s.cost.mean()), float(layers.double().mean()), float(p)))
    return CalibrationResult(
        policy=policy,
        target=target,
        epsilon=epsilon,
        risk=risk,
        block=block,
        ltt=ltt,
        naive_threshold=naive_threshold,
        curve=curve,
        heldout=evaluate(held_trace, policy.threshold, costs, policy, d),
        naive_heldout=evaluate(held_trace, naive_threshold, costs, policy, d),
        full_accuracy_heldout=float(held_trace.final_correct.double().mean()),
        fit_tokens=int(fit_trace.final_correct.numel()),
        calibration_tokens=int(cal_trace.final_correct.numel()),
        notes=notes,
    )

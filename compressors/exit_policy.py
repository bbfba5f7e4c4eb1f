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
from dyninfer.compressors.ltt import LTTResult, learn_then_test, min_examples, naive_choice
from dyninfer.core import distributed
from dyninfer.core.choices import HEAD_MEASURES, KV_MODES, LENS_KINDS, MEASURES, RISKS, STATE_MEASURES, TEACHER_FORCED_RISKS
from dyninfer.core.cost import CostModel
from dyninfer.core.errors import DyninferError, is_integer, is_number
from dyninfer.core.layered import LayeredModel
from dyninfer.core.lenses import local_hidden_states
from dyninfer.core.progress import ProgressFn, silent


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
            return DyninferError(f"the artifact's early-exit policy is invalid ({what}); run `dyninfer calibrate` into it again")

        if not isinstance(d, dict):
            raise invalid(f"a {type(d).__name__}, not an object")
        missing = [k for k in ("lens", "measure", "exit_points", "threshold", "vocab_top_k") if k not in d]
        if missing:
            raise invalid(f"no {', '.join(missing)}")
        for name, allowed in (("lens", LENS_KINDS), ("measure", MEASURES), ("kv_mode", KV_MODES)):
            if d.get(name, allowed[0]) not in allowed:
                raise invalid(f"{name} {d.get(name)!r} is not one of {', '.join(allowed)}")
        points, threshold, top_k = d["exit_points"], d["threshold"], d["vocab_top_k"]
        if not isinstance(points, list) or not all(is_integer(p) for p in points) or points != sorted(set(points)):
            raise invalid(f"exit_points {points!r} is not a list of ascending layer numbers")
        if num_layers is not None and any(not 1 <= p < num_layers for p in points):
            raise invalid(f"exit_points {points} are not all between 1 and {num_layers - 1} for this {num_layers}-layer model")
        if threshold is not None and not (is_number(threshold) and not math.isnan(threshold)):
            raise invalid(f"threshold {threshold!r} is not a number")
        if not is_integer(top_k) or top_k < 0:
            raise invalid(f"vocab_top_k {top_k!r} is not a whole number >= 0")
        return cls(
            d["lens"], d["measure"], list(points), None if threshold is None else float(threshold), top_k, d.get("kv_mode", KV_MODES[0])
        )


@dataclass
class Trace:
    """Teacher-forced record per exit point (rows) and token (columns)."""

    points: list[int]
    confidence: torch.Tensor  # [P, N]
    agrees: torch.Tensor  # [P, N] exit top-1 == final top-1
    correct: torch.Tensor  # [P, N] exit top-1 == true next token
    final_correct: torch.Tensor  # [N]

    def subset(self, rows: list[int]) -> Trace:
        return Trace([self.points[r] for r in rows], self.confidence[rows], self.agrees[rows], self.correct[rows], self.final_correct)


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
    first: int = 0,
    progress: ProgressFn | None = None,
) -> Trace:
    """Run `windows` (teacher forcing) and record confidence and agreement at each point.

    `first`: record only the predictions from this input position on (a prompt's continuation).
    In a data-parallel run each rank traces its share of the windows and every rank gets the
    whole trace, in window order.
    """
    options = dict(classifier=classifier, vocab_top_k=vocab_top_k, batch_size=batch_size, first=first, progress=progress)
    world = distributed.current()
    if world.size == 1:
        return _trace_local(lm, windows, points, lens, measure, **options)
    n = windows.shape[0]
    own = _trace_local(lm, windows[world.shard(n, "windows")], points, lens, measure, **options)
    tokens = world.gather_window_columns
    return Trace(
        list(points),
        tokens(own.confidence.cpu(), n),
        tokens(own.agrees.cpu(), n),
        tokens(own.correct.cpu(), n),
        tokens(own.final_correct.cpu(), n, dim=0),
    )


def _trace_local(
    lm: LayeredModel,
    windows: torch.Tensor,
    points: list[int],
    lens,
    measure: str,
    *,
    classifier: conf.ExitClassifier | None,
    vocab_top_k: int,
    batch_size: int,
    first: int,
    progress: ProgressFn | None,
) -> Trace:
    """`trace_exits` on this process's windows."""
    report = progress or silent
    if measure not in HEAD_MEASURES:
        vocab_top_k = 0  # state measures compute no logits to prune; the exit uses the full head
    cols: dict[str, list[torch.Tensor]] = {"confidence": [], "agrees": [], "correct": [], "final": []}
    n_batches = (windows.shape[0] + batch_size - 1) // batch_size
    for b, start in enumerate(range(0, windows.shape[0], batch_size)):
        batch = windows[start : start + batch_size]
        inputs, targets = batch[:, :-1], batch[:, 1 + first :].reshape(-1)
        states = [h[:, first:].reshape(-1, h.shape[-1]) for _, h in lm.hidden_states(inputs)]
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
            c = conf.from_logits(measure, logits) if measure in HEAD_MEASURES else None
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
    return Trace(
        list(points),
        torch.cat(cols["confidence"], 1),
        torch.cat(cols["agrees"], 1),
        torch.cat(cols["correct"], 1),
        torch.cat(cols["final"]),
    )


def check_cost(costs: CostModel, measure: str, translated: bool, first: bool, vocab_top_k: int, d: int) -> float:
    """Cost of one confidence check at an exit point (in the cost model's unit)."""
    if measure in STATE_MEASURES:
        return costs.check(measure, d)
    extra = costs.translator if translated else 0.0
    if vocab_top_k and not first:
        return extra + costs.norm + vocab_top_k * costs.check("head_row", d)
    return extra + costs.norm + costs.head


def exit_costs(
    costs: CostModel, points: list[int], measure: str, translated: bool, vocab_top_k: int, hidden_size: int
) -> tuple[list[float], float]:
    """(cost of a token that leaves at each point, cost of one that runs the full depth), checks included."""
    cumulative_layers = np.concatenate([[0.0], np.cumsum(costs.layers)])
    check = [check_cost(costs, measure, translated, r == 0, vocab_top_k, hidden_size) for r in range(len(points))]
    cumulative_checks = np.concatenate([[0.0], np.cumsum(check)])
    exit_extra = 0.0 if measure in HEAD_MEASURES else costs.norm + costs.head + (costs.translator if translated else 0.0)
    full = costs.full_cost() + cumulative_checks[-1]  # a token that never exits paid every check
    return [float(costs.embed + cumulative_layers[p] + cumulative_checks[r + 1] + exit_extra) for r, p in enumerate(points)], float(full)


@dataclass
class Simulation:
    """Outcome of one threshold on a trace: where tokens exit and what it costs."""

    exit_row: torch.Tensor  # [N] row of the exit point used, or -1 for the full model
    consistent: torch.Tensor  # [N]
    correct: torch.Tensor  # [N]
    cost: torch.Tensor  # [N] FLOPs


def simulate(
    trace: Trace, threshold: float | None, costs: CostModel, measure: str, translated: bool, vocab_top_k: int, hidden_size: int
) -> Simulation:
    n_points, n = trace.confidence.shape
    if threshold is None or n_points == 0:
        passes = torch.zeros(n_points, n, dtype=torch.bool)
    else:
        passes = trace.confidence >= threshold
    if n_points == 0:  # no exit points: every token runs the full model
        first = torch.full((n,), -1)
    else:
        first = torch.where(passes.any(0), passes.float().argmax(0), torch.full((n,), -1))
    point_cost, full = exit_costs(costs, trace.points, measure, translated, vocab_top_k, hidden_size)
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


def window_losses(sim: Simulation, trace: Trace, risk: str, windows: int) -> np.ndarray:
    """Per-window losses (LTT's examples): the rate of inconsistent (or wrongly exited) tokens in each window.

    A window is the exchangeable unit: windows are drawn at random from the corpus, while the tokens
    (and any blocks) of one window are correlated, so they never count as separate examples.
    """
    if risk == TEACHER_FORCED_RISKS[0]:
        per_token = (~sim.consistent).double()
    else:  # accuracy drop: the exit is wrong where the full model was right
        per_token = (~sim.correct & trace.final_correct).double()
    return per_token.reshape(windows, -1).mean(1).cpu().numpy()


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
    units: str  # what one LTT example is ("windows of 256 tokens", "prompts of 64 + 32 new tokens")
    ltt: LTTResult
    naive_threshold: float | None  # the loosest threshold with empirical risk <= delta (no guarantee); None if not computed
    curve: list[CurvePoint]
    heldout: dict  # simulated (teacher-forced) on held-out windows: consistency, accuracy, predicted speedup, exits
    naive_heldout: dict | None
    full_accuracy_heldout: float
    fit_tokens: int
    calibration_tokens: int
    notes: list[str] = field(default_factory=list)
    # generation risk: the certified policy's own greedy continuations of held-out prompts against the full model's
    generated: dict | None = None

    def to_dict(self) -> dict:
        out = asdict(self)
        out["ltt"] = self.ltt.to_dict()
        out["statement"] = self.ltt.statement()
        for point in out["curve"]:  # JSON has no infinity: the never-exit candidate's threshold is None
            point["threshold"] = None if math.isinf(point["threshold"]) else point["threshold"]
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
    return run_calibrations(lm, lens, costs, fit_windows, calibration_windows, heldout_windows, targets=[target], **options)[0]


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
        classifier = None
        if all_points is not None:  # keep only the chosen points' rows, in order
            classifier = conf.ExitClassifier.from_tensors(
                {"classifier.weight": all_points.weight.detach()[rows], "classifier.bias": all_points.bias.detach()[rows]}
            )
        plans.append(ExitPlan(target, chosen, classifier, fit_trace.subset(rows), rows))
    return ExitPlans(plans, candidates, all_points)


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
    so one trace over every candidate (kept in `shared`, keyed by the windows) serves every target.
    """
    if vocab_top_k or shared is None:
        return trace_exits(lm, windows, plan.points, lens, measure, classifier=plan.classifier, vocab_top_k=vocab_top_k, progress=progress)
    key = id(windows)
    if key not in shared:
        shared[key] = trace_exits(lm, windows, plans.candidates, lens, measure, classifier=plans.all_points, progress=progress)
    return shared[key].subset(plan.rows)


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
    risk: str = TEACHER_FORCED_RISKS[0],
    vocab_top_k: int = 0,
    min_layer: int | None = None,
    max_points: int = 8,
    progress: ProgressFn | None = None,
) -> list[tuple[CalibrationResult, conf.ExitClassifier | None]]:
    """One policy per target with a teacher-forced risk, each with its own exit points and threshold.

    LTT's examples are the calibration windows (each window's loss is its rate of inconsistent
    tokens), so the windows must be a random sample of the corpus, like the held-out ones.
    """
    check_calibration_options(targets, measure, risk)
    if risk not in TEACHER_FORCED_RISKS:
        raise DyninferError(
            f"run_calibrations certifies a teacher-forced risk ({', '.join(TEACHER_FORCED_RISKS)}); "
            f"'{risk}' needs the dynamic model's generations (profilers.generation_risk)"
        )
    plans = plan_exits(
        lm,
        lens,
        costs,
        fit_windows,
        targets=targets,
        measure=measure,
        vocab_top_k=vocab_top_k,
        min_layer=min_layer,
        max_points=max_points,
        progress=progress,
    )
    shared: dict | None = {} if len(targets) > 1 else None
    results = []
    for plan in plans.plans:
        cal_trace, held_trace = (
            trace_plan(lm, lens, plans, plan, w, measure, vocab_top_k, shared, progress) for w in (calibration_windows, heldout_windows)
        )
        result = _certify(
            lens.kind,
            measure,
            plan,
            vocab_top_k,
            costs,
            lm.hidden_size,
            lm.num_layers,
            epsilon,
            risk,
            cal_trace,
            held_trace,
            calibration_windows.shape,
        )
        results.append((result, plan.classifier))
    return results


def _certify(
    lens_kind: str,
    measure: str,
    plan: ExitPlan,
    vocab_top_k: int,
    costs: CostModel,
    d: int,
    n_layers: int,
    epsilon: float,
    risk: str,
    cal_trace: Trace,
    held_trace: Trace,
    calibration_shape: tuple,
) -> CalibrationResult:
    """Learn-then-Test over the fit trace's threshold grid on the calibration windows; report on held-out."""
    translated = lens_kind == "tuned"
    target, chosen = plan.target, plan.points
    policy = ExitPolicy(lens_kind, measure, chosen, None, vocab_top_k)
    notes = []
    if not chosen:
        notes.append("no exit point pays for its checks at this target on the fit data; the policy never exits")
    n_windows, window_len = calibration_shape[0], calibration_shape[1] - 1
    needed = min_examples(1.0 - target, epsilon)
    if chosen and n_windows < needed:
        raise DyninferError(
            f"{n_windows} calibration windows cannot certify anything at target {target:g} and "
            f"epsilon {epsilon:g}: at least {needed} are needed even when no exit is ever wrong; "
            "raise `calibration_tokens`, lower `seq_len`, or loosen `target`/`epsilon`"
        )
    # The grid comes from the fit trace: chosen before the calibration windows are looked at.
    thresholds = candidate_thresholds(plan.fit_trace.confidence) if chosen else [float("inf")]
    sims = [simulate(cal_trace, t, costs, measure, translated, vocab_top_k, d) for t in thresholds]
    losses = np.stack([window_losses(s, cal_trace, risk, n_windows) for s in sims])
    ltt = learn_then_test(losses, thresholds, delta=1.0 - target, epsilon=epsilon)
    naive_index = naive_choice(losses, thresholds, delta=1.0 - target)
    policy.threshold = ltt.chosen if ltt.chosen_index is not None and ltt.chosen_index > 0 else None
    naive_threshold = thresholds[naive_index] if naive_index not in (None, 0) else None
    curve = []
    full = costs.full_cost()
    for t, s, p in zip(thresholds, sims, ltt.p_values):
        layers = exit_layers(s, cal_trace, n_layers)
        curve.append(
            CurvePoint(
                t,
                float(s.consistent.double().mean()),
                float(s.correct.double().mean()),
                float(full / s.cost.mean()),
                float(layers.double().mean()),
                float(p),
            )
        )
    if policy.threshold is None and chosen:
        notes.append(f"no threshold reaches target {target:g} with the guarantee: the policy never exits")
    return CalibrationResult(
        policy=policy,
        target=target,
        epsilon=epsilon,
        risk=risk,
        units=f"{n_windows} windows of {window_len} tokens",
        ltt=ltt,
        naive_threshold=naive_threshold,
        curve=curve,
        heldout=evaluate(held_trace, policy.threshold, costs, policy, d),
        naive_heldout=evaluate(held_trace, naive_threshold, costs, policy, d),
        full_accuracy_heldout=float(held_trace.final_correct.double().mean()),
        fit_tokens=int(plan.fit_trace.final_correct.numel()),
        calibration_tokens=int(cal_trace.final_correct.numel()),
        notes=notes,
    )

"""Teacher-forced certification (CALM, Learn-then-Test) on the calibration windows.

Pipeline: the plan (plan.py) fixes each target's exit points, classifier and threshold grid on the
fit windows; the calibration windows are traced at those points; candidate thresholds run from
strict to loose and each window's loss is its rate of inconsistent (or wrongly exited) tokens;
Learn-then-Test certifies the loosest threshold whose risk is <= 1 - target with probability
>= 1 - epsilon. A window is the exchangeable unit: the windows are drawn at random from the corpus.
For the generation risk see generation.py; `calibrate.calibrate_exits` runs either.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from dyninfer.compressors.ltt import SHARE_P_VALUE, LTTResult, learn_then_test, min_examples, naive_choice
from dyninfer.core.choices import TEACHER_FORCED_RISKS
from dyninfer.core.cost import CostModel
from dyninfer.core.errors import DyninferError
from dyninfer.core.layered import LayeredModel
from dyninfer.core.policies import ExitPolicy
from dyninfer.core.progress import ProgressFn
from dyninfer.early_exit import confidence as conf
from dyninfer.early_exit.plan import ExitPlan, candidate_thresholds, check_calibration_options, plan_exits, trace_plan
from dyninfer.early_exit.trace import Trace, evaluate, exit_layers, simulate, window_losses


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
    # How much decoding the candidates took (generation risk): it depends on how prompts were batched and sharded,
    # so it is reported with the timings, not with the result.
    work: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("work")
        out["ltt"] = self.ltt.to_dict()
        out["statement"] = self.ltt.statement()
        for point in out["curve"]:  # JSON has no infinity: the never-exit candidate's threshold is None
            point["threshold"] = None if math.isinf(point["threshold"]) else point["threshold"]
        return out


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
    needed = min_examples(1.0 - target, epsilon, SHARE_P_VALUE)
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
    ltt = learn_then_test(losses, thresholds, delta=1.0 - target, epsilon=epsilon, method=SHARE_P_VALUE)
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

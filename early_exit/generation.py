"""Certify early exit on what runs: the dynamic model's own greedy continuations of prompts.

CALM's promise is about generated output: the early-exit model's continuation of a prompt is
consistent with the full model's. Teacher-forced simulation misses two things that deployment
has: the skipped layers' caches (propagated or recomputed) change later tokens' states, and in
free generation one early difference changes everything after it. So here:

- the examples are prompts, each the start of its own window drawn at random from the train
  split (one prompt per window: prompts are exchangeable units);
- the full model's greedy continuation of each prompt is computed once;
- for each candidate threshold, strict to loose, the dynamic model generates greedily (the
  policy's KV mode, each prompt deciding its exits as it would alone) and a prompt's loss is
  1 - its consistency with the full continuation (tokens, prefix or ROUGE-L);
- Learn-then-Test over the prompts: fixed-sequence testing with Hoeffding-Bentkus p-values,
  generating only until the first candidate that is not rejected.

Guarantee: with probability >= 1 - epsilon over the draw of the calibration prompts, the mean
consistency of the certified policy's continuations is >= target on prompts exchangeable with
them (the same corpus, prompt length and number of new tokens, greedy decoding).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from dyninfer.compressors.ltt import fixed_sequence_test, min_examples
from dyninfer.core import distributed
from dyninfer.core.choices import CONSISTENCY_MEASURES, GENERATION_RISK
from dyninfer.core.consistency import all_measures, consistency
from dyninfer.core.cost import CostModel
from dyninfer.core.distributed import World
from dyninfer.core.errors import DyninferError
from dyninfer.core.layered import LayeredModel
from dyninfer.core.progress import ProgressFn, silent
from dyninfer.early_exit.certify import CalibrationResult, CurvePoint
from dyninfer.early_exit.plan import ExitPlan, generation_grid
from dyninfer.early_exit.policy import ExitPolicy
from dyninfer.early_exit.trace import Trace, evaluate, exit_costs
from dyninfer.runtime.dynamic import DynamicModel


@dataclass
class PromptSet:
    """Prompts and the full model's greedy continuations of them."""

    prompts: torch.Tensor  # [n, prompt tokens]
    continuations: torch.Tensor  # [n, new tokens]
    # Per batch of prompts: its prefill (the same at every threshold), kept for the next candidate.
    prefills: dict = field(default_factory=dict, repr=False)
    shards: dict = field(default_factory=dict, repr=False)  # World -> this rank's PromptSet (its own prefills)

    @property
    def size(self) -> int:
        return int(self.prompts.shape[0])

    def shard(self, world: World) -> PromptSet:
        """This rank's prompts in a data-parallel run (every size-th one), kept with their prefills."""
        if world.size == 1:
            return self
        if world not in self.shards:
            rows = world.shard(self.size, "prompts")
            self.shards[world] = PromptSet(self.prompts[rows], self.continuations[rows])
        return self.shards[world]


@torch.no_grad()
def full_continuations(
    lm: LayeredModel,
    prompts: torch.Tensor,
    new_tokens: int,
    batch_size: int = 32,
    progress: ProgressFn | None = None,
    what: str = "full-model continuations",
) -> torch.Tensor:
    """The full model's greedy continuations (the dynamic model's full mode: the path `run` takes).

    In a data-parallel run each rank continues its shard of the prompts and every rank gets all of them.
    """
    report = progress or silent
    world = distributed.current()
    mine = prompts[world.shard(prompts.shape[0], "prompts")] if world.size > 1 else prompts
    full = DynamicModel(lm, None, None)
    out = []
    for start in range(0, mine.shape[0], batch_size):
        out.append(full.generate(mine[start : start + batch_size], new_tokens, mode="full").tokens)
        report(what, min(start + batch_size, mine.shape[0]), mine.shape[0])
    return world.gather_rows(torch.cat(out), prompts.shape[0])


def fit_sequences(
    lm: LayeredModel,
    fit_windows: torch.Tensor,
    prompt_tokens: int,
    new_tokens: int,
    batch_size: int = 32,
    progress: ProgressFn | None = None,
) -> torch.Tensor:
    """Prompts cut from the fit windows, each followed by the full model's greedy continuation.

    Exits decide on the model's own text, which is more predictable than the corpus (a classifier
    fitted on corpus text exits far too often on it). So the classifier, the exit points and the
    candidate grid learn from these sequences' continuation positions (`plan_exits(first=...)`).
    The fit set needs no exchangeability, so each window gives as many prompts as it holds.
    """
    per_window = max(1, fit_windows.shape[1] // prompt_tokens)
    prompts = fit_windows[:, : per_window * prompt_tokens].reshape(-1, prompt_tokens)
    continuations = full_continuations(lm, prompts, new_tokens, batch_size, progress, "full-model continuations (fit)")
    return torch.cat([prompts, continuations], dim=1)


@dataclass
class GeneratedRun:
    """One policy's continuations of a prompt set, scored against the full model's."""

    scores: np.ndarray  # [n] per-prompt consistency under the certified measure
    exit_depth: torch.Tensor  # [n, T]
    decoded: torch.Tensor  # [n, T] bool: positions actually decoded (a forced prefix run stops early)
    tokens: torch.Tensor  # [n, T]


def generate_and_score(
    dynamic: DynamicModel,
    prompts: PromptSet,
    measure: str,
    batch_size: int = 32,
    progress: ProgressFn | None = None,
    what: str = "generating",
) -> GeneratedRun:
    """Each prompt's greedy early-exit continuation and its consistency with the full one.

    For the prefix measure the run is teacher-forced along the full continuation: greedy
    generation equals it up to the first difference, which is all the measure reads. In a
    data-parallel run each rank generates its shard of the prompts and every rank gets all the rows.
    """
    world, n = distributed.current(), prompts.size
    prompts = prompts.shard(world)
    report = progress or silent
    scores, depths, decoded, tokens = [], [], [], []
    new_tokens = prompts.continuations.shape[1]
    for start in range(0, prompts.size, batch_size):
        batch = slice(start, start + batch_size)
        reference = prompts.continuations[batch]
        forced = reference if measure == "prefix" else None
        if start not in prompts.prefills:
            prompts.prefills[start] = dynamic.prefill_rows(prompts.prompts[batch])
        run = dynamic.generate_rows(prompts.prompts[batch], new_tokens, forced=forced, start=prompts.prefills[start])
        scores.append(consistency(measure, run.tokens, reference))
        depths.append(run.exit_depth)
        decoded.append(run.tokens >= 0)
        tokens.append(run.tokens)
        report(what, min(start + batch_size, prompts.size), prompts.size)
    return GeneratedRun(
        world.gather_rows(np.concatenate(scores), n),
        world.gather_rows(torch.cat(depths), n),
        world.gather_rows(torch.cat(decoded), n),
        world.gather_rows(torch.cat(tokens), n),
    )


def predicted_speedup(run: GeneratedRun, policy: ExitPolicy, costs: CostModel, hidden_size: int) -> float:
    """Full cost over the mean cost of the decode steps the run took (the prefill's first token excluded)."""
    point_cost, full = exit_costs(costs, policy.exit_points, policy.measure, policy.lens == "tuned", policy.vocab_top_k, hidden_size)
    price = {p: c for p, c in zip(policy.exit_points, point_cost)}
    depth = run.exit_depth[:, 1:][run.decoded[:, 1:]]
    if depth.numel() == 0:
        return 1.0
    cost = np.array([price.get(int(d), full) for d in depth.tolist()])
    return float(costs.full_cost() / cost.mean())


def _mean_exit_layer(run: GeneratedRun) -> float:
    return float(run.exit_depth[:, 1:][run.decoded[:, 1:]].double().mean()) if run.exit_depth.shape[1] > 1 else 0.0


def certify_generation(
    lm: LayeredModel,
    lens,
    costs: CostModel,
    plan: ExitPlan,
    calibration: PromptSet,
    heldout: PromptSet,
    held_trace: Trace,
    *,
    measure: str,
    consistency_measure: str = "tokens",
    kv_mode: str = "propagate",
    epsilon: float = 0.05,
    vocab_top_k: int = 0,
    batch_size: int = 32,
    fit_tokens: int = 0,
    progress: ProgressFn | None = None,
) -> CalibrationResult:
    """Learn-then-Test over calibration prompts on the dynamic model's generations at `plan`'s points.

    `held_trace`: the teacher-forced held-out trace at the plan's points, for the simulated numbers
    reported beside the generated ones.
    """
    if consistency_measure not in CONSISTENCY_MEASURES:
        raise DyninferError(f"unknown consistency '{consistency_measure}'; choose from: {', '.join(CONSISTENCY_MEASURES)}")
    target, d = plan.target, lm.hidden_size
    delta = 1.0 - target
    needed = min_examples(delta, epsilon)
    if calibration.size < needed:
        raise DyninferError(
            f"{calibration.size} calibration prompts cannot certify anything at target {target:g} and "
            f"epsilon {epsilon:g}: at least {needed} are needed even if every continuation matched; "
            "raise `prompts` (more prompts also certify looser thresholds), or loosen "
            "`target`/`epsilon`"
        )
    policy = ExitPolicy(lens.kind, measure, plan.points, None, vocab_top_k, kv_mode)
    notes = []
    if not plan.points:
        notes.append("no exit point pays for its checks at this target on the fit data; the policy never exits")
    # Fixed before any calibration prompt is generated: from the fit trace only.
    thresholds = generation_grid(plan.fit_trace) if plan.points else [float("inf")]
    dynamic = DynamicModel(lm, policy, lens, plan.classifier)
    report = progress or silent
    curve: list[CurvePoint] = []

    def losses_of(j: int) -> np.ndarray:
        if j == 0:  # the strictest candidate never exits: the full continuation itself, loss 0
            curve.append(CurvePoint(thresholds[0], 1.0, float("nan"), 1.0, float(lm.num_layers), float("nan")))
            return np.zeros(calibration.size)
        policy.threshold = thresholds[j]
        run = generate_and_score(
            dynamic, calibration, consistency_measure, batch_size, progress, f"certifying threshold {j}/{len(thresholds) - 1} (generation)"
        )
        curve.append(
            CurvePoint(
                thresholds[j],
                float(run.scores.mean()),
                float("nan"),
                predicted_speedup(run, policy, costs, d),
                _mean_exit_layer(run),
                float("nan"),
            )
        )
        return 1.0 - run.scores

    ltt, _ = fixed_sequence_test(thresholds, losses_of, delta, epsilon)
    for point, p in zip(curve, ltt.p_values):
        point.p_value = p
    policy.threshold = ltt.chosen if ltt.chosen_index is not None and ltt.chosen_index > 0 else None
    if policy.threshold is None and plan.points:
        notes.append(
            f"no threshold reaches {consistency_measure} consistency {target:g} in generation with the guarantee: the policy never exits"
        )
    report("held-out generation", 0, 1)
    held_run = (
        generate_and_score(dynamic, heldout, "tokens", batch_size, progress, "held-out generation")
        if policy.threshold is not None
        else None
    )
    generated = _generated_summary(held_run, heldout, policy, costs, d, lm.num_layers, consistency_measure)
    return CalibrationResult(
        policy=policy,
        target=target,
        epsilon=epsilon,
        risk=GENERATION_RISK,
        units=(
            f"{calibration.size} prompts of {calibration.prompts.shape[1]} tokens, "
            f"{calibration.continuations.shape[1]} new tokens each ({consistency_measure} consistency)"
        ),
        ltt=ltt,
        naive_threshold=None,
        curve=curve,
        heldout=evaluate(held_trace, policy.threshold, costs, policy, d),
        naive_heldout=None,
        full_accuracy_heldout=float(held_trace.final_correct.double().mean()),
        fit_tokens=fit_tokens,
        calibration_tokens=int(calibration.size * calibration.continuations.shape[1]),
        notes=notes,
        generated=generated,
    )


def _generated_summary(
    run: GeneratedRun | None, heldout: PromptSet, policy: ExitPolicy, costs: CostModel, d: int, num_layers: int, measure: str
) -> dict:
    """Held-out continuations of the certified policy: every consistency measure, exits, predicted speedup."""
    base = {"prompts": heldout.size, "new_tokens": int(heldout.continuations.shape[1]), "measure": measure}
    if run is None:  # the policy never exits: its continuations are the full model's
        return (
            base
            | {name: 1.0 for name in CONSISTENCY_MEASURES}
            | {
                "certified_measure": 1.0,
                "predicted_speedup": 1.0,
                "mean_exit_layer": float(num_layers),
                "exit_distribution": {str(num_layers): 1.0},
            }
        )
    measures = all_measures(run.tokens, heldout.continuations)
    depth = run.exit_depth[:, 1:]
    histogram = {str(p): float((depth == p).double().mean()) for p in policy.exit_points + [num_layers]}
    return (
        base
        | measures
        | {
            "certified_measure": measures[measure],
            "predicted_speedup": predicted_speedup(run, policy, costs, d),
            "mean_exit_layer": _mean_exit_layer(run),
            "exit_distribution": histogram,
        }
    )

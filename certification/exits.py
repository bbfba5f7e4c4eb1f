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
- Learn-then-Test over the prompts: fixed-sequence testing with betting p-values (the losses are shares),
  generating only until the first candidate that is not rejected.

Guarantee: with probability >= 1 - epsilon over the draw of the calibration prompts, the mean
consistency of the certified policy's continuations is >= target on prompts exchangeable with
them (the same corpus, prompt length and number of new tokens, greedy decoding).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from dyninfer.compressors.ltt import SHARE_P_VALUE, fixed_sequence_test, min_examples
from dyninfer.core import distributed
from dyninfer.core.choices import CONSISTENCY_MEASURES, GENERATION_RISK
from dyninfer.core.consistency import all_measures, consistency
from dyninfer.core.cost import CostModel
from dyninfer.core.distributed import World
from dyninfer.core.errors import DyninferError
from dyninfer.core.layered import LayeredModel
from dyninfer.core.policies import ExitPolicy
from dyninfer.core.progress import ProgressFn, silent
from dyninfer.early_exit.certify import CalibrationResult, CurvePoint
from dyninfer.early_exit.plan import ExitPlan, generation_grid
from dyninfer.early_exit.rule import first_exit
from dyninfer.early_exit.trace import Trace, evaluate, exit_costs
from dyninfer.runtime.dynamic import DynamicModel
from dyninfer.runtime.row_decoding import RowGeneration


@dataclass
class PromptSet:
    """Prompts and the full model's greedy continuations of them (None until known: then `new_tokens` says how long)."""

    prompts: torch.Tensor  # [n, prompt tokens]
    continuations: torch.Tensor | None  # [n, new tokens]
    # Per batch of prompts: its prefill (the same at every threshold), kept for the next candidate.
    prefills: dict = field(default_factory=dict, repr=False)
    shards: dict = field(default_factory=dict, repr=False)  # World -> this rank's PromptSet (its own prefills)
    new_tokens: int = 0  # the continuations' length while they are unknown

    @property
    def size(self) -> int:
        return int(self.prompts.shape[0])

    @property
    def length(self) -> int:
        """Tokens per continuation."""
        return self.new_tokens if self.continuations is None else int(self.continuations.shape[1])

    def prefill(self, dynamic: DynamicModel, start: int, batch: slice):
        """The prefill of the batch of prompts at `start` (this prompt set's rows `batch`), made once and kept."""
        if start not in self.prefills:
            self.prefills[start] = dynamic.prefill_rows(self.prompts[batch])
        return self.prefills[start]

    def set_continuations(self, continuations: torch.Tensor) -> None:
        """Know the continuations (all rows; the shards get theirs)."""
        self.continuations = continuations
        for world, mine in self.shards.items():
            mine.continuations = continuations[world.shard(self.size, "prompts")]

    def shard(self, world: World) -> PromptSet:
        """This rank's prompts in a data-parallel run (every size-th one), kept with their prefills."""
        if world.size == 1:
            return self
        if world not in self.shards:
            rows = world.shard(self.size, "prompts")
            known = None if self.continuations is None else self.continuations[rows]
            self.shards[world] = PromptSet(self.prompts[rows], known, new_tokens=self.new_tokens)
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
class _PointRuns:
    """One exit-point set's runs within a calibration: the runner, each candidate's scores, the held-out runs."""

    runs: CandidateRuns | None = None
    held_runs: CandidateRuns | None = None  # the held-out prompts' runs at the certified thresholds
    scored: dict = field(default_factory=dict)  # threshold -> (scores, predicted speedup, mean exit layer)
    heldout: dict = field(default_factory=dict)  # threshold -> GeneratedRun on the held-out prompts

    def held_out(self, threshold: float | None) -> GeneratedRun | None:
        """The held-out prompts' runs at `threshold`, generated once (None: a policy that never exits)."""
        if threshold is None:
            return None
        if threshold not in self.heldout:
            self.heldout[threshold] = self.held_runs.run(threshold, "held-out generation")
        return self.heldout[threshold]


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
    forced = measure == "prefix"

    def batch_run(start: int, mine: PromptSet, batch: slice) -> RowGeneration:
        reference = mine.continuations[batch] if forced else None
        return dynamic.generate_rows(mine.prompts[batch], mine.length, forced=reference, start=mine.prefill(dynamic, start, batch))

    return _scored_batches(prompts, measure, batch_size, progress, what, batch_run)


def _scored_batches(prompts: PromptSet, measure: str, batch_size: int, progress: ProgressFn | None, what: str, batch_run) -> GeneratedRun:
    """`batch_run(start, shard, rows)` over this rank's shard in batches, scored and gathered from every rank."""
    world, n = distributed.current(), prompts.size
    mine = prompts.shard(world)
    report = progress or silent
    scores, depths, decoded, tokens = [], [], [], []
    report(what, 0, mine.size)
    for start in range(0, mine.size, batch_size):
        batch = slice(start, start + batch_size)
        run = batch_run(start, mine, batch)
        scores.append(consistency(measure, run.tokens, mine.continuations[batch]))
        depths.append(run.exit_depth)
        decoded.append(run.tokens >= 0)
        tokens.append(run.tokens)
        report(what, min(start + batch_size, mine.size), mine.size)
    return GeneratedRun(
        world.gather_rows(np.concatenate(scores), n),
        world.gather_rows(torch.cat(depths), n),
        world.gather_rows(torch.cat(decoded), n),
        world.gather_rows(torch.cat(tokens), n),
    )


class CandidateRuns:
    """The dynamic model's runs on one prompt set for candidate thresholds visited strict to loose, each
    continued from the previous one's instead of generated anew.

    A row's exits read only its confidences, and a looser threshold leaves wherever a stricter one left, at
    the same point or an earlier one. So where a looser candidate decides every position of a prompt as the
    previous candidate did, its run is that run (the same caches, the same tokens); where it first decides
    differently, at position t, everything before t is shared, and only t onwards is decoded again, from the
    previous run's cache cut back to t. The decisions are read off the confidences the previous run recorded
    at every point it checked (all points up to the one it left at, which is as far as a looser threshold
    can look). This holds for both KV modes (each row's cache entries depend only on its tokens and exits)
    and is exact up to floating point: the rows decoded again form smaller batches, whose matrix products
    may round differently.

    The first run is `full()`: no exit, every point checked, so it is also how the full model's
    continuations are generated when they are not known yet (one generation instead of two).

    Not used (every candidate generated from its prompt) for the prefix measure, whose runs are
    teacher-forced and stop early, for recurrent models, whose state cannot be cut back, and for a
    threshold stricter than the last one run. The kept states hold the KV cache of every prompt's whole run.
    """

    def __init__(
        self,
        dynamic: DynamicModel,
        prompts: PromptSet,
        measure: str,
        batch_size: int = 32,
        progress: ProgressFn | None = None,
        reuse: bool = True,
    ):
        self.dynamic, self.prompts, self.measure = dynamic, prompts, measure
        self.batch_size, self.progress = batch_size, progress
        # `reuse` False: every candidate generated anew (the plain path, for comparison).
        self.reuses = reuse and measure != "prefix" and not dynamic.lm.adapter.recurrent
        self.threshold: float | None = None  # the last candidate run
        self.records: dict[int, RowGeneration] = {}  # batch start (in this rank's shard) -> its last run
        self.positions_decoded = self.positions_asked = 0  # `_count`

    def full(self, what: str = "full-model continuations") -> torch.Tensor:
        """The first run: never exit, checking every point. Its tokens are the full model's continuations (set on
        the prompt set when it did not know them); the candidates continue from it."""
        if not self.reuses:
            raise DyninferError("this prompt set's candidates cannot continue one another (prefix measure or recurrent model)")
        world, policy = distributed.current(), self.dynamic.policy
        policy.threshold = self.threshold = float("inf")
        mine, report = self.prompts.shard(world), self.progress or silent
        report(what, 0, mine.size)
        for start in range(0, mine.size, self.batch_size):
            batch = slice(start, start + self.batch_size)
            prefill = mine.prefill(self.dynamic, start, batch)
            record = self.dynamic.generate_rows(mine.prompts[batch], self.prompts.length, start=prefill, keep_state=True)
            self.records[start] = record
            # Generating the continuations is work done either way; a run beside known ones is extra.
            self._count(0 if self.prompts.continuations is None else record.tokens.numel(), 0)
            report(what, min(start + self.batch_size, mine.size), mine.size)
        tokens = world.gather_rows(torch.cat([r.tokens for r in self.records.values()]), self.prompts.size)
        if self.prompts.continuations is None:
            self.prompts.set_continuations(tokens)
        return tokens

    def run(self, threshold: float, what: str = "generating") -> GeneratedRun:
        """The runs at `threshold`, scored against the full continuations: continued from the last run when
        `threshold` is no stricter than its (else generated anew)."""
        if not self.reuses or (self.threshold is not None and threshold > self.threshold):
            self.dynamic.policy.threshold = threshold
            return generate_and_score(self.dynamic, self.prompts, self.measure, self.batch_size, self.progress, what)
        if not self.records:
            self.full()
        self.dynamic.policy.threshold = self.threshold = threshold
        new_tokens = self.prompts.length

        def batch_run(start: int, mine: PromptSet, batch: slice) -> RowGeneration:
            record = self.records[start]
            changed, step = self._first_changes(record, threshold)
            self._count(changed.numel() * (new_tokens - step), record.tokens.numel())
            if changed.numel():
                again = self.dynamic.resume_rows(record, changed, step)
                record.tokens[changed], record.exit_depth[changed] = again.tokens, again.exit_depth
                record.confidence[changed] = again.confidence
                record.state.put_rows(changed, again.state)
            return record

        return _scored_batches(self.prompts, self.measure, self.batch_size, self.progress, what, batch_run)

    def _count(self, decoded: int, asked: int) -> None:
        """Positions decoded, and what generating each candidate from its prompts would decode (the saving)."""
        self.positions_decoded += decoded
        self.positions_asked += asked

    def _first_changes(self, record: RowGeneration, threshold: float) -> tuple[torch.Tensor, int]:
        """(rows whose exits at `threshold` differ from `record`'s somewhere, the first position any of them differs)."""
        points = self.dynamic.policy.exit_points
        rows, new_tokens, n_points = record.confidence.shape
        first = first_exit(record.confidence.reshape(-1, n_points).T, threshold).reshape(rows, new_tokens)
        depth_of = torch.tensor(points + [self.dynamic.lm.num_layers])
        decided = depth_of[first]  # first_exit's -1 (no point passes) indexes the full depth
        differs = decided != record.exit_depth
        changed = differs.any(1).nonzero().squeeze(1)
        if not changed.numel():
            return changed, 0
        return changed, int(differs[changed].float().argmax(1).min())


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
    reuse: bool = True,
    runs_cache: dict | None = None,
) -> CalibrationResult:
    """Learn-then-Test over calibration prompts on the dynamic model's generations at `plan`'s points.

    `held_trace`: the teacher-forced held-out trace at the plan's points, for the simulated numbers
    reported beside the generated ones. `reuse`: continue each candidate's runs from the previous
    candidate's (`CandidateRuns`; the same result for a fraction of the work) rather than generating
    each from its prompts. `runs_cache`: a dict shared by the calls of one calibration (the same model,
    lens and prompts), in which targets that chose the same exit points share their runs.
    """
    if consistency_measure not in CONSISTENCY_MEASURES:
        raise DyninferError(f"unknown consistency '{consistency_measure}'; choose from: {', '.join(CONSISTENCY_MEASURES)}")
    _check_enough(calibration.size, plan.target, epsilon)
    policy = ExitPolicy(lens.kind, measure, plan.points, None, vocab_top_k, kv_mode)
    notes = [] if plan.points else ["no exit point pays for its checks at this target on the fit data; the policy never exits"]
    # Fixed before any calibration prompt is generated: from the fit trace only.
    thresholds = generation_grid(plan.fit_trace) if plan.points else [float("inf")]
    # Candidate runs on the same exit points are the same runs (the classifier's rows are the points'), so
    # targets that chose the same points share them: cached per point set, with each candidate's scores.
    key = (tuple(plan.points), kv_mode, consistency_measure, reuse)
    shared = runs_cache.setdefault(key, _PointRuns()) if runs_cache is not None else _PointRuns()
    if shared.runs is None:

        def runner(prompt_set: PromptSet, measure_of_runs: str) -> CandidateRuns:
            dynamic = DynamicModel(lm, dataclasses.replace(policy), lens, plan.classifier)  # its own policy: it moves the threshold
            return CandidateRuns(dynamic, prompt_set, measure_of_runs, batch_size, progress, reuse=reuse)

        shared.runs, shared.held_runs = runner(calibration, consistency_measure), runner(heldout, "tokens")
    _know_continuations(lm, shared, bool(plan.points), batch_size, progress)
    curve: list[CurvePoint] = []
    ltt, _ = fixed_sequence_test(thresholds, _losses(shared, thresholds, costs, curve), 1.0 - plan.target, epsilon, SHARE_P_VALUE)
    for point, p in zip(curve, ltt.p_values):
        point.p_value = p
    policy.threshold = ltt.chosen if ltt.chosen_index is not None and ltt.chosen_index > 0 else None
    if policy.threshold is None and plan.points:
        notes.append(
            f"no threshold reaches {consistency_measure} consistency {plan.target:g} in generation with the guarantee: "
            "the policy never exits"
        )
    d, runs = lm.hidden_size, shared.runs
    return CalibrationResult(
        policy=policy,
        target=plan.target,
        epsilon=epsilon,
        risk=GENERATION_RISK,
        units=(
            f"{calibration.size} prompts of {calibration.prompts.shape[1]} tokens, "
            f"{calibration.length} new tokens each ({consistency_measure} consistency)"
        ),
        ltt=ltt,
        naive_threshold=None,
        curve=curve,
        heldout=evaluate(held_trace, policy.threshold, costs, policy, d),
        naive_heldout=None,
        full_accuracy_heldout=float(held_trace.final_correct.double().mean()),
        fit_tokens=fit_tokens,
        calibration_tokens=calibration.size * calibration.length,
        notes=notes,
        generated=_generated_summary(shared.held_out(policy.threshold), heldout, policy, costs, d, lm.num_layers, consistency_measure),
        # This rank's count in a data-parallel run.
        work={"candidate_positions_decoded": runs.positions_decoded, "candidate_positions_from_prompts": runs.positions_asked},
    )


def _check_enough(prompts: int, target: float, epsilon: float) -> None:
    """Refuse a calibration that could certify nothing even if every continuation matched."""
    needed = min_examples(1.0 - target, epsilon, SHARE_P_VALUE)
    if prompts < needed:
        raise DyninferError(
            f"{prompts} calibration prompts cannot certify anything at target {target:g} and "
            f"epsilon {epsilon:g}: at least {needed} are needed even if every continuation matched; "
            "raise `prompts` (more prompts also certify looser thresholds), or loosen "
            "`target`/`epsilon`"
        )


def _know_continuations(lm: LayeredModel, shared: _PointRuns, exits: bool, batch_size: int, progress) -> None:
    """The full model's continuations of both prompt sets: the candidates' first, never-exit, run generates them
    when runs continue one another; else a plain full-model generation."""
    for runner, what in ((shared.runs, "calibration"), (shared.held_runs, "held-out")):
        if runner.prompts.continuations is not None:
            continue
        if runner.reuses and exits:
            runner.full(f"full-model continuations ({what})")
        else:
            continuations = full_continuations(
                lm, runner.prompts.prompts, runner.prompts.length, batch_size, progress, f"full-model continuations ({what})"
            )
            runner.prompts.set_continuations(continuations)


def _losses(shared: _PointRuns, thresholds: list[float], costs: CostModel, curve: list[CurvePoint]):
    """Candidate j's per-prompt losses (1 - consistency), generated on demand, each added to `curve`."""
    runs = shared.runs
    lm = runs.dynamic.lm

    def losses_of(j: int) -> np.ndarray:
        if j == 0:  # the strictest candidate never exits: the full continuation itself, loss 0
            curve.append(CurvePoint(thresholds[0], 1.0, float("nan"), 1.0, float(lm.num_layers), float("nan")))
            return np.zeros(runs.prompts.size)
        if thresholds[j] not in shared.scored:
            run = runs.run(thresholds[j], f"certifying threshold {j}/{len(thresholds) - 1} (generation)")
            speedup = predicted_speedup(run, runs.dynamic.policy, costs, lm.hidden_size)
            shared.scored[thresholds[j]] = (run.scores, speedup, _mean_exit_layer(run))
        scores, speedup, mean_layer = shared.scored[thresholds[j]]
        curve.append(CurvePoint(thresholds[j], float(scores.mean()), float("nan"), speedup, mean_layer, float("nan")))
        return 1.0 - scores

    return losses_of


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

"""Stop rules, certified: Learn-then-Test over the candidate thresholds on calibration units.

Guarantee (Learn-then-Test; betting p-values for completion losses, which are shares, exact binomial ones for
reasoning losses, which are 0 or 1: compressors/ltt.py): with probability at least
1 - epsilon over the random draw of the calibration units, the certified rule's expected loss is at most
delta on units exchangeable with them. By default the units are those where there is something to lose
(a completion with value > 0, a problem the full chain answers right), so the guarantee is about the
value that exists: "keeps >= 1 - delta of each valuable completion's value on average" and "keeps
>= 1 - delta of the right answers". Units with nothing to lose would otherwise make the bound trivially
easy to meet.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dyninfer.compressors.ltt import BINARY_P_VALUE, SHARE_P_VALUE, LTTResult, learn_then_test
from dyninfer.compressors.stop_simulate import NEVER, CompletionRuns, ReasoningRun, candidate_grid, reasoning_losses, reasoning_outcome
from dyninfer.core.choices import COMPLETION, REASONING
from dyninfer.core.errors import DyninferError, option


@dataclass
class StopCertificate:
    ltt: LTTResult
    workload: str
    signal: str
    condition: str
    curve: list[dict]  # per tested candidate: the calibration units' outcome
    heldout: dict | None = None  # the certified rule on held-out units
    heldout_never: dict | None = None  # held-out units without a rule

    @property
    def threshold(self) -> float | None:
        """The certified threshold; None when only "never stop" (or nothing) was certified."""
        chosen = self.ltt.chosen
        return None if chosen is None or chosen == NEVER[self.workload] else float(chosen)

    def statement(self) -> str:
        kept = "of each valuable completion's value on average" if self.workload == COMPLETION else "of the right answers"
        if self.condition == "all":
            kept = (
                "of the value on average over all prompts"
                if self.workload == COMPLETION
                else "of the answers right (share of all problems)"
            )
        units = "prompts" if self.workload == COMPLETION else "problems"
        counted = f"{self.ltt.n} calibration {units}" + (" with something to lose" if self.condition == "valued" else "")
        if self.ltt.chosen_index is None:
            return (
                f"No stop rule could be certified: even never stopping is not shown to keep >= {1 - self.ltt.delta:.4g} {kept} "
                f"at epsilon {self.ltt.epsilon:.4g} with {counted}; add calibration units"
            )
        j = self.ltt.chosen_index
        rule = "never stopping" if self.threshold is None else f"the {self.signal} threshold {self.threshold:.4g}"
        return (
            f"At {rule} (empirical loss {self.ltt.risks[j]:.4g}): with probability >= {1 - self.ltt.epsilon:.4g} over the draw of the "
            f"{counted}, the rule keeps >= {1 - self.ltt.delta:.4g} {kept} ({self.ltt.method} p-values, fixed-sequence test) on "
            f"{units} exchangeable with them: the same corpus or problem source, prompt length, budget, model and greedy decoding"
        )

    def to_dict(self) -> dict:
        ltt = self.ltt.to_dict()
        ltt["lambdas"] = [None if x == NEVER[self.workload] else float(x) for x in self.ltt.lambdas]
        ltt["chosen"] = self.threshold
        ltt["statement"] = self.statement()
        return {
            "signal": self.signal,
            "threshold": self.threshold,
            "ltt": ltt,
            "curve": self.curve,
            "heldout": self.heldout,
            "heldout_never": self.heldout_never,
        }


def _ltt_over(losses: np.ndarray, grid: list[float], delta: float, epsilon: float, method: str) -> LTTResult:
    """Fixed-sequence testing in the grid's order (strict to loose: learn_then_test never sorts); the reasoning
    grid's "never" (+inf) is passed as the largest float, then the grid itself is kept as the candidates."""
    result = learn_then_test(losses, [min(g, np.finfo(float).max) for g in grid], delta, epsilon, method)
    result.lambdas = list(grid)
    return result


def _most_saving(ltt: LTTResult, curve: list[dict]) -> LTTResult:
    """Choose, among the candidates the test certified, the one that saves the most tokens on the calibration units
    (on a tie, the loosest). Fixed-sequence testing certifies every candidate it rejects at once (with probability
    >= 1 - epsilon all of them keep the target), so choosing among them on the same units keeps the guarantee.
    The loosest is not always the cheapest: a reasoning rule pays for its probes, and one that probes at every
    step but seldom fires spends more than never stopping (which is then the choice)."""
    certified = [j for j, rejected in enumerate(ltt.rejected) if rejected]
    if certified:
        ltt.chosen_index = max(certified, key=lambda j: (curve[j]["tokens_saved"], j))
    return ltt


def certify_completion(
    cal: CompletionRuns, grid: list[float | None], signal: str, target: float, epsilon: float, condition: str = "valued"
) -> StopCertificate:
    """Learn-then-Test over the calibration prompts (the rows `condition` selects)."""
    units = cal.units(condition)
    if units.size == 0:
        raise DyninferError(
            "no calibration prompt has a completion of any value (none of the full model's completions starts like the real text); "
            f"use more prompts, other data, or {option('condition')} all"
        )
    sub = cal.subset(units)
    losses = np.stack([sub.losses(signal, t) for t in grid])
    ltt = _ltt_over(losses, grid, 1.0 - target, epsilon, SHARE_P_VALUE)  # a share of the value is lost
    curve = [cal.outcome(signal, t) | {"risk": float(r), "p_value": float(p)} for t, r, p in zip(grid, ltt.risks, ltt.p_values)]
    return StopCertificate(_most_saving(ltt, curve), COMPLETION, signal, condition, curve)


def certify_reasoning(
    cal: list[ReasoningRun], grid: list[float | None], signal: str, target: float, epsilon: float, condition: str = "valued"
) -> StopCertificate:
    units = [run for run in cal if condition == "all" or run.right(run.full_answer)]
    if not units:
        raise DyninferError(
            "the full chains answer none of the calibration problems right, so there are no right answers to keep; "
            f"use easier problems, more of them, or {option('condition')} all"
        )
    losses = np.stack([reasoning_losses(units, signal, t) for t in grid])
    ltt = _ltt_over(losses, grid, 1.0 - target, epsilon, BINARY_P_VALUE)  # a right answer is lost or not
    curve = [reasoning_outcome(cal, signal, t) | {"risk": float(r), "p_value": float(p)} for t, r, p in zip(grid, ltt.risks, ltt.p_values)]
    return StopCertificate(_most_saving(ltt, curve), REASONING, signal, condition, curve)


def certify(
    workload: str, runs, grid: list[float], signal: str, target: float, epsilon: float, condition: str = "valued"
) -> StopCertificate:
    """Learn-then-Test of `grid` (strict to loose) on calibration `runs` (CompletionRuns, or a list of ReasoningRun)."""
    if workload == COMPLETION:
        return certify_completion(runs, grid, signal, target, epsilon, condition)
    return certify_reasoning(runs, grid, signal, target, epsilon, condition)


def choose_signal(
    workload: str, fit_runs, signals: tuple[str, ...], target: float, epsilon: float, condition: str = "valued"
) -> tuple[str, list[float], dict]:
    """(signal, its candidate grid, what each signal saves on the fit units): the signal whose loosest threshold
    meeting the target on the fit units alone saves the most there. The fit units never certify anything."""
    found = {}
    for signal in signals:
        grid = candidate_grid(workload, fit_runs, signal)
        try:
            curve = certify(workload, fit_runs, grid, signal, target, epsilon, condition).curve
        except DyninferError:  # the fit units hold nothing to lose: nothing to choose on
            curve = []
        choice = empirical_choice(curve, target)
        found[signal] = {
            "grid": grid,
            "tokens_saved": choice["tokens_saved"] if choice else 0.0,
            "threshold": choice and choice["threshold"],
        }
    best = max(found, key=lambda s: found[s]["tokens_saved"])
    return best, found[best]["grid"], {s: {k: v for k, v in f.items() if k != "grid"} for s, f in found.items()}


def empirical_choice(curve: list[dict], target: float) -> dict | None:
    """The loosest candidate whose calibration risk alone meets the target (no guarantee; for comparison)."""
    passing = [point for point in curve if point["risk"] <= 1.0 - target]
    return passing[-1] if passing else None

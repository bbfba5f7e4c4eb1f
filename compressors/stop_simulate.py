"""Stop rules, simulated: what every candidate threshold would do to recorded full generations.

Each unit (a prompt, a problem) yields, for every candidate threshold λ, the point where the rule stops and
what that loses, decided by the very functions the runtimes obey (compressors/stop_obey.py). The candidates
run strict (never stop) to loose, and a stop at a looser λ is never later than at a stricter one, so losses
grow along the sequence and the fixed-sequence test of `ltt` applies (compressors/stop_certify.py).

- completion: a unit's loss is the share of the full completion's value (its longest prefix matching the
  document's real continuation, in tokens, characters or lines) that the stop loses;
- reasoning: a unit's loss is 1 when the full chain's answer was right and the stopped answer is not. The
  probes' tokens are counted in the cost, including the probes of a chain the rule never stops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from dyninfer.compressors.stop_obey import completion_scores, completion_stops, reasoning_probes, reasoning_score, reasoning_stops
from dyninfer.core.choices import COMPLETION, REASONING, STOP_PROBE_SITES, STOP_VALUE_UNITS
from dyninfer.core.errors import check_choice

# The strictest candidates, which never stop: no score is below 0 (completion) or at least +inf (reasoning).
NEVER = {COMPLETION: 0.0, REASONING: math.inf}

# --------------------------------------------------------------------------- completion


def shown_tokens(score: np.ndarray, threshold: float | None) -> np.ndarray:
    """Per row of scores [n, L], how many tokens the completion rule shows: those before the first it stops at."""
    stops = completion_stops(np.asarray(score, dtype=float), threshold)
    n, length = stops.shape
    return np.where(stops.any(axis=1), stops.argmax(axis=1), length)


def token_values(generated: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """[n, L + 1]: the value (matching prefix, in tokens) of the first k generated tokens, k = 0..L."""
    equal = np.asarray(generated) == np.asarray(reference)
    matched = np.cumprod(equal, axis=1).sum(axis=1)
    k = np.arange(equal.shape[1] + 1)
    return np.minimum(k[None, :], matched[:, None]).astype(float)


def text_values(shown_texts: list[str], reference_text: str, unit: str) -> np.ndarray:
    """[L + 1] for one prompt: the value of each shown prefix's text (`shown_texts[k]`: the first k tokens
    decoded) against the real continuation, in characters or complete lines of the common prefix."""
    check_choice("value_unit", unit, STOP_VALUE_UNITS[1:])
    out = np.zeros(len(shown_texts))
    for k, text in enumerate(shown_texts):
        common = 0
        for a, b in zip(text, reference_text):
            if a != b:
                break
            common += 1
        out[k] = common if unit == "characters" else reference_text[:common].count("\n")
    return np.maximum.accumulate(out)  # showing more never loses value already shown


def completion_losses(values: np.ndarray, shown: np.ndarray) -> np.ndarray:
    """Per row, the share of the full completion's value (values[:, -1]) lost by showing `shown` tokens."""
    values = np.asarray(values, dtype=float)
    full = values[:, -1]
    kept = values[np.arange(values.shape[0]), shown]
    return np.where(full > 0, (full - kept) / np.where(full > 0, full, 1.0), 0.0).clip(0.0, 1.0)


def completion_grid(fit_score: np.ndarray, count: int = 40) -> list[float]:
    """Candidate thresholds, strict to loose: never stop, then quantiles of the fit split's scores (low to high)."""
    flat = np.asarray(fit_score, dtype=float).ravel()
    flat = flat[np.isfinite(flat)]
    if flat.size == 0:
        return [NEVER[COMPLETION]]
    # Geometric spacing of the low quantiles: the certified thresholds live where few tokens stop.
    levels = np.unique(np.concatenate([np.geomspace(1e-3, 0.5, count // 2), np.linspace(0.5, 0.95, count - count // 2)]))
    grid = sorted({float(q) for q in np.quantile(flat, levels) if q > 0})
    return [NEVER[COMPLETION], *grid]


@dataclass
class CompletionRuns:
    """The full model's completions of some prompts and what each candidate threshold would do to them."""

    confidence: np.ndarray  # [n, L] max probability of each generated token
    values: np.ndarray  # [n, L + 1] value of the first k tokens
    right: np.ndarray  # [n, L] the token equals the reference at its position

    @property
    def size(self) -> int:
        return int(self.confidence.shape[0])

    def subset(self, rows) -> CompletionRuns:
        return CompletionRuns(self.confidence[rows], self.values[rows], self.right[rows])

    def units(self, condition: str) -> np.ndarray:
        """The rows the guarantee is about."""
        return np.arange(self.size) if condition == "all" else np.flatnonzero(self.values[:, -1] > 0)

    def losses(self, signal: str, threshold: float | None) -> np.ndarray:
        return completion_losses(self.values, shown_tokens(completion_scores(self.confidence, signal), threshold))

    def outcome(self, signal: str, threshold: float | None) -> dict:
        """Tokens saved, value kept, precision of the shown tokens, with the rule at `threshold`."""
        shown = shown_tokens(completion_scores(self.confidence, signal), threshold)
        length = self.confidence.shape[1]
        mask = np.arange(length)[None, :] < shown[:, None]
        full = self.values[:, -1]
        kept = self.values[np.arange(self.size), shown]
        valued = full > 0
        losses = completion_losses(self.values, shown)
        return {
            "threshold": threshold,
            "tokens_saved": 1.0 - float(shown.sum()) / max(self.size * length, 1),
            "value_kept": float(kept.sum() / full.sum()) if full.sum() > 0 else 1.0,  # of all the value
            "mean_share_kept": 1.0 - float(losses[valued].mean()) if valued.any() else 1.0,  # per valuable completion
            "risk_all": float(losses.mean()),
            "precision_shown": float((self.right & mask).sum() / max(mask.sum(), 1)),
            "precision_without": float(self.right.mean()),
            "prompts_losing_value": float((kept < full).mean()),
            "mean_value": float(full.mean()),
            "share_valued": float(valued.mean()),
        }


# --------------------------------------------------------------------------- reasoning


@dataclass
class Probe:
    """One trial answer, forced at a step boundary of the chain."""

    boundary: int  # chain tokens before it
    answer: float | None
    confidence: float
    cost: int  # tokens it fed and generated
    line_end: bool = True  # its boundary token ends a line (a site of the "lines" rules too)


@dataclass
class ReasoningRun:
    """A problem's full chain, its probes, and whether answers are right."""

    chain_tokens: int
    full_answer: float | None
    answer: float  # the reference
    probes: list[Probe] = field(default_factory=list)

    def right(self, value: float | None) -> bool:
        return value is not None and abs(value - self.answer) < 1e-6

    def at(self, probe_at: str) -> ReasoningRun:
        """The run as a rule probing only at `probe_at` sites sees it (recorded runs probe every sentence end)."""
        check_choice("probe_at", probe_at, STOP_PROBE_SITES)
        probes = self.probes if probe_at == "sentences" else [p for p in self.probes if p.line_end]
        return ReasoningRun(self.chain_tokens, self.full_answer, self.answer, probes)

    def probe_scores(self, signal: str) -> list[float]:
        previous, out = None, []
        for p in self.probes:
            out.append(reasoning_score(signal, p.answer, previous, p.confidence))
            previous = p.answer
        return out

    def stop(self, signal: str, threshold: float | None) -> tuple[float | None, int]:
        """(the answer given, the tokens spent: chain tokens generated plus every probe run). A rule that never
        stops runs no probe."""
        if not reasoning_probes(threshold):
            return self.full_answer, self.chain_tokens
        spent = 0
        for probe, score in zip(self.probes, self.probe_scores(signal)):
            spent += probe.cost
            if reasoning_stops(score, threshold):
                return probe.answer, probe.boundary + spent
        return self.full_answer, self.chain_tokens + spent


def reasoning_grid(fit_runs: list[ReasoningRun], signal: str, count: int = 40) -> list[float]:
    """Candidate thresholds, strict to loose: never stop, then the fit split's probe scores from high to low."""
    flat = np.array([s for run in fit_runs for s in run.probe_scores(signal)], dtype=float)
    flat = flat[flat > 0]
    if flat.size == 0:
        return [NEVER[REASONING]]
    grid = sorted({float(q) for q in np.quantile(flat, np.linspace(0.02, 1.0, count))}, reverse=True)
    return [NEVER[REASONING], *grid]


def reasoning_losses(runs: list[ReasoningRun], signal: str, threshold: float | None) -> np.ndarray:
    return np.array([float(run.right(run.full_answer) and not run.right(run.stop(signal, threshold)[0])) for run in runs])


def reasoning_outcome(runs: list[ReasoningRun], signal: str, threshold: float | None) -> dict:
    answers = [run.stop(signal, threshold) for run in runs]
    full_cost = sum(run.chain_tokens for run in runs)
    spent = sum(cost for _, cost in answers)
    right_full = [run.right(run.full_answer) for run in runs]
    right_now = [run.right(a) for run, (a, _) in zip(runs, answers)]
    kept = sum(f and n for f, n in zip(right_full, right_now))
    return {
        "threshold": threshold,
        "tokens_saved": 1.0 - spent / max(full_cost, 1),  # probes included
        "accuracy": sum(right_now) / max(len(runs), 1),
        "accuracy_without": sum(right_full) / max(len(runs), 1),
        "right_kept": kept / sum(right_full) if any(right_full) else 1.0,
        "mean_chain_tokens": full_cost / max(len(runs), 1),
        "mean_tokens_spent": spent / max(len(runs), 1),
    }


def candidate_grid(workload: str, fit_runs, signal: str) -> list[float]:
    """The candidate thresholds, from the fit units alone."""
    if workload == COMPLETION:
        return completion_grid(completion_scores(fit_runs.confidence, signal))
    return reasoning_grid(fit_runs, signal)


def outcome(workload: str, runs, signal: str, threshold: float | None) -> dict:
    return runs.outcome(signal, threshold) if workload == COMPLETION else reasoning_outcome(runs, signal, threshold)

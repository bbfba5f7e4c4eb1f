"""Stop rules: stop generating what nobody will use, with a Learn-then-Test guarantee on what is lost.

A stop rule is a second policy beside the exit policy. Where an exit skips layers of one token, a stop
skips whole tokens: the rest of a completion, or the rest of a chain of thought.

Two workloads, one shape. Each unit (a prompt, a problem) yields, for every candidate threshold λ, the
point where the rule stops and what that loses. The rule stops at the first step whose *score* crosses
λ; the candidates run strict (never stop) to loose, and a stop at a looser λ is never later than at a
stricter one, so losses grow along the sequence and the fixed-sequence test of `ltt` applies.

- **completion**: the score of generated token t is the final layer's max probability of it
  (`confidence`) or the product of those up to t (`prefix`: the model's own estimate that every token
  shown so far is right, whose increments are the expected value of showing one more token). The rule
  stops *before* the first token whose score is below λ. A unit's loss is the share of the full
  completion's value (its longest prefix matching the document's real continuation, in tokens,
  characters or lines) that the stop loses.
- **reasoning**: at every step boundary of the chain a probe forces an answer ("The answer is") and
  reads the model's trial answer and its confidence (the least max probability over the answer's
  tokens). The rule stops at the first probe whose score is at least λ: `confidence` is the probe's
  confidence, `stable` the same but only when the trial answer equals the previous probe's (DEER's
  confidence, and answer convergence). A unit's loss is 1 when the full chain's answer was right and
  the stopped answer is not. The probes' tokens are counted in the cost, including the probes of a
  chain the rule never stops.

Obeying a rule (`CompletionStopper`, `ReasoningStopper`, `ProbeVocabulary`) is token-id level and free of
torch, so the torch runtime and the ONNX runtime take the very decisions the certification simulated.

Guarantee (Learn-then-Test, Hoeffding-Bentkus or exact binomial p-values): with probability at least
1 - epsilon over the random draw of the calibration units, the certified rule's expected loss is at most
delta on units exchangeable with them. By default the units are those where there is something to lose
(a completion with value > 0, a problem the full chain answers right), so the guarantee is about the
value that exists: "keeps >= 1 - delta of each valuable completion's value on average" and "keeps
>= 1 - delta of the right answers". Units with nothing to lose would otherwise make the bound trivially
easy to meet.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

import numpy as np

from dyninfer.compressors.ltt import LTTResult, learn_then_test
from dyninfer.core.choices import STOP_PROBE_SITES
from dyninfer.core.errors import DyninferError, check_choice, option

COMPLETION = "completion"
REASONING = "reasoning"
WORKLOADS = (COMPLETION, REASONING)
SIGNALS = {COMPLETION: ("confidence", "prefix"), REASONING: ("confidence", "stable")}
VALUE_UNITS = ("tokens", "characters", "lines")
CONDITIONS = ("valued", "all")  # which units the guarantee is about (see the module docstring)
# Where a chain is probed: at every sentence end (".", "!", "?", ":", ";" or a line end), or at line ends only
# (fewer probes, each a step of a chain written a step per line).
PROBE_SITES = STOP_PROBE_SITES
# The strictest candidates, which never stop: no score is below 0 (completion) or at least +inf (reasoning).
NEVER = {COMPLETION: 0.0, REASONING: math.inf}
PROBE_SUFFIX = "\nThe answer is"


@dataclass
class StopPolicy:
    """A certified stop rule, as the artifact stores it and the runtime obeys it."""

    workload: str
    signal: str
    threshold: float | None  # None: never stop (nothing could be certified, or the strictest was all that held)
    target: float  # 1 - delta: the value (completion) or right answers (reasoning) kept
    epsilon: float
    new_tokens: int  # the completion length (or chain budget) it was certified for
    value_unit: str = "tokens"
    condition: str = "valued"
    mode: str = "full"  # the generation it was certified on
    model_state: str = ""  # the model state (weights, steering, pruning) it was certified on
    probe_suffix: str = PROBE_SUFFIX  # reasoning: the forced answer continuation
    probe_tokens: int = 6  # reasoning: tokens a probe may generate
    statement: str = ""
    probe_at: str = "sentences"  # reasoning: the probe sites (PROBE_SITES; rules made before it probed at sentences)

    def check(self) -> StopPolicy:
        """Refuse a damaged or foreign rule with one line (it comes from an artifact or a package on disk)."""

        def number(value, low: float, high: float) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and low < value < high

        def whole(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= 1

        problems = [
            (self.workload in WORKLOADS, "workload"),
            (self.signal in SIGNALS.get(self.workload, ()), "signal"),
            (self.value_unit in VALUE_UNITS, "value_unit"),
            (self.condition in CONDITIONS, "condition"),
            (self.threshold is None or number(self.threshold, -math.inf, math.inf), "threshold"),
            (number(self.target, 0.0, 1.0) and number(self.epsilon, 0.0, 1.0), "target or epsilon"),
            (whole(self.new_tokens) and whole(self.probe_tokens), "new_tokens or probe_tokens"),
            (isinstance(self.probe_suffix, str) and isinstance(self.model_state, str), "probe_suffix or model_state"),
            (self.probe_at in PROBE_SITES, "probe_at"),
        ]
        bad = [name for ok, name in problems if not ok]
        if bad:
            raise DyninferError(f"the stop rule's {bad[0]} is invalid; run `dyninfer stop` again to make a new one")
        return self

    @property
    def delta(self) -> float:
        return 1.0 - self.target

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> StopPolicy:
        if not isinstance(raw, dict):
            raise DyninferError("the artifact's stop rule is not an object; run `dyninfer stop` into it again")
        names = {f for f in cls.__dataclass_fields__}
        try:
            return cls(**{k: v for k, v in raw.items() if k in names}).check()
        except TypeError as exc:
            raise DyninferError(f"the artifact's stop rule is incomplete ({exc}); run `dyninfer stop` into it again") from None

    def describe(self) -> str:
        if self.threshold is None:
            return f"{self.workload} stop: never stops (nothing looser was certified)"
        if self.workload == COMPLETION:
            return f"{self.workload} stop: stops when the {self.signal} score is < {self.threshold:.4g}"
        return f"{self.workload} stop: probes at {self.probe_at[:-1]} ends, stops when the {self.signal} score is >= {self.threshold:.4g}"


# --------------------------------------------------------------------------- completion


def scores(confidence: np.ndarray, signal: str) -> np.ndarray:
    """Per generated token [n, L], the score the completion rule compares with its threshold."""
    confidence = np.asarray(confidence, dtype=float)
    if signal == "prefix":
        return np.cumprod(confidence, axis=1)
    check_choice("signal", signal, SIGNALS[COMPLETION])
    return confidence


def shown_tokens(score: np.ndarray, threshold: float | None) -> np.ndarray:
    """Per row, how many tokens the completion rule shows: those before the first score below `threshold`."""
    score = np.asarray(score, dtype=float)
    n, length = score.shape
    if threshold is None or threshold <= 0:
        return np.full(n, length)
    below = score < threshold
    return np.where(below.any(axis=1), below.argmax(axis=1), length)


def token_values(generated: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """[n, L + 1]: the value (matching prefix, in tokens) of the first k generated tokens, k = 0..L."""
    equal = np.asarray(generated) == np.asarray(reference)
    matched = np.cumprod(equal, axis=1).sum(axis=1)
    k = np.arange(equal.shape[1] + 1)
    return np.minimum(k[None, :], matched[:, None]).astype(float)


def text_values(shown_texts: list[str], reference_text: str, unit: str) -> np.ndarray:
    """[L + 1] for one prompt: the value of each shown prefix's text (`shown_texts[k]`: the first k tokens
    decoded) against the real continuation, in characters or complete lines of the common prefix."""
    check_choice("value_unit", unit, VALUE_UNITS[1:])
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

    def outcome(self, signal: str, threshold: float | None) -> dict:
        """Tokens saved, value kept, precision of the shown tokens, with the rule at `threshold`."""
        shown = shown_tokens(scores(self.confidence, signal), threshold)
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
        check_choice("probe_at", probe_at, PROBE_SITES)
        probes = self.probes if probe_at == "sentences" else [p for p in self.probes if p.line_end]
        return ReasoningRun(self.chain_tokens, self.full_answer, self.answer, probes)

    def probe_scores(self, signal: str) -> list[float]:
        check_choice("signal", signal, SIGNALS[REASONING])
        out, previous = [], object()
        for p in self.probes:
            agrees = signal == "confidence" or (p.answer is not None and p.answer == previous)
            out.append(p.confidence if agrees else 0.0)
            previous = p.answer
        return out

    def stop(self, signal: str, threshold: float | None) -> tuple[float | None, int]:
        """(the answer given, the tokens spent: chain tokens generated plus every probe run). A rule that never
        stops runs no probe."""
        if threshold is None or not math.isfinite(threshold):
            return self.full_answer, self.chain_tokens
        spent = 0
        for probe, score in zip(self.probes, self.probe_scores(signal)):
            spent += probe.cost
            if score >= threshold:
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


# --------------------------------------------------------------------------- certification


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


def _ltt_over(losses: np.ndarray, grid: list[float], delta: float, epsilon: float) -> LTTResult:
    """Fixed-sequence testing in the grid's order (strict to loose: learn_then_test never sorts); the reasoning
    grid's "never" (+inf) is passed as the largest float, then the grid itself is kept as the candidates."""
    result = learn_then_test(losses, [min(g, np.finfo(float).max) for g in grid], delta, epsilon)
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
    losses = np.stack([completion_losses(sub.values, shown_tokens(scores(sub.confidence, signal), t)) for t in grid])
    ltt = _ltt_over(losses, grid, 1.0 - target, epsilon)
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
    ltt = _ltt_over(losses, grid, 1.0 - target, epsilon)
    curve = [reasoning_outcome(cal, signal, t) | {"risk": float(r), "p_value": float(p)} for t, r, p in zip(grid, ltt.risks, ltt.p_values)]
    return StopCertificate(_most_saving(ltt, curve), REASONING, signal, condition, curve)


def certify(
    workload: str, runs, grid: list[float], signal: str, target: float, epsilon: float, condition: str = "valued"
) -> StopCertificate:
    """Learn-then-Test of `grid` (strict to loose) on calibration `runs` (CompletionRuns, or a list of ReasoningRun)."""
    if workload == COMPLETION:
        return certify_completion(runs, grid, signal, target, epsilon, condition)
    return certify_reasoning(runs, grid, signal, target, epsilon, condition)


def candidate_grid(workload: str, fit_runs, signal: str) -> list[float]:
    """The candidate thresholds, from the fit units alone."""
    return completion_grid(scores(fit_runs.confidence, signal)) if workload == COMPLETION else reasoning_grid(fit_runs, signal)


def outcome(workload: str, runs, signal: str, threshold: float | None) -> dict:
    return runs.outcome(signal, threshold) if workload == COMPLETION else reasoning_outcome(runs, signal, threshold)


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


# --------------------------------------------------------------------------- obeying a rule while generating
# Token-id level and free of torch: the torch runtime (runtime/dynamic.py) and the ONNX runtime
# (exporters/onnx_runtime.py) obey a rule with these, so they take the decisions the certification simulated.

_NUMBER_PIECE = re.compile(r"^\s*[-+]?[\d.,]*\d[\d.,]*$|^\s*[-+]$")
_STEP_END = re.compile(r"(\n|[.!?:;]\s*$)")


@dataclass
class ProbeVocabulary:
    """Token ids that end a reasoning step, and ids that spell (part of) a number, with their text."""

    boundaries: frozenset[int]  # ids that end a sentence or a line
    numbers: dict[int, str]  # id -> its text (digits, sign, point, with any leading space)
    spaces: frozenset[int]  # whitespace-only ids, allowed before a number starts
    suffix: list[int]  # the forced answer continuation's ids
    line_ends: frozenset[int] = frozenset()  # the boundaries that end a line

    def sites(self, probe_at: str) -> frozenset[int]:
        return self.line_ends if probe_at == "lines" else self.boundaries

    @classmethod
    def from_tokenizer(cls, tokenizer, suffix: str) -> ProbeVocabulary:
        size = len(tokenizer)
        texts = tokenizer.batch_decode([[i] for i in range(size)])
        boundaries = frozenset(i for i, t in enumerate(texts) if _STEP_END.search(t) and not _NUMBER_PIECE.match(t))
        numbers = {i: t for i, t in enumerate(texts) if _NUMBER_PIECE.match(t)}
        spaces = frozenset(i for i, t in enumerate(texts) if t and not t.strip() and "\n" not in t)
        ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
        if not ids:
            raise DyninferError(f"the probe suffix {suffix!r} encodes to no tokens; give a non-empty one")
        if not numbers:
            raise DyninferError("the tokenizer has no token that spells a number, so no trial answer can be read")
        return cls(boundaries, numbers, spaces, list(ids), frozenset(i for i in boundaries if "\n" in texts[i]))

    def to_dict(self) -> dict:
        """JSON-ready (an exported package carries it: its runtime has no tokenizer)."""
        return {
            "boundaries": sorted(self.boundaries),
            "numbers": {str(i): t for i, t in sorted(self.numbers.items())},
            "spaces": sorted(self.spaces),
            "suffix": list(self.suffix),
            "line_ends": sorted(self.line_ends),
        }

    @classmethod
    def from_dict(cls, raw: dict) -> ProbeVocabulary:
        try:
            return cls(
                frozenset(int(i) for i in raw["boundaries"]),
                {int(i): str(t) for i, t in raw["numbers"].items()},
                frozenset(int(i) for i in raw["spaces"]),
                [int(i) for i in raw["suffix"]],
                frozenset(int(i) for i in raw.get("line_ends", ())),  # packages made before line-end rules lack it
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            raise DyninferError("the stored probe vocabulary is damaged; export the package again") from None

    def continues(self, answer_ids: list[int], token: int) -> bool:
        """Whether `token` still belongs to the answer spelled by `answer_ids` (spaces only before the number)."""
        if token in self.numbers:
            return True
        return token in self.spaces and not any(i in self.numbers for i in answer_ids)

    def answer(self, ids: list[int]) -> float | None:
        text = "".join(self.numbers.get(i, "") for i in ids).strip().replace(",", "")
        try:
            return float(text.rstrip("."))
        except ValueError:
            return None


class CompletionStopper:
    """Per step: stop before this token? (batch 1; the score as the certification computed it)."""

    def __init__(self, policy: StopPolicy):
        if policy.workload != COMPLETION:
            raise DyninferError(f"a {policy.workload} stop rule is not a completion stop rule")
        self.policy = policy
        self.running = 1.0

    def stops_before(self, confidence: float) -> bool:
        """`confidence`: the final layer's max probability of the token about to be shown."""
        self.running *= confidence
        score = self.running if self.policy.signal == "prefix" else confidence
        return self.policy.threshold is not None and score < self.policy.threshold


@dataclass
class TrialAnswer:
    ids: list[int]  # the answer's tokens (number pieces)
    generated: list[int]  # every token the probe generated
    confidence: float  # least max probability over the answer's tokens (0: no answer)
    cost: int  # suffix tokens fed + tokens generated

    def value(self, vocabulary: ProbeVocabulary) -> float | None:
        return vocabulary.answer(self.ids)


def read_answer(step_confidences: list[float], picked: list[int], vocabulary: ProbeVocabulary) -> tuple[list[int], float]:
    """The number a probe spelled (leading spaces allowed, then number pieces) and its confidence: the least max
    probability over its tokens (`step_confidences[i]`: the max probability of `picked[i]`'s distribution)."""
    ids, confidence = [], 1.0
    for step_confidence, token in zip(step_confidences, picked):
        if not vocabulary.continues(ids, token):
            break
        ids.append(token)
        confidence = min(confidence, float(step_confidence))
    if vocabulary.answer(ids) is None:
        return ids, 0.0
    return ids, confidence


@dataclass
class ReasoningStopper:
    """Per step of a chain: probe at boundaries, and stop when the rule's score crosses the threshold."""

    policy: StopPolicy
    vocabulary: ProbeVocabulary
    probes: list[tuple[int, TrialAnswer]] = field(default_factory=list)  # (chain tokens before, answer)
    record_only: bool = False  # probe every boundary and never stop (the certification's full runs)

    def __post_init__(self):
        if self.policy.workload != REASONING:
            raise DyninferError(f"a {self.policy.workload} stop rule is not a reasoning stop rule")

    def is_boundary(self, token: int) -> bool:
        """A step ends at `token` and the rule may stop there (a rule that never stops never probes)."""
        if self.record_only:  # every site of every rule
            return token in self.vocabulary.boundaries
        probing = self.policy.threshold is not None and math.isfinite(self.policy.threshold)
        return probing and token in self.vocabulary.sites(self.policy.probe_at)

    def decide(self, boundary: int, trial: TrialAnswer) -> bool:
        previous = self.probes[-1][1].value(self.vocabulary) if self.probes else None
        self.probes.append((boundary, trial))
        value = trial.value(self.vocabulary)
        if self.record_only or self.policy.threshold is None or value is None:
            return False
        if self.policy.signal == "stable" and value != previous:
            return False
        return trial.confidence >= self.policy.threshold and math.isfinite(self.policy.threshold)

    @property
    def probe_tokens(self) -> int:
        return sum(t.cost for _, t in self.probes)


def stop_summary(stop: CompletionStopper | ReasoningStopper, reason: str, shown: int) -> dict:
    """Why a generation that obeyed `stop` ended, and the decode steps it spent (`shown`: tokens it shows)."""
    out = {"reason": reason, "policy": stop.policy.describe(), "spent": shown}
    if isinstance(stop, ReasoningStopper):
        answered = len(stop.vocabulary.suffix) + len(stop.probes[-1][1].ids) if reason == "answered" else 0
        # the chain so far and every probe (the answer shown is the last probe's)
        out |= {"probes": len(stop.probes), "probe_tokens": stop.probe_tokens, "spent": shown - answered + stop.probe_tokens}
    return out

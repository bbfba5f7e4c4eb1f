"""Stop rules, obeyed: each workload's decision written once, and the stoppers both runtimes call per step.

A stop rule (core.policies.StopPolicy) skips whole tokens: the rest of a completion, or the rest of a chain of
thought. Its decision is one function per workload, used alike by the simulation the certification runs on
recorded generations (compressors/stop_simulate.py) and by the stoppers below, which the generation loop
(runtime/decoding.py) calls for the torch model and the ONNX package: so a run takes the decisions that were
certified.

- completion: a token's score is its max probability (`confidence`) or the product of those up to it
  (`prefix`); the rule stops *before* the first token scored below the threshold.
- reasoning: at a step boundary a probe forces an answer and reads it; its score is the answer's confidence
  (the least max probability over its tokens), or, for `stable`, the same only when the answer repeats the
  previous probe's. The rule stops at the first probe whose score reaches the threshold.

Token-id level and free of torch: the ONNX runtime has no tokenizer, so a package carries the probe vocabulary.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from dyninfer.core.choices import COMPLETION, REASONING, STOP_SIGNALS
from dyninfer.core.errors import DyninferError, check_choice
from dyninfer.core.policies import StopPolicy

# --------------------------------------------------------------------------- the decisions, once per workload


def completion_scores(confidence, signal: str) -> np.ndarray:
    """Per generated token (the last axis), the score the completion rule compares with its threshold."""
    confidence = np.asarray(confidence, dtype=float)
    check_choice("signal", signal, STOP_SIGNALS[COMPLETION])
    return np.cumprod(confidence, axis=-1) if signal == "prefix" else confidence


def completion_stops(score, threshold: float | None):
    """Whether a completion stops before a token with this score (elementwise on arrays): its score is below the
    threshold. A threshold of None or <= 0 never stops (no score is below 0)."""
    if threshold is None or threshold <= 0:
        return np.zeros(np.shape(score), dtype=bool) if np.ndim(score) else False
    return np.less(score, threshold) if np.ndim(score) else bool(score < threshold)


def reasoning_score(signal: str, answer: float | None, previous: float | None, confidence: float) -> float:
    """A probe's score: its answer's confidence; 0 when it read no answer, or (`stable`) when the answer is not the
    previous probe's."""
    check_choice("signal", signal, STOP_SIGNALS[REASONING])
    if answer is None or (signal == "stable" and answer != previous):
        return 0.0
    return float(confidence)


def reasoning_probes(threshold: float | None) -> bool:
    """Whether a reasoning rule probes at all: one that can never stop (no finite threshold) spends no probe."""
    return threshold is not None and math.isfinite(threshold)


def reasoning_stops(score: float, threshold: float | None) -> bool:
    """Whether the chain stops at a probe with this score: it read an answer (score > 0) and reaches the threshold."""
    return reasoning_probes(threshold) and score > 0 and score >= threshold


# --------------------------------------------------------------------------- what a probe reads

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


@dataclass
class TrialAnswer:
    ids: list[int]  # the answer's tokens (number pieces)
    generated: list[int]  # every token the probe generated
    confidence: float  # least max probability over the answer's tokens (0: no answer)
    cost: int  # suffix tokens fed + tokens generated

    def value(self, vocabulary: ProbeVocabulary) -> float | None:
        return vocabulary.answer(self.ids)


def read_answer(step_confidences: list[float], picked: list[int], vocabulary: ProbeVocabulary) -> TrialAnswer:
    """The trial answer a probe read: the number it spelled (leading spaces allowed, then number pieces) and its
    confidence, the least max probability over its tokens (`step_confidences[i]`: the max probability of
    `picked[i]`'s distribution)."""
    ids, confidence = [], 1.0
    for step_confidence, token in zip(step_confidences, picked):
        if not vocabulary.continues(ids, token):
            break
        ids.append(token)
        confidence = min(confidence, float(step_confidence))
    if vocabulary.answer(ids) is None:
        confidence = 0.0
    return TrialAnswer(ids, list(picked), confidence, len(vocabulary.suffix) + len(picked))


# --------------------------------------------------------------------------- the stoppers


class CompletionStopper:
    """Per step: stop before this token? (batch 1; the score as the certification computed it)."""

    def __init__(self, policy: StopPolicy):
        if policy.workload != COMPLETION:
            raise DyninferError(f"a {policy.workload} stop rule is not a completion stop rule")
        self.policy = policy
        self.confidences: list[float] = []

    def stops_before(self, confidence: float) -> bool:
        """`confidence`: the final layer's max probability of the token about to be shown."""
        self.confidences.append(float(confidence))
        score = completion_scores(self.confidences, self.policy.signal)[-1]
        return bool(completion_stops(score, self.policy.threshold))


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
        return reasoning_probes(self.policy.threshold) and token in self.vocabulary.sites(self.policy.probe_at)

    def decide(self, boundary: int, trial: TrialAnswer) -> bool:
        """Record the probe read after `boundary` chain tokens; whether the chain stops there."""
        previous = self.probes[-1][1].value(self.vocabulary) if self.probes else None
        self.probes.append((boundary, trial))
        score = reasoning_score(self.policy.signal, trial.value(self.vocabulary), previous, trial.confidence)
        return not self.record_only and reasoning_stops(score, self.policy.threshold)

    @property
    def probe_tokens(self) -> int:
        return sum(t.cost for _, t in self.probes)


Stopper = CompletionStopper | ReasoningStopper


def stopper_for(policy: StopPolicy, vocabulary: ProbeVocabulary | None = None) -> Stopper:
    """A fresh stopper for one generation (a stopper keeps per-generation state); reasoning needs the vocabulary."""
    if policy.workload == COMPLETION:
        return CompletionStopper(policy)
    if vocabulary is None:
        raise DyninferError("a reasoning stop rule needs its probe vocabulary")
    return ReasoningStopper(policy, vocabulary)


def stop_summary(stop: Stopper, reason: str, shown: int) -> dict:
    """Why a generation that obeyed `stop` ended, and the decode steps it spent (`shown`: tokens it shows)."""
    out = {"reason": reason, "policy": stop.policy.describe(), "spent": shown}
    if isinstance(stop, ReasoningStopper):
        answered = len(stop.vocabulary.suffix) + len(stop.probes[-1][1].ids) if reason == "answered" else 0
        # the chain so far and every probe (the answer shown is the last probe's)
        out |= {"probes": len(stop.probes), "probe_tokens": stop.probe_tokens, "spent": shown - answered + stop.probe_tokens}
    return out

"""Generation, written once for every backend: the torch dynamic model and an exported ONNX package.

A backend is a `Decoder`: it prefills prompts and runs one step on a decoding state, forks a state (a probe
reads a trial answer on a copy) and keeps some of its rows. Everything else is here, the same for both:
the budget, the end-of-sequence token, greedy or sampled picks, the exit threshold a mode runs at, stop
rules (a completion stops before a token; a chain of thought is probed at its step boundaries and answers
when the rule fires), the probes' read loop, and the result. A step's stop score (the max probability of
the distribution its token is picked from) is the decoder's: the torch model computes it with
`early_exit.confidence.max_probability`, and the package's graph outputs the same function, traced.

Numpy-level and free of torch: tokens cross the seam as int64 arrays; logits stay the backend's own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from dyninfer.compressors.stop_obey import (
    CompletionStopper,
    ProbeVocabulary,
    ReasoningStopper,
    Stopper,
    TrialAnswer,
    read_answer,
    stop_summary,
)
from dyninfer.core.errors import DyninferError, check_at_least, check_positive

BUDGET, END_OF_SEQUENCE, RULE, ANSWERED = "budget", "end of sequence", "rule", "answered"  # why a generation ended


@dataclass
class Step:
    """What one decoding step gives the loop: the greedy next token of every row, where it left, and on request
    the logits and the stop score."""

    token: np.ndarray  # [rows] int64: the argmax of each row's distribution
    exit_layer: int  # shared by the rows (the batch exits together); num_layers: every layer ran
    confidence: float | None  # the exit's confidence (the batch's least); None: no exit
    logits: Any = None  # [rows, vocab] in the backend's own array type, when asked for
    stop_score: np.ndarray | None = None  # [rows] max probability of each row's distribution, when asked for


class Decoder(Protocol):
    """A backend's decoding: only its step and what a state is."""

    num_layers: int
    notes: list[str]  # what every result of this decoder should say (a provider it fell back from)
    can_select_rows: bool  # whether `select` (and a fork of some rows) works: a batch's rows can be told apart

    def exit_threshold(self, mode: str, override: float | None = None) -> float | None:
        """The exit threshold `mode` runs at (None: exits disabled); `override` replaces the policy's."""

    def prefill(self, prompts, capacity: int, *, logits: bool, scores: bool) -> tuple[Any, Step]:
        """A state holding `prompts` [rows, n] (room for `capacity` positions) and the step after their last token."""

    def step(self, state, tokens: np.ndarray, threshold: float | None, *, logits: bool, scores: bool) -> Step:
        """Feed `tokens` [rows, k] into `state` (k > 1: at full depth) and step from the last of them."""

    def fork(self, state, rows: list[int] | None = None):
        """An independent copy of `state` (of its `rows` only) that a probe may consume; `state` goes on unchanged."""

    def select(self, state, rows: list[int]):
        """`state` reduced to `rows` (the others finished)."""

    def as_tokens(self, tokens: np.ndarray):
        """Generated token ids [rows, n] in the backend's array type."""

    def host(self, logits) -> np.ndarray:
        """Logits as a float numpy array (for sampling)."""


@dataclass
class GenerationResult:
    tokens: Any  # [batch, new tokens] in the backend's array type (a torch.Tensor, or a numpy array for ONNX)
    exit_layers: list[int]  # per generated step (shared by the batch); num_layers = no exit
    confidences: list[float | None]
    seconds: float
    mode: str
    num_layers: int
    drafted: int = 0
    accepted: int = 0
    draft_fallbacks: int = 0  # drafts the restricted draft head was unsure of, scored again with the full head
    notes: list[str] = field(default_factory=list)
    logits: list | None = None  # per step [batch, vocab], when asked for (parity checks)
    stop_scores: list | None = None  # per step [batch]: the max probability each token was picked from, when asked for
    stop: dict | None = None  # with a stop rule: why generation ended (rule, answered, budget, end of sequence), probes
    prefill_seconds: float = 0.0  # of `seconds`: the prompt's prefill (and the first token); the rest decodes

    @property
    def new_tokens(self) -> int:
        return self.tokens.shape[1]

    @property
    def tokens_per_s(self) -> float:
        count = self.tokens.shape[0] * self.tokens.shape[1]
        return count / self.seconds if self.seconds > 0 else float("inf")

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first over the time after the prefill (the first token comes with the prefill)."""
        count = self.tokens.shape[0] * (self.tokens.shape[1] - 1)
        seconds = self.seconds - self.prefill_seconds
        return count / seconds if seconds > 0 else float("inf")

    @property
    def mean_exit_layer(self) -> float:
        return sum(self.exit_layers) / max(len(self.exit_layers), 1)

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None


def finished(tokens: list[int], eos_token_id: int | None) -> bool:
    """A row's generation has produced its end-of-sequence token (it ends there)."""
    return eos_token_id is not None and eos_token_id in tokens


def probe_room(stop: Stopper | None) -> int:
    """Positions a reasoning probe may write past the chain: the forced suffix and the answer it reads."""
    return len(stop.vocabulary.suffix) + stop.policy.probe_tokens + 1 if isinstance(stop, ReasoningStopper) else 0


@dataclass
class _Rows:
    """The loop's bookkeeping: each prompt's tokens and why it ended, and which prompts the state's rows are."""

    chains: list[list[int]]
    ended: list[str | None]
    active: list[int]  # the state's rows, as prompt indices
    exit_layers: list[int] = field(default_factory=list)
    confidences: list[float | None] = field(default_factory=list)
    logits: list = field(default_factory=list)
    scores: list = field(default_factory=list)
    prefill_seconds: float = 0.0


def _pick(decoder: Decoder, step: Step, sample: bool, temperature: float, rng) -> np.ndarray:
    if not sample:
        return step.token
    scaled = decoder.host(step.logits).astype(np.float64) / max(temperature, 1e-5)
    scaled -= scaled.max(-1, keepdims=True)
    probs = np.exp(scaled)
    probs /= probs.sum(-1, keepdims=True)
    return np.array([rng.choice(probs.shape[-1], p=row) for row in probs], dtype=np.int64)


def _decode(
    decoder: Decoder,
    prompts,
    budget: int,
    threshold: float | None,
    *,
    eos_token_id: int | None,
    stoppers: list[Stopper | None],
    lockstep: bool,
    sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    logits: bool = False,
    scores: bool = False,
) -> _Rows:
    """The generation loop. `lockstep`: the rows decode together until every one has ended (each gets as many
    tokens); otherwise a row that ends leaves the batch. A completion stopper ends its row before a token its rule
    stops at; a reasoning stopper probes its row at boundaries and, when its rule fires, ends it with the forced
    answer continuation and the answer read."""
    n = prompts.shape[0]
    capacity = prompts.shape[1] + budget + max(probe_room(s) for s in stoppers)
    wants_scores = scores or any(s is not None for s in stoppers)
    started = time.perf_counter()
    state, step = decoder.prefill(prompts, capacity, logits=logits or sample, scores=wants_scores)
    rows = _Rows([[] for _ in range(n)], [None] * n, list(range(n)), prefill_seconds=time.perf_counter() - started)
    rng = np.random.default_rng(seed)
    while True:
        token = _pick(decoder, step, sample, temperature, rng)
        rows.logits += [step.logits] if logits else []
        rows.scores += [step.stop_score] if scores else []
        for i, r in enumerate(rows.active):
            if isinstance(stoppers[r], CompletionStopper) and stoppers[r].stops_before(float(step.stop_score[i])):
                rows.ended[r] = RULE
            elif rows.ended[r] is None or lockstep:
                rows.chains[r].append(int(token[i]))
                if rows.ended[r] is None and (len(rows.chains[r]) >= budget or finished(rows.chains[r], eos_token_id)):
                    rows.ended[r] = BUDGET if len(rows.chains[r]) >= budget else END_OF_SEQUENCE
        rows.exit_layers.append(step.exit_layer)
        rows.confidences.append(step.confidence)
        _probe_boundaries(decoder, state, rows, stoppers, token)
        going = [i for i, r in enumerate(rows.active) if rows.ended[r] is None]
        if not going:
            return rows
        if not lockstep and len(going) < len(rows.active):  # finished rows leave the batch
            state, token, rows.active = decoder.select(state, going), token[going], [rows.active[i] for i in going]
        step = decoder.step(state, token[:, None], threshold, logits=logits or sample, scores=wants_scores)


def _probe_boundaries(decoder: Decoder, state, rows: _Rows, stoppers: list[Stopper | None], token: np.ndarray) -> None:
    """Probe every going row whose last token ends a step; a row whose rule fires answers and ends."""
    at = [
        i
        for i, r in enumerate(rows.active)
        if rows.ended[r] is None and isinstance(stoppers[r], ReasoningStopper) and stoppers[r].is_boundary(rows.chains[r][-1])
    ]
    if not at:
        return
    first = stoppers[rows.active[at[0]]]
    fork = decoder.fork(state, None if len(at) == len(rows.active) else at)
    trials = read_trials(decoder, fork, token[at], first.vocabulary, first.policy.probe_tokens)
    for i, trial in zip(at, trials):
        r = rows.active[i]
        if stoppers[r].decide(len(rows.chains[r]), trial):
            rows.chains[r] += stoppers[r].vocabulary.suffix + trial.ids
            rows.ended[r] = ANSWERED


def read_trials(decoder: Decoder, fork, token: np.ndarray, vocabulary: ProbeVocabulary, limit: int) -> list[TrialAnswer]:
    """The probe's read loop: on `fork` (consumed), feed each row's boundary token and the forced answer
    continuation at full depth, then read the greedy answer (number pieces, at most `limit` tokens)."""
    rows = token.shape[0]
    chunk = np.concatenate([token[:, None], np.tile(np.asarray(vocabulary.suffix, dtype=np.int64), (rows, 1))], axis=1)
    step = decoder.step(fork, chunk, None, logits=False, scores=True)
    picked: list[list[int]] = [[] for _ in range(rows)]
    confidences: list[list[float]] = [[] for _ in range(rows)]
    reading = [True] * rows
    while True:
        for row in range(rows):
            if reading[row]:
                picked[row].append(int(step.token[row]))
                confidences[row].append(float(step.stop_score[row]))
                reading[row] = vocabulary.continues(picked[row][:-1], picked[row][-1]) and len(picked[row]) < limit
        if not any(reading):
            return [read_answer(confidences[row], picked[row], vocabulary) for row in range(rows)]
        # rows that have read their answer ride along (their outputs are dropped)
        step = decoder.step(fork, step.token[:, None], None, logits=False, scores=True)


def generate(
    decoder: Decoder,
    prompts,
    max_new_tokens: int = 64,
    *,
    mode: str = "early-exit",
    exit_threshold: float | None = None,
    sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    eos_token_id: int | None = None,
    stop: Stopper | None = None,
    return_logits: bool = False,
    return_scores: bool = False,
) -> GenerationResult:
    """Decode `prompts` [batch, n] (the backend's array type): every row the same number of tokens, until the budget
    or until every row has produced `eos_token_id`. `exit_threshold` replaces the policy's in the early-exit mode.
    `stop` (greedy, batch 1): obey a stop rule. `return_scores`: each step's stop scores (what stop rules score)."""
    if len(prompts.shape) != 2 or prompts.shape[1] < 1:
        raise DyninferError("the prompt is empty; give at least one token")
    check_at_least("max_new_tokens", max_new_tokens, 1)
    if sample:
        check_positive("temperature", temperature)
    if stop is not None and (sample or prompts.shape[0] != 1):
        raise DyninferError("a stop rule runs greedy decoding with one prompt at a time")
    threshold = decoder.exit_threshold(mode, exit_threshold)
    started = time.perf_counter()
    rows = _decode(
        decoder,
        prompts,
        max_new_tokens,
        threshold,
        eos_token_id=eos_token_id,
        stoppers=[stop] * prompts.shape[0],
        lockstep=True,
        sample=sample,
        temperature=temperature,
        seed=seed,
        logits=return_logits,
        scores=return_scores,
    )
    tokens = np.array(rows.chains, dtype=np.int64).reshape(prompts.shape[0], -1)
    exits, confidences = rows.exit_layers, rows.confidences
    shown = tokens.shape[1]
    if shown > len(exits):  # an answer shown after a probe: forced tokens at full depth
        exits += [decoder.num_layers] * (shown - len(exits))
        confidences += [None] * (shown - len(confidences))
    result = GenerationResult(
        decoder.as_tokens(tokens), exits[:shown], confidences[:shown], time.perf_counter() - started, mode, decoder.num_layers
    )
    result.notes = list(decoder.notes)
    result.prefill_seconds = rows.prefill_seconds
    if return_logits:
        result.logits = rows.logits
    if return_scores:
        result.stop_scores = rows.scores
    if stop is not None:
        result.stop = stop_summary(stop, rows.ended[0] or BUDGET, shown)
    return result


@dataclass
class ForcedRun:
    """A decoder teacher-forced along a continuation: the distribution it gave at each position, and where it left."""

    logits: np.ndarray  # [T, vocab] float: the distribution position t's token was predicted from
    exit_layers: list[int]  # per position (num_layers: every layer ran)


def teacher_forced(decoder: Decoder, prompt, continuation: np.ndarray, threshold: float | None) -> ForcedRun:
    """Feed `prompt` [1, n] and then `continuation`'s tokens one at a time through the decoder's step (batch 1, as
    deployed; exits at `threshold`, None: disabled), and read the distribution each position's token was predicted
    from: what the fidelity risk compares with the original model's on the same context."""
    continuation = np.asarray(continuation, dtype=np.int64).reshape(-1)
    state, step = decoder.prefill(prompt, prompt.shape[1] + continuation.size, logits=True, scores=False)
    logits, exits = [decoder.host(step.logits)[0]], [step.exit_layer]
    for token in continuation[:-1]:
        step = decoder.step(state, np.array([[token]], dtype=np.int64), threshold, logits=True, scores=False)
        logits.append(decoder.host(step.logits)[0])
        exits.append(step.exit_layer)
    return ForcedRun(np.stack(logits).astype(np.float32), exits)


def record_chains(
    decoder: Decoder, prompts, max_new_tokens: int, stoppers: list[ReasoningStopper], *, eos_token_id: int | None = None
) -> list[list[int]]:
    """Full-depth greedy chains of a batch of prompts of one length, each row probed at its step boundaries by its
    own record-only stopper, as `generate(stop=...)` probes that prompt alone: batching serves throughput only.
    Returns each row's tokens (through its end-of-sequence token, or `max_new_tokens` of them)."""
    if len(prompts.shape) != 2 or prompts.shape[1] < 1:
        raise DyninferError("the prompt is empty; give at least one token")
    check_positive("max_new_tokens", max_new_tokens)
    if len(stoppers) != prompts.shape[0] or not all(isinstance(s, ReasoningStopper) and s.record_only for s in stoppers):
        raise DyninferError("record_chains needs one record-only reasoning stopper per prompt")
    rows = _decode(decoder, prompts, max_new_tokens, None, eos_token_id=eos_token_id, stoppers=list(stoppers), lockstep=False)
    return rows.chains

"""The dynamic model: generation that leaves the network early, token by token.

Modes:
- ``full``: every token runs every layer (the same code path, exits disabled);
- ``early-exit`` (CALM): at each exit point of the policy, the confidence of the exit head
  is checked; the token leaves at the first point where every sequence in the batch is
  confident (CALM decides on the batch minimum). The skipped layers' cache entries are
  filled per the policy's KV mode:
    ``propagate``: from the exit hidden state, through each skipped layer's K/V projections
    (CALM state propagation; cheap, approximate);
    ``recompute``: left missing, and computed exactly when a later token needs that layer,
    in one batched call together with that token (FREE-style catch-up);
- ``speculative`` (LayerSkip self-speculation, lossless): draft greedily with the exit at
  one layer while it stays confident, then verify all drafts with the remaining layers in
  one pass; the output is exactly the full model's greedy output.
Every generated token records the layer it left at and its confidence.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

from dyninfer.compressors.stop_rule import CompletionStopper, ProbeVocabulary, ReasoningStopper, TrialAnswer, read_answer, stop_summary
from dyninfer.core.choices import RUN_MODES as MODES
from dyninfer.core.errors import DyninferError, check_between, check_positive
from dyninfer.core.generation import GenerationResult
from dyninfer.core.layered import LayeredModel
from dyninfer.early_exit import confidence as conf
from dyninfer.early_exit.policy import ExitPolicy
from dyninfer.early_exit.rule import batch_leaves, leaves


class DynamicModel:
    # How head-based confidences are computed from logits (the ONNX export swaps in its custom ops).
    logit_confidence = staticmethod(conf.from_logits)

    def __init__(
        self,
        lm: LayeredModel,
        policy: ExitPolicy | None,
        lens,
        classifier: conf.ExitClassifier | None = None,
        draft_vocabulary: torch.Tensor | None = None,
    ):
        self.lm = lm
        self.policy = policy
        self.lens = lens
        self.classifier = classifier
        # Speculative drafts score these token ids (a frequency prior) plus the context's own tokens, and fall
        # back to the full head when that is not confident; None: the full head always.
        self.draft_vocabulary = draft_vocabulary
        # exit point (depth) -> its row in the classifier / check order
        self._point_rows = {p: r for r, p in enumerate(policy.exit_points)} if policy is not None else {}
        if policy is not None and policy.measure == "classifier" and classifier is None:
            raise DyninferError("the policy uses the classifier measure but the artifact has no classifier; re-run calibrate")

    # -- exit heads -------------------------------------------------------------------
    def _normed(self, depth: int, hidden: torch.Tensor) -> torch.Tensor:
        if hasattr(self.lens, "translate"):
            hidden = self.lens.translate(depth, hidden)
        return self.lm.final_norm(hidden)

    def _check(self, row: int, depth: int, hidden, previous, candidates):
        """Confidence [B] and, for head measures, the exit logits (restricted to candidates if set)."""
        measure = self.policy.measure
        if measure == "saturation":
            return conf.saturation(previous, hidden), None, candidates
        if measure == "classifier":
            return self.classifier(row, self.lm.final_norm(hidden)), None, candidates
        normed = self._normed(depth, hidden)
        if candidates is not None:
            logits = self.lm.head_rows_per_row(normed, candidates)
        else:
            logits = self.lm.head(normed)
            if self.policy.vocab_top_k:
                candidates = logits.topk(self.policy.vocab_top_k, dim=-1).indices
        return self.logit_confidence(measure, logits), logits, candidates

    def _exit_logits(self, depth: int, hidden, logits, candidates):
        """Logits over the full vocabulary (or scattered back from the candidate subset)."""
        if logits is None:
            return self.lm.head(self._normed(depth, hidden))
        if logits.shape[-1] == self.lm.vocab_size:
            return logits
        full = torch.full((logits.shape[0], self.lm.vocab_size), float("-inf"), dtype=logits.dtype)
        return full.scatter(1, candidates, logits)

    # -- generation -------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = 64,
        *,
        mode: str = "early-exit",
        sample: bool = False,
        temperature: float = 1.0,
        seed: int = 0,
        eos_token_id: int | None = None,
        max_draft: int = 8,
        draft_layer: int | None = None,
        draft_threshold: float = 0.5,
        return_logits: bool = False,
        stop: CompletionStopper | ReasoningStopper | None = None,
    ) -> GenerationResult:
        if mode not in MODES:
            raise DyninferError(f"unknown mode '{mode}'; choose from: {', '.join(MODES)}")
        if input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise DyninferError("the prompt is empty; give at least one token")
        if max_new_tokens < 1:
            raise DyninferError(f"`max_new_tokens` must be at least 1, got {max_new_tokens}")
        if mode == "early-exit" and self.policy is None:  # a calibrated "never exit" policy is fine
            raise DyninferError("no early-exit policy; run `dyninfer calibrate` first, or use `mode` full or speculative")
        if sample:
            check_positive("temperature", temperature)
        if mode == "speculative":
            check_between("draft_threshold", draft_threshold, 0.0, 1.0, low_open=False, high_open=False)
            if sample:
                raise DyninferError("the lossless speculative mode is greedy; drop `sample` or use `mode` early-exit")
            if self.lm.adapter.recurrent:
                raise DyninferError(
                    "speculative decoding needs a KV cache it can roll back; Mamba's recurrent state cannot be, use `mode` early-exit"
                )
        if stop is not None and (mode == "speculative" or input_ids.shape[0] != 1):
            raise DyninferError("a stop rule runs with one prompt at a time in the full or early-exit mode, not speculative")
        generator = torch.Generator().manual_seed(seed)
        started = time.perf_counter()
        state = _DecodeState(self.lm, input_ids.shape[0])
        logits = state.prefill(input_ids)
        token = self._pick(logits, sample, temperature, generator)
        tokens, exits, confidences = [token], [self.lm.num_layers], [None]
        result = GenerationResult(torch.empty(0), exits, confidences, 0.0, mode, self.lm.num_layers)
        if return_logits:
            result.logits = [logits]
        if mode == "speculative":
            drafter = _Drafter(self, draft_layer, input_ids, tokens[0])
            self._speculate(state, tokens, exits, confidences, max_new_tokens, eos_token_id, max_draft, drafter, draft_threshold, result)
        elif stop is not None:
            self._generate_until_stop(state, logits, tokens, exits, confidences, max_new_tokens, eos_token_id, mode, stop, result)
        else:
            while len(tokens) < max_new_tokens and not _finished(tokens, eos_token_id):
                logits, depth, c = self._step(state, tokens[-1], mode)
                if return_logits:
                    result.logits.append(logits)
                tokens.append(self._pick(logits, sample, temperature, generator))
                exits.append(depth)
                confidences.append(c)
        if stop is None or result.stop["reason"] != "answered":
            del tokens[max_new_tokens:], exits[max_new_tokens:], confidences[max_new_tokens:]
        result.tokens = torch.cat(tokens, dim=1) if tokens else torch.empty((input_ids.shape[0], 0), dtype=torch.long)
        result.seconds = time.perf_counter() - started
        return result

    def _generate_until_stop(self, state, logits, tokens, exits, confidences, max_new_tokens, eos_token_id, mode, stop, result) -> None:
        """Greedy decoding that obeys a stop rule: a completion stops before its first token scored below the
        threshold; a chain of thought probes a trial answer at each step boundary and, when the rule fires,
        shows the chain so far, the forced answer continuation and the answer (then stops)."""
        reason = "budget"
        if isinstance(stop, CompletionStopper) and stop.stops_before(max_probability(logits)):
            tokens.clear(), exits.clear(), confidences.clear()
            reason = "rule"
        while reason == "budget" and len(tokens) < max_new_tokens and not _finished(tokens, eos_token_id):
            if isinstance(stop, ReasoningStopper) and stop.is_boundary(int(tokens[-1])):
                trial = self._probe(state, tokens[-1], stop.vocabulary, stop.policy.probe_tokens)
                if stop.decide(len(tokens), trial):
                    shown = stop.vocabulary.suffix + trial.ids
                    tokens += [torch.tensor([[t]]) for t in shown]
                    exits += [self.lm.num_layers] * len(shown)
                    confidences += [None] * len(shown)
                    reason = "answered"
                    break
            logits, depth, c = self._step(state, tokens[-1], mode)
            token = logits.argmax(-1, keepdim=True)
            if isinstance(stop, CompletionStopper) and stop.stops_before(max_probability(logits)):
                reason = "rule"
                break
            tokens.append(token)
            exits.append(depth)
            confidences.append(c)
        if reason == "budget" and _finished(tokens, eos_token_id):
            reason = "end of sequence"
        result.stop = stop_summary(stop, reason, len(tokens) if reason == "answered" else min(len(tokens), max_new_tokens))

    def _probe(self, state: _DecodeState, token: torch.Tensor, vocabulary: ProbeVocabulary, limit: int) -> TrialAnswer:
        """On a fork of the state: feed `token` and the forced answer continuation, then read the greedy answer."""
        return self._probe_rows(state.fork(), token, vocabulary, limit)[0]

    def _probe_rows(self, fork: _DecodeState, token: torch.Tensor, vocabulary: ProbeVocabulary, limit: int) -> list[TrialAnswer]:
        """A trial answer per row of `fork` (a state the probe may consume), after its boundary token `token` [k, 1]."""
        rows = token.shape[0]
        suffix = torch.tensor([vocabulary.suffix], dtype=token.dtype).expand(rows, -1)
        chunk = torch.cat([token, suffix], dim=1)
        if fork.complete:  # one forward for the boundary token and the whole forced continuation
            logits = fork.extend(chunk)
        else:  # recompute mode with layers still to catch up: a token at a time, as decoding does
            for t in chunk.split(1, dim=1):
                logits, _, _ = self._step(fork, t, "full")
        picked: list[list[int]] = [[] for _ in range(rows)]
        step_confidences: list[list[float]] = [[] for _ in range(rows)]
        reading = [True] * rows
        while True:
            greedy = logits.argmax(-1)
            best = torch.softmax(logits.float(), dim=-1).max(-1).values
            for row in range(rows):
                if reading[row]:
                    nxt = int(greedy[row])
                    picked[row].append(nxt)
                    step_confidences[row].append(float(best[row]))
                    reading[row] = vocabulary.continues(picked[row][:-1], nxt) and len(picked[row]) < limit
            if not any(reading):
                break
            # rows that have read their answer ride along (their outputs are dropped)
            logits, _, _ = self._step(fork, greedy[:, None], "full")
        trials = []
        for row in range(rows):
            ids, confidence = read_answer(step_confidences[row], picked[row], vocabulary)
            trials.append(TrialAnswer(ids, picked[row], confidence, len(vocabulary.suffix) + len(picked[row])))
        return trials

    @torch.no_grad()
    def record_chains(
        self, input_ids: torch.Tensor, max_new_tokens: int, stoppers: list[ReasoningStopper], *, eos_token_id: int | None = None
    ) -> list[list[int]]:
        """Full-depth greedy chains of a batch of prompts of one length, each row probed at its step boundaries by
        its own record-only stopper, as `generate(stop=...)` probes that prompt alone: batching serves throughput
        only. Returns each row's tokens (through its end-of-sequence token, or `max_new_tokens` of them)."""
        if input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise DyninferError("the prompt is empty; give at least one token")
        check_positive("max_new_tokens", max_new_tokens)
        if len(stoppers) != input_ids.shape[0] or not all(s.record_only for s in stoppers):
            raise DyninferError("record_chains needs one record-only reasoning stopper per prompt")
        state = _DecodeState(self.lm, input_ids.shape[0])
        token = state.prefill(input_ids).argmax(-1, keepdim=True)
        chains = [[int(t)] for t in token[:, 0]]
        active = list(range(input_ids.shape[0]))  # the prompt of each row of the state
        while True:
            going = [i for i, r in enumerate(active) if len(chains[r]) < max_new_tokens and chains[r][-1] != eos_token_id]
            if not going:
                return chains
            if len(going) < len(active):  # finished rows leave the batch
                keep = torch.tensor(going)
                state, token, active = state.select(keep, state.length), token[keep], [active[i] for i in going]
            boundary = [i for i, r in enumerate(active) if stoppers[r].is_boundary(chains[r][-1])]
            if boundary:
                at = torch.tensor(boundary)
                limit = stoppers[active[boundary[0]]].policy.probe_tokens
                trials = self._probe_rows(state.select(at, state.length), token[at], stoppers[active[boundary[0]]].vocabulary, limit)
                for i, trial in zip(boundary, trials):
                    stoppers[active[i]].decide(len(chains[active[i]]), trial)
            logits, _, _ = self._step(state, token, "full")
            token = logits.argmax(-1, keepdim=True)
            for i, r in enumerate(active):
                chains[r].append(int(token[i]))

    @torch.no_grad()
    def prefill_rows(self, input_ids: torch.Tensor) -> _DecodeState:
        """The prompts' prefill (full depth, the same for every policy), for `generate_rows(start=...)`."""
        if input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise DyninferError("the prompt is empty; give at least one token")
        state = _DecodeState(self.lm, input_ids.shape[0])
        state.first = state.prefill(input_ids).argmax(-1, keepdim=True)
        return state

    @torch.no_grad()
    def generate_rows(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        *,
        forced: torch.Tensor | None = None,
        start: _DecodeState | None = None,
        keep_state: bool = False,
    ) -> RowGeneration:
        """Greedy early exit over a batch in which every row decides its own exits, as it would alone.

        `generate` exits when the whole batch is confident (CALM's batch rule), so a row's output
        depends on its batch-mates; deployment at batch 1 does not. Here each row leaves at its own
        first confident point, and what its skipped layers' caches hold follows the policy's KV mode:
        ``propagate`` runs the skipped layers on the exit state (their K/V are exactly CALM's
        propagated ones; their outputs are dropped), ``recompute`` runs them on the token's own state,
        which is what recompute mode's later catch-up computes. So each row's tokens and exits are
        those of `generate` on that row alone; batching only serves throughput (calibration).

        `forced` [B, T]: teacher forcing along these tokens (the full model's continuation). Greedy
        generation equals this run up to its first difference from `forced`, so the prefix of equal
        tokens is exact; decoding stops once every row has differed, and later positions hold -1.
        `start`: these prompts' `prefill_rows`, copied instead of running the prefill again.
        `keep_state`: keep the final decoding state in the result, for `resume_rows`.
        """
        if self.policy is None:
            raise DyninferError("no early-exit policy; run `dyninfer calibrate` first")
        if input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise DyninferError("the prompt is empty; give at least one token")
        check_positive("max_new_tokens", max_new_tokens)
        if self.lm.adapter.recurrent and self.policy.kv_mode != "propagate":
            raise DyninferError("Mamba's recurrent state only supports the propagate KV mode")
        rows = input_ids.shape[0]
        state = (start or self.prefill_rows(input_ids)).fork()
        first = _RowSteps([state.first], [torch.full((rows,), self.lm.num_layers)], [self._unchecked(rows)])
        return self._decode_rows(state, first, max_new_tokens, forced, keep_state)

    @torch.no_grad()
    def resume_rows(self, previous: RowGeneration, rows: torch.Tensor, step: int) -> RowGeneration:
        """Rows of a kept `generate_rows` run (not forced), decoded again from position `step` under this policy.

        Valid when the rows' earlier positions would decide the same exits under this policy as they did
        in `previous`: their caches are then the same up to `step`, so the run goes on from there instead of
        from the prompt (calibration's candidates, nested strict to loose, share such prefixes). Returns
        the rows' whole run (positions before `step` copied), with its state kept.
        """
        if previous.state is None:
            raise DyninferError("the run to resume kept no state; generate it with keep_state=True")
        new_tokens = previous.tokens.shape[1]
        check_between("step", step, 1, new_tokens - 1, low_open=False, high_open=False)
        state = previous.state.select(rows, previous.state.length - (new_tokens - step))
        done = _RowSteps(
            list(previous.tokens[rows, :step].split(1, dim=1)),
            list(previous.exit_depth[rows, :step].unbind(1)),
            list(previous.confidence[rows, :step].unbind(1)),
        )
        return self._decode_rows(state, done, new_tokens, None, True)

    def _unchecked(self, rows: int) -> torch.Tensor:
        return torch.full((rows, len(self._point_rows)), float("nan"))

    def _decode_rows(
        self, state: _DecodeState, done: _RowSteps, max_new_tokens: int, forced: torch.Tensor | None, keep_state: bool
    ) -> RowGeneration:
        rows, num_layers = done.tokens[0].shape[0], self.lm.num_layers
        tokens, depths, confidences = done.tokens, done.depths, done.confidences
        diverged = torch.zeros(rows, dtype=torch.bool)
        while len(tokens) < max_new_tokens:
            feed = tokens[-1]
            if forced is not None:
                step = len(tokens) - 1
                diverged |= feed[:, 0] != forced[:, step]
                if bool(diverged.all()):
                    break
                feed = forced[:, step : step + 1]
            logits, depth, confidence = self._step_rows(state, feed)
            tokens.append(logits.argmax(-1, keepdim=True))
            depths.append(depth)
            confidences.append(confidence)
        out = torch.full((rows, max_new_tokens), -1, dtype=torch.long)
        exit_depth = torch.full((rows, max_new_tokens), num_layers)
        checked = torch.full((rows, max_new_tokens, len(self._point_rows)), float("nan"))
        out[:, : len(tokens)] = torch.cat(tokens, dim=1)
        exit_depth[:, : len(depths)] = torch.stack(depths, dim=1)
        checked[:, : len(confidences)] = torch.stack(confidences, dim=1)
        return RowGeneration(out, exit_depth, len(tokens), checked, state if keep_state else None)

    def _step_rows(self, state: _DecodeState, token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One decode step with per-row exits; returns (logits [B, V], exit depth [B], confidence [B, points]).

        A row's confidence is NaN at the points after the one it left at (they were not checked for it)."""
        lm, policy = self.lm, self.policy
        position = state.length
        hidden = lm.embed_at(token, position)
        rows = hidden.shape[0]
        points = self._point_rows if policy.threshold is not None else {}
        propagate = policy.kv_mode == "propagate"
        exited = torch.zeros(rows, dtype=torch.bool)
        depth = torch.full((rows,), lm.num_layers)
        exit_hidden = hidden.clone()
        logits_out = torch.empty(rows, lm.vocab_size)
        checked = self._unchecked(rows)
        candidates = None
        for index in range(lm.num_layers):
            if propagate and bool(exited.all()):  # every row has left: batch-1 propagation for the rest
                lm.propagate(index, exit_hidden, position, state.cache)
                continue
            layer_in = torch.where(exited[:, None, None], exit_hidden, hidden) if propagate else hidden
            previous, hidden = hidden, lm.layer_at(index, layer_in, position, state.cache)
            if index + 1 not in points or bool(exited.all()):
                continue
            d = index + 1
            c, logits, candidates = self._check(points[d], d, hidden[:, -1], previous[:, -1], candidates)
            checked[:, points[d]] = torch.where(exited, float("nan"), c.float())
            leaving = (~exited & leaves(c, policy.threshold)).nonzero().squeeze(1)
            if leaving.numel():
                subset = None if logits is None else logits[leaving]
                chosen = None if candidates is None else candidates[leaving]
                logits_out[leaving] = self._exit_logits(d, hidden[leaving, -1], subset, chosen).to(logits_out.dtype)
                exit_hidden[leaving] = hidden[leaving]
                depth[leaving] = d
                exited[leaving] = True
        staying = (~exited).nonzero().squeeze(1)
        if staying.numel():
            logits_out[staying] = lm.logits_from(hidden[staying, -1]).to(logits_out.dtype)
        state.length += 1
        state.filled = [state.length] * lm.num_layers
        return logits_out, depth, checked

    def _pick(self, logits, sample: bool, temperature: float, generator) -> torch.Tensor:
        if not sample:
            return logits.argmax(-1, keepdim=True)
        probs = torch.softmax(logits.float() / max(temperature, 1e-5), dim=-1)
        return torch.multinomial(probs, 1, generator=generator)

    def _step(self, state: _DecodeState, token: torch.Tensor, mode: str):
        """One decode step; returns (logits [B, V], exit depth, confidence)."""
        lm, policy = self.lm, self.policy
        position = state.length
        hidden = lm.embed_at(token, position)
        previous = hidden
        points = {} if mode == "full" or policy.threshold is None else self._point_rows
        candidates = None
        for index in range(lm.num_layers):
            previous, hidden = hidden, state.run_layer(index, hidden, position)
            depth = index + 1
            if depth in points:
                last = hidden[:, -1]
                c, logits, candidates = self._check(points[depth], depth, last, previous[:, -1], candidates)
                confidence = float(c.min())
                if bool(batch_leaves(c, policy.threshold)):  # the whole batch is confident: leave here
                    state.skip_rest(depth, hidden, position, policy.kv_mode)
                    return self._exit_logits(depth, last, logits, candidates), depth, confidence
        state.length += 1
        return lm.logits_from(hidden[:, -1]), lm.num_layers, None

    def _speculate(
        self, state, tokens, exits, confidences, max_new_tokens, eos_token_id, max_draft, drafter: _Drafter, threshold, result
    ) -> None:
        """Draft while the exit head's max probability stays >= `threshold`; verify in one pass.

        The drafts' K/V for the first `layer` layers stay in the cache: verification runs only the
        remaining layers, over every draft at once. A rejected draft's positions are cropped away.
        """
        lm, layer = self.lm, drafter.layer
        if max_draft < 1:
            raise DyninferError(f"`max_draft` must be at least 1, got {max_draft}")
        while len(tokens) < max_new_tokens and not _finished(tokens, eos_token_id):
            start = state.length
            drafts, draft_conf, hiddens = [], [], []
            token = tokens[-1]
            while True:  # draft with the first `layer` layers while the exit stays confident
                position = start + len(drafts)
                hidden = lm.embed_at(token, position)
                for index in range(layer):
                    hidden = lm.layer_at(index, hidden, position, state.cache)
                hiddens.append(hidden)
                token, c = drafter.draft(hidden[:, -1], threshold, result)
                drafts.append(token)
                draft_conf.append(c)
                if c < threshold or len(drafts) >= max_draft or len(tokens) + len(drafts) >= max_new_tokens:
                    break
            # Verify every draft with the remaining layers in one pass.
            hidden = torch.cat(hiddens, dim=1)
            for index in range(layer, lm.num_layers):
                hidden = lm.layer_at(index, hidden, start, state.cache)
            full = lm.logits_from(hidden).argmax(-1)  # [B, k]: full prediction after each input
            k = len(drafts)
            draft_ids = torch.cat(drafts, dim=1)
            agree = (draft_ids == full).all(0).tolist()
            accepted = next((i for i, ok in enumerate(agree) if not ok), k)
            result.drafted += k
            result.accepted += accepted
            for i in range(accepted):
                tokens.append(drafts[i])
                exits.append(layer)
                confidences.append(draft_conf[i])
                drafter.saw(drafts[i])
            if accepted < k:
                tokens.append(full[:, accepted : accepted + 1])
                exits.append(lm.num_layers)
                confidences.append(None)
                drafter.saw(tokens[-1])
                state.cache.crop(start + accepted + 1)
                state.length = start + accepted + 1
            else:
                state.length = start + k


class _Drafter:
    """The speculative draft head: the exit after `layer`, on a restricted vocabulary when the model has one.

    The candidates are the draft vocabulary (a frequency prior) and every token of the context so far;
    their softmax overstates the draft's confidence, so a draft under the threshold is scored again with
    the full head before drafting stops on it. Losslessness never depends on the draft.
    """

    def __init__(self, dynamic: DynamicModel, layer: int | None, prompt: torch.Tensor, first: torch.Tensor):
        lm = dynamic.lm
        self.dynamic, self.lm = dynamic, lm
        self.layer = layer or default_draft_layer(lm.num_layers)
        if not 1 <= self.layer < lm.num_layers:
            raise DyninferError(f"`draft_layer` must be between 1 and {lm.num_layers - 1}, got {self.layer}")
        self.allowed = None
        if dynamic.draft_vocabulary is not None:
            self.allowed = torch.zeros(lm.vocab_size, dtype=torch.bool)
            self.allowed[dynamic.draft_vocabulary] = True
            self.allowed[prompt.flatten().cpu()] = True
            self.allowed[first.flatten().cpu()] = True
            self._refresh()

    def _refresh(self) -> None:
        self.ids = self.allowed.nonzero().squeeze(1).to(self.lm.device)
        self.head = self.lm.head_on(self.ids)  # the candidates' weight rows, gathered once per change

    def saw(self, token: torch.Tensor) -> None:
        """A token of the output: a candidate from now on."""
        if self.allowed is not None and not bool(self.allowed[token.flatten().cpu()].all()):
            self.allowed[token.flatten().cpu()] = True
            self._refresh()

    def draft(self, hidden: torch.Tensor, threshold: float, result) -> tuple[torch.Tensor, float]:
        """(draft token [B, 1], its confidence: the batch's lowest max-probability)."""
        normed = self.dynamic._normed(self.layer, hidden)
        if self.allowed is not None:
            probs = self.head(normed).float().softmax(-1)
            best, index = probs.max(-1)
            confidence = float(best.min())
            if confidence >= threshold:
                return self.ids[index][:, None], confidence
            result.draft_fallbacks += 1
        logits = self.lm.head(normed)
        return logits.argmax(-1, keepdim=True), float(conf.from_logits("softmax", logits).min())


@dataclass
class RowGeneration:
    """`DynamicModel.generate_rows`: each row's tokens and the layer each token left at."""

    tokens: torch.Tensor  # [B, T]; -1 after a forced run stopped
    exit_depth: torch.Tensor  # [B, T]; num_layers where the token ran the full model
    steps: int  # positions decoded (T unless a forced run stopped early)
    # [B, T, exit points]: each point's confidence where it was checked, NaN where not (after the row left,
    # at the prefill's token, after a forced run stopped)
    confidence: torch.Tensor
    state: _DecodeState | None = None  # the decoding state after the last position (`keep_state`)


@dataclass
class _RowSteps:
    """The per-position outputs of a row-wise decode so far (lists of [B, 1], [B], [B, points])."""

    tokens: list[torch.Tensor]
    depths: list[torch.Tensor]
    confidences: list[torch.Tensor]


def default_draft_layer(num_layers: int) -> int:
    """LayerSkip-style drafting from about 70% of the depth: shallow drafts are rarely
    accepted on models not trained for early exit, deep ones save little (U-shaped)."""
    return min(num_layers - 1, max(1, round(0.7 * num_layers)))


def max_probability(logits: torch.Tensor) -> float:
    """The max probability of a one-row distribution (what stop rules score)."""
    return float(torch.softmax(logits.float(), dim=-1).max())


def _finished(tokens: list[torch.Tensor], eos_token_id: int | None) -> bool:
    if eos_token_id is None:
        return False
    done = torch.zeros_like(tokens[0], dtype=torch.bool)
    for t in tokens:
        done |= t == eos_token_id
    return bool(done.all())


class _DecodeState:
    """The cache and, in recompute mode, the tokens still missing from deeper layers."""

    def __init__(self, lm: LayeredModel, batch_size: int):
        self.lm = lm
        self.cache = lm.new_decoding_cache(batch_size)
        self.length = 0  # positions fully entered (every layer has them, or they are pending)
        self.filled = [0] * lm.num_layers  # positions each layer's cache holds
        self.pending: dict[int, torch.Tensor] = {}  # position -> hidden state at its current depth
        self.first: torch.Tensor | None = None  # the prefill's greedy token (`prefill_rows`)

    def fork(self) -> _DecodeState:
        """An independent copy (the cache is copied; the model is shared)."""
        other = _DecodeState.__new__(_DecodeState)
        other.lm, other.length, other.first = self.lm, self.length, self.first
        other.cache = copy.deepcopy(self.cache)
        other.filled, other.pending = list(self.filled), dict(self.pending)
        return other

    def select(self, rows: torch.Tensor, length: int) -> _DecodeState:
        """A copy holding only `rows`, with its cache cut back to the first `length` positions."""
        if self.pending or min(self.filled) < self.length:
            raise DyninferError("only a complete decoding state (every layer filled) can be cut back")
        other = _DecodeState.__new__(_DecodeState)
        other.lm, other.length, other.first = self.lm, length, None if self.first is None else self.first[rows]
        other.cache = self.lm.cache_rows(self.cache, rows, length)
        other.filled, other.pending = [length] * self.lm.num_layers, {}
        return other

    def put_rows(self, rows: torch.Tensor, other: _DecodeState) -> None:
        """Replace `rows` of this state by `other` (a state of as many rows, at the same length)."""
        if other.length != self.length:
            raise DyninferError(f"cannot put a state of length {other.length} into one of length {self.length}")
        self.lm.put_cache_rows(self.cache, rows, other.cache)

    @property
    def complete(self) -> bool:
        """Every layer holds every position entered (nothing pending)."""
        return not self.pending and min(self.filled) >= self.length

    def extend(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Enter several tokens at full depth in one forward (a complete state only); the last one's logits."""
        start = self.length
        hidden = self.lm.embed_at(input_ids, start)
        for index in range(self.lm.num_layers):
            hidden = self.lm.layer_at(index, hidden, start, self.cache)
        self.length = start + input_ids.shape[1]
        self.filled = [self.length] * self.lm.num_layers
        return self.lm.logits_from(hidden[:, -1])

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.lm.embed_at(input_ids, 0)
        for index in range(self.lm.num_layers):
            hidden = self.lm.layer_at(index, hidden, 0, self.cache)
        self.length = input_ids.shape[1]
        self.filled = [self.length] * self.lm.num_layers
        return self.lm.logits_from(hidden[:, -1])

    def run_layer(self, index: int, hidden: torch.Tensor, position: int) -> torch.Tensor:
        """Run `index` for the token at `position`, first catching up positions it lacks."""
        start = self.filled[index]
        if start < position:  # recompute mode: earlier tokens exited before this layer
            missing = [self.pending[p] for p in range(start, position)]
            out = self.lm.layer_at(index, torch.cat(missing + [hidden], dim=1), start, self.cache)
            for offset, p in enumerate(range(start, position)):
                self.pending[p] = out[:, offset : offset + 1]
            hidden = out[:, -1:]
        else:
            hidden = self.lm.layer_at(index, hidden, position, self.cache)
        self.filled[index] = position + 1
        return hidden

    def skip_rest(self, depth: int, hidden: torch.Tensor, position: int, kv_mode: str) -> None:
        if kv_mode == "propagate":
            for index in range(depth, self.lm.num_layers):
                if self.filled[index] == position:
                    self.lm.propagate(index, hidden, position, self.cache)
                    self.filled[index] = position + 1
        else:
            self.pending[position] = hidden
        # Positions every layer now holds need no catch-up any more.
        complete = min(self.filled)
        for p in [p for p in self.pending if p < complete]:
            del self.pending[p]
        self.length += 1

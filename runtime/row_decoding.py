"""Calibration's decoding: greedy early exit over a batch in which every row decides its own exits, as it would
alone, teacher-forced or continued from an earlier run (torch only; `DynamicModel` mixes it in).

`generate` exits when the whole batch is confident (CALM's batch rule), so a row's output depends on its
batch-mates; deployment at batch 1 does not. Here each row leaves at its own first confident point, and what
its skipped layers' caches hold follows the policy's KV mode: ``propagate`` runs the skipped layers on the
exit state (their K/V are exactly CALM's propagated ones; their outputs are dropped), ``recompute`` runs them
on the token's own state, which is what recompute mode's later catch-up computes. So each row's tokens and
exits are those of `generate` on that row alone; batching only serves throughput.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dyninfer.core.errors import DyninferError, check_between, check_positive
from dyninfer.early_exit.rule import leaves
from dyninfer.runtime.decode_state import DecodeState


@dataclass
class RowGeneration:
    """`generate_rows`: each row's tokens and the layer each token left at."""

    tokens: torch.Tensor  # [B, T]; -1 after a forced run stopped
    exit_depth: torch.Tensor  # [B, T]; num_layers where the token ran the full model
    steps: int  # positions decoded (T unless a forced run stopped early)
    # [B, T, exit points]: each point's confidence where it was checked, NaN where not (after the row left,
    # at the prefill's token, after a forced run stopped)
    confidence: torch.Tensor
    state: DecodeState | None = None  # the decoding state after the last position (`keep_state`)


@dataclass
class _RowSteps:
    """The per-position outputs of a row-wise decode so far (lists of [B, 1], [B], [B, points])."""

    tokens: list[torch.Tensor]
    depths: list[torch.Tensor]
    confidences: list[torch.Tensor]


class RowDecoding:
    """Per-row exits for calibration (mixed into `DynamicModel`: it reads `lm`, `policy`, `point_rows`, `check`)."""

    @torch.no_grad()
    def prefill_rows(self, input_ids: torch.Tensor) -> DecodeState:
        """The prompts' prefill (full depth, the same for every policy), for `generate_rows(start=...)`."""
        if input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise DyninferError("the prompt is empty; give at least one token")
        state = DecodeState(self.lm, input_ids.shape[0])
        state.first = state.extend(input_ids).argmax(-1, keepdim=True)
        return state

    @torch.no_grad()
    def generate_rows(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        *,
        forced: torch.Tensor | None = None,
        start: DecodeState | None = None,
        keep_state: bool = False,
    ) -> RowGeneration:
        """Greedy early exit in which every row decides its own exits (the module docstring).

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

    @torch.no_grad()
    def teacher_forced_rows(
        self, prompts: torch.Tensor, continuations: torch.Tensor, threshold: float | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row fed its continuation [B, T] after its prompt, deciding its own exits at `threshold` (None: exits
        disabled) as it would alone: (the logits each position's token was predicted from [B, T, V], the exit
        depth [B, T]). The fidelity risk's torch side; a package runs `runtime.decoding.teacher_forced`."""
        if self.policy is None:
            raise DyninferError("no early-exit policy; run `dyninfer calibrate` first")
        saved, self.policy.threshold = self.policy.threshold, threshold
        try:
            state = DecodeState(self.lm, prompts.shape[0])
            logits = [state.extend(prompts).float()]
            depths = [torch.full((prompts.shape[0],), self.lm.num_layers)]
            for t in range(continuations.shape[1] - 1):
                step, depth, _ = self._step_rows(state, continuations[:, t : t + 1])
                logits.append(step.float())
                depths.append(depth)
        finally:
            self.policy.threshold = saved
        return torch.stack(logits, dim=1), torch.stack(depths, dim=1)

    def _unchecked(self, rows: int) -> torch.Tensor:
        return torch.full((rows, len(self.point_rows)), float("nan"))

    def _decode_rows(
        self, state: DecodeState, done: _RowSteps, max_new_tokens: int, forced: torch.Tensor | None, keep_state: bool
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
        checked = torch.full((rows, max_new_tokens, len(self.point_rows)), float("nan"))
        out[:, : len(tokens)] = torch.cat(tokens, dim=1)
        exit_depth[:, : len(depths)] = torch.stack(depths, dim=1)
        checked[:, : len(confidences)] = torch.stack(confidences, dim=1)
        return RowGeneration(out, exit_depth, len(tokens), checked, state if keep_state else None)

    def _step_rows(self, state: DecodeState, token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One decode step with per-row exits; returns (logits [B, V], exit depth [B], confidence [B, points]).

        A row's confidence is NaN at the points after the one it left at (they were not checked for it)."""
        lm, policy = self.lm, self.policy
        position = state.length
        hidden = lm.embed_at(token, position)
        rows = hidden.shape[0]
        points = self.point_rows if policy.threshold is not None else {}
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
            c, logits, candidates = self.check(points[d], d, hidden[:, -1], previous[:, -1], candidates)
            checked[:, points[d]] = torch.where(exited, float("nan"), c.float())
            leaving = (~exited & leaves(c, policy.threshold)).nonzero().squeeze(1)
            if leaving.numel():
                subset = None if logits is None else logits[leaving]
                chosen = None if candidates is None else candidates[leaving]
                logits_out[leaving] = self.exit_logits(d, hidden[leaving, -1], subset, chosen).to(logits_out.dtype)
                exit_hidden[leaving] = hidden[leaving]
                depth[leaving] = d
                exited[leaving] = True
        staying = (~exited).nonzero().squeeze(1)
        if staying.numel():
            logits_out[staying] = lm.logits_from(hidden[staying, -1]).to(logits_out.dtype)
        state.length += 1
        state.filled = [state.length] * lm.num_layers
        return logits_out, depth, checked

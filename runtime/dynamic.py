"""The dynamic model: generation that leaves the network early, token by token (the torch `Decoder`).

Modes:
- ``full``: every token runs every layer (the same code path, exits disabled);
- ``early-exit`` (CALM): at each exit point of the policy, the confidence of the exit head
  is checked; the token leaves at the first point where every sequence in the batch is
  confident (CALM decides on the batch minimum). The skipped layers' cache entries are
  filled per the policy's KV mode:
    ``propagate``: from the exit hidden state, through each skipped layer's K/V projections
    (CALM state propagation; cheap, approximate);
    ``recompute``: left missing, and computed exactly when a later token needs them,
    in one batched call together with that token (FREE-style catch-up);
- ``speculative`` (LayerSkip self-speculation, lossless; runtime/self_speculation.py).
The generation loop itself (budgets, sampling, stop rules, probes) is `runtime.decoding.generate`, shared
with the ONNX package; this module is the model's step. Every generated token records the layer it left at
and its confidence. Calibration's per-row decoding is `RowDecoding` (runtime/row_decoding.py).
"""

from __future__ import annotations

import numpy as np
import torch

from dyninfer.core.choices import FULL, RUN_MODES, SPECULATIVE
from dyninfer.core.errors import DyninferError, check_between, check_choice
from dyninfer.core.layered import LayeredModel
from dyninfer.core.policies import ExitPolicy
from dyninfer.early_exit import confidence as conf
from dyninfer.early_exit.rule import batch_leaves
from dyninfer.runtime import decoding
from dyninfer.runtime.decode_state import DecodeState
from dyninfer.runtime.decoding import GenerationResult, Step
from dyninfer.runtime.row_decoding import RowDecoding
from dyninfer.runtime.self_speculation import speculative_generate


class DynamicModel(RowDecoding):
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
        self.notes: list[str] = []
        # exit point (depth) -> its row in the classifier and in the check order
        self.point_rows = {p: r for r, p in enumerate(policy.exit_points)} if policy is not None else {}
        if policy is not None and policy.measure == "classifier" and classifier is None:
            raise DyninferError("the policy uses the classifier measure but the artifact has no classifier; re-run calibrate")

    @property
    def num_layers(self) -> int:
        return self.lm.num_layers

    @property
    def can_select_rows(self) -> bool:
        """Whether rows can leave a batch (a recurrent state cannot be split by rows)."""
        return not self.lm.adapter.recurrent

    # -- exit heads -------------------------------------------------------------------
    def normed(self, depth: int, hidden: torch.Tensor) -> torch.Tensor:
        """The final norm of the hidden state at `depth`, translated by the tuned lens first when there is one."""
        if hasattr(self.lens, "translate"):
            hidden = self.lens.translate(depth, hidden)
        return self.lm.final_norm(hidden)

    def check(self, row: int, depth: int, hidden, previous, candidates):
        """Confidence [B] at exit point `row` and, for head measures, the exit logits (restricted to candidates if
        set) and the candidates the later checks score."""
        measure = self.policy.measure
        if measure == "saturation":
            return conf.saturation(previous, hidden), None, candidates
        if measure == "classifier":
            return self.classifier(row, self.lm.final_norm(hidden)), None, candidates
        normed = self.normed(depth, hidden)
        if candidates is not None:
            logits = self.lm.head_rows_per_row(normed, candidates)
        else:
            logits = self.lm.head(normed)
            if self.policy.vocab_top_k:
                candidates = logits.topk(self.policy.vocab_top_k, dim=-1).indices
        return self.logit_confidence(measure, logits), logits, candidates

    def exit_logits(self, depth: int, hidden, logits, candidates):
        """Logits over the full vocabulary at an exit (scattered back from the candidate subset)."""
        if logits is None:
            return self.lm.head(self.normed(depth, hidden))
        if logits.shape[-1] == self.lm.vocab_size:
            return logits
        full = torch.full((logits.shape[0], self.lm.vocab_size), float("-inf"), dtype=logits.dtype)
        return full.scatter(1, candidates, logits)

    # -- generation -------------------------------------------------------------------
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = 64,
        *,
        mode: str = "early-exit",
        max_draft: int = 8,
        draft_layer: int | None = None,
        draft_threshold: float = 0.5,
        **options,
    ) -> GenerationResult:
        """`runtime.decoding.generate` on this model (its options: sampling, end of sequence, a stop rule, ...), or
        lossless self-speculation in the speculative mode."""
        check_choice("mode", mode, RUN_MODES)
        if mode != SPECULATIVE:
            return decoding.generate(self, input_ids, max_new_tokens, mode=mode, **options)
        check_between("draft_threshold", draft_threshold, 0.0, 1.0, low_open=False, high_open=False)
        if options.get("sample"):
            raise DyninferError("the lossless speculative mode is greedy; drop `sample` or use `mode` early-exit")
        if options.get("stop") is not None:
            raise DyninferError("a stop rule runs with one prompt at a time in the full or early-exit mode, not speculative")
        if self.lm.adapter.recurrent:
            raise DyninferError(
                "speculative decoding needs a KV cache it can roll back; Mamba's recurrent state cannot be, use `mode` early-exit"
            )
        if input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise DyninferError("the prompt is empty; give at least one token")
        return speculative_generate(
            self,
            input_ids,
            max_new_tokens,
            eos_token_id=options.get("eos_token_id"),
            max_draft=max_draft,
            draft_layer=draft_layer,
            threshold=draft_threshold,
        )

    # -- the Decoder protocol (runtime/decoding.py) ---------------------------------------
    def exit_threshold(self, mode: str, override: float | None = None) -> float | None:
        if mode == FULL:
            return None
        if self.policy is None:  # a calibrated "never exit" policy is fine
            raise DyninferError("no early-exit policy; run `dyninfer calibrate` first, or use `mode` full or speculative")
        return override if override is not None else self.policy.threshold

    @torch.no_grad()
    def prefill(self, prompts, capacity: int, *, logits: bool, scores: bool) -> tuple[DecodeState, Step]:
        ids = self._ids(prompts)
        state = DecodeState(self.lm, ids.shape[0])
        return state, self._as_step(state.extend(ids), self.lm.num_layers, None, logits, scores)

    @torch.no_grad()
    def step(self, state: DecodeState, tokens, threshold: float | None, *, logits: bool, scores: bool) -> Step:
        ids = self._ids(tokens)
        if ids.shape[1] == 1:
            return self._as_step(*self._step(state, ids, threshold), logits, scores)
        if state.complete:  # several tokens at full depth in one forward
            return self._as_step(state.extend(ids), self.lm.num_layers, None, logits, scores)
        for token in ids.split(1, dim=1):  # recompute mode with layers still to catch up: a token at a time
            out, _, _ = self._step(state, token, None)
        return self._as_step(out, self.lm.num_layers, None, logits, scores)

    def fork(self, state: DecodeState, rows: list[int] | None = None) -> DecodeState:
        return state.fork() if rows is None else self.select(state, rows)

    def select(self, state: DecodeState, rows: list[int]) -> DecodeState:
        return state.select(torch.tensor(rows), state.length)

    def as_tokens(self, tokens: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(tokens).to(self.lm.device)

    def host(self, logits: torch.Tensor) -> np.ndarray:
        return logits.float().cpu().numpy()

    def _ids(self, tokens) -> torch.Tensor:
        ids = tokens if isinstance(tokens, torch.Tensor) else torch.from_numpy(np.asarray(tokens, dtype=np.int64))
        return ids.to(self.lm.device)

    def _as_step(self, logits: torch.Tensor, depth: int, confidence: float | None, want_logits: bool, want_scores: bool) -> Step:
        score = conf.max_probability(logits).double().cpu().numpy() if want_scores else None
        return Step(logits.argmax(-1).cpu().numpy(), depth, confidence, logits if want_logits else None, score)

    def _step(self, state: DecodeState, token: torch.Tensor, threshold: float | None):
        """One decode step; returns (logits [B, V], exit depth, confidence). None: exits disabled."""
        lm, policy = self.lm, self.policy
        position = state.length
        hidden = lm.embed_at(token, position)
        previous = hidden
        points = {} if threshold is None else self.point_rows
        candidates = None
        for index in range(lm.num_layers):
            previous, hidden = hidden, state.run_layer(index, hidden, position)
            depth = index + 1
            if depth in points:
                last = hidden[:, -1]
                c, logits, candidates = self.check(points[depth], depth, last, previous[:, -1], candidates)
                confidence = float(c.min())
                if bool(batch_leaves(c, threshold)):  # the whole batch is confident: leave here
                    state.skip_rest(depth, hidden, position, policy.kv_mode)
                    return self.exit_logits(depth, last, logits, candidates), depth, confidence
        state.length += 1
        return lm.logits_from(hidden[:, -1]), lm.num_layers, None

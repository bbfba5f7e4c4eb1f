"""LayerSkip self-speculation on the torch dynamic model (lossless): draft greedily with the exit at one layer
while it stays confident, then verify every draft with the remaining layers in one pass. The output is exactly
the full model's greedy output. Torch only: it rolls the KV cache back, which a package cannot."""

from __future__ import annotations

import time

import torch

from dyninfer.core.errors import DyninferError
from dyninfer.early_exit import confidence as conf
from dyninfer.runtime.decode_state import DecodeState
from dyninfer.runtime.decoding import GenerationResult, finished


def default_draft_layer(num_layers: int) -> int:
    """LayerSkip-style drafting from about 70% of the depth: shallow drafts are rarely
    accepted on models not trained for early exit, deep ones save little (U-shaped)."""
    return min(num_layers - 1, max(1, round(0.7 * num_layers)))


class Drafter:
    """The speculative draft head: the exit after `layer`, on a restricted vocabulary when the model has one.

    The candidates are the draft vocabulary (a frequency prior) and every token of the context so far;
    their softmax overstates the draft's confidence, so a draft under the threshold is scored again with
    the full head before drafting stops on it. Losslessness never depends on the draft.
    """

    def __init__(self, dynamic, layer: int | None, prompt: torch.Tensor, first: torch.Tensor):
        lm = dynamic.lm
        self.dynamic, self.lm = dynamic, lm
        self.layer = layer or default_draft_layer(lm.num_layers)
        if not 1 <= self.layer < lm.num_layers:
            raise DyninferError(f"`draft_layer` must be between 1 and {lm.num_layers - 1}, got {self.layer}")
        self.allowed = None
        self.fallbacks = 0  # drafts the restricted head was unsure of, scored again with the full head
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

    def draft(self, hidden: torch.Tensor, threshold: float) -> tuple[torch.Tensor, float]:
        """(draft token [B, 1], its confidence: the batch's lowest max-probability)."""
        normed = self.dynamic.normed(self.layer, hidden)
        if self.allowed is not None:
            probs = self.head(normed).float().softmax(-1)
            best, index = probs.max(-1)
            confidence = float(best.min())
            if confidence >= threshold:
                return self.ids[index][:, None], confidence
            self.fallbacks += 1
        logits = self.lm.head(normed)
        return logits.argmax(-1, keepdim=True), float(conf.max_probability(logits).min())


@torch.no_grad()
def speculative_generate(
    dynamic, input_ids: torch.Tensor, max_new_tokens: int, *, eos_token_id, max_draft: int, draft_layer: int | None, threshold: float
) -> GenerationResult:
    """Draft while the exit head's max probability stays >= `threshold`; verify in one pass.

    The drafts' K/V for the first `layer` layers stay in the cache: verification runs only the
    remaining layers, over every draft at once. A rejected draft's positions are cropped away.
    """
    if max_draft < 1:
        raise DyninferError(f"`max_draft` must be at least 1, got {max_draft}")
    lm = dynamic.lm
    started = time.perf_counter()
    state = DecodeState(lm, input_ids.shape[0])
    tokens = [state.extend(input_ids).argmax(-1, keepdim=True)]
    prefill_seconds = time.perf_counter() - started
    exits, confidences = [lm.num_layers], [None]
    drafter = Drafter(dynamic, draft_layer, input_ids, tokens[0])
    layer, drafted, accepted_total = drafter.layer, 0, 0
    while len(tokens) < max_new_tokens and not all(finished(row, eos_token_id) for row in torch.cat(tokens, 1).tolist()):
        start = state.length
        drafts, draft_conf, hiddens = [], [], []
        token = tokens[-1]
        while True:  # draft with the first `layer` layers while the exit stays confident
            position = start + len(drafts)
            hidden = lm.embed_at(token, position)
            for index in range(layer):
                hidden = lm.layer_at(index, hidden, position, state.cache)
            hiddens.append(hidden)
            token, c = drafter.draft(hidden[:, -1], threshold)
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
        agree = (torch.cat(drafts, dim=1) == full).all(0).tolist()
        accepted = next((i for i, ok in enumerate(agree) if not ok), k)
        drafted, accepted_total = drafted + k, accepted_total + accepted
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
    out = torch.cat(tokens[:max_new_tokens], dim=1)
    result = GenerationResult(
        out, exits[:max_new_tokens], confidences[:max_new_tokens], time.perf_counter() - started, "speculative", lm.num_layers
    )
    result.drafted, result.accepted, result.draft_fallbacks = drafted, accepted_total, drafter.fallbacks
    result.prefill_seconds = prefill_seconds
    return result

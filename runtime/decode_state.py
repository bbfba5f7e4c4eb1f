"""The torch dynamic model's decoding state: the KV cache and, in recompute mode, the tokens still missing from
deeper layers."""

from __future__ import annotations

import copy

import torch

from dyninfer.core.errors import DyninferError
from dyninfer.core.layered import LayeredModel


class DecodeState:
    """The cache and, in recompute mode, the tokens still missing from deeper layers."""

    def __init__(self, lm: LayeredModel, batch_size: int):
        self.lm = lm
        self.cache = lm.new_decoding_cache(batch_size)
        self.length = 0  # positions fully entered (every layer has them, or they are pending)
        self.filled = [0] * lm.num_layers  # positions each layer's cache holds
        self.pending: dict[int, torch.Tensor] = {}  # position -> hidden state at its current depth
        self.first: torch.Tensor | None = None  # the prefill's greedy token (`prefill_rows`)

    def fork(self) -> DecodeState:
        """An independent copy (the cache is copied; the model is shared)."""
        other = DecodeState.__new__(DecodeState)
        other.lm, other.length, other.first = self.lm, self.length, self.first
        other.cache = copy.deepcopy(self.cache)
        other.filled, other.pending = list(self.filled), dict(self.pending)
        return other

    def select(self, rows: torch.Tensor, length: int) -> DecodeState:
        """A copy holding only `rows`, with its cache cut back to the first `length` positions."""
        if not self.complete:
            raise DyninferError("only a complete decoding state (every layer filled) can be cut back")
        other = DecodeState.__new__(DecodeState)
        other.lm, other.length, other.first = self.lm, length, None if self.first is None else self.first[rows]
        other.cache = self.lm.cache_rows(self.cache, rows, length)
        other.filled, other.pending = [length] * self.lm.num_layers, {}
        return other

    def put_rows(self, rows: torch.Tensor, other: DecodeState) -> None:
        """Replace `rows` of this state by `other` (a state of as many rows, at the same length)."""
        if other.length != self.length:
            raise DyninferError(f"cannot put a state of length {other.length} into one of length {self.length}")
        self.lm.put_cache_rows(self.cache, rows, other.cache)

    @property
    def complete(self) -> bool:
        """Every layer holds every position entered (nothing pending)."""
        return not self.pending and min(self.filled) >= self.length

    def extend(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Enter tokens at full depth in one forward (a complete state only); the last one's logits [B, V]."""
        start = self.length
        hidden = self.lm.embed_at(input_ids, start)
        for index in range(self.lm.num_layers):
            hidden = self.lm.layer_at(index, hidden, start, self.cache)
        self.length = start + input_ids.shape[1]
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

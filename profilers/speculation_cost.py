"""The step costs self-speculation trades off, timed on this machine (`runtime.speculation` plans with them)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from dyninfer.core.layered import LayeredModel
from dyninfer.runtime.speculation import StepCosts


def _median_seconds(work: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


@torch.no_grad()
def measure_step_costs(
    lm: LayeredModel, prompt: torch.Tensor, many: int = 8, draft_vocabulary: torch.Tensor | None = None, repeats: int = 5
) -> StepCosts:
    """Time one decoder layer over 1 and `many` new positions after `prompt` [1, n] (its K/V cached), the full
    head over 1 and `many` positions, and the draft head (on `draft_vocabulary` when given). Medians of `repeats`
    runs after a warm-up."""
    prompt = prompt.to(lm.device)
    cache = lm.new_decoding_cache(1)
    hidden = lm.embed_at(prompt, 0)
    for index in range(lm.num_layers):
        hidden = lm.layer_at(index, hidden, 0, cache)
    start = prompt.shape[1]

    def decode(k: int) -> None:
        state = lm.embed_at(prompt[:, -1:].repeat(1, k), start)
        for index in range(lm.num_layers):
            state = lm.layer_at(index, state, start, cache)
        cache.crop(start)

    decode(1)  # warm-up
    one = _median_seconds(lambda: decode(1), repeats) / lm.num_layers
    several = _median_seconds(lambda: decode(many), repeats) / lm.num_layers if many > 1 else one
    last = hidden[:, -1]
    head = _median_seconds(lambda: lm.logits_from(last), repeats)
    positions = hidden[:, -1:].repeat(1, many, 1)
    head_many = _median_seconds(lambda: lm.logits_from(positions), repeats)
    draft_head = head
    if draft_vocabulary is not None:
        draft = lm.head_on(draft_vocabulary.to(lm.device))
        draft_head = _median_seconds(lambda: draft(lm.final_norm(last)).float().softmax(-1), repeats)
    return StepCosts(lm.num_layers, one, several, many, head, draft_head, head_many)

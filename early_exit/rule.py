"""The exit rule, written once: a token leaves at the first exit point whose confidence reaches the threshold.

Every place that decides or predicts an exit uses these: the torch dynamic model (`generate`'s batch
rule and `generate_rows`' per-row rule, runtime/dynamic.py), the simulation that calibration
certifies (trace.simulate) and the exported step's `ExitGate` op (exporters/ops.py).
"""

from __future__ import annotations

import torch


def leaves(confidence: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """Per row: its confidence reaches the threshold (a NaN confidence never does)."""
    return confidence >= threshold


def batch_leaves(confidence: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """CALM's batch rule: the whole batch leaves when every row is confident (its least confident row decides)."""
    return leaves(confidence.min(), threshold)


def first_exit(confidence: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """For confidences [points, tokens]: the row of the first point each token leaves at, -1 where none passes
    (and everywhere when there is no threshold or no point)."""
    points, tokens = confidence.shape
    never = torch.full((tokens,), -1)
    if threshold is None or points == 0:
        return never
    passes = leaves(confidence, threshold)
    return torch.where(passes.any(0), passes.float().argmax(0), never)

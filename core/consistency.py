"""How close a generated continuation is to the full model's, per prompt, in [0, 1].

- ``tokens``: the share of positions where the two continuations hold the same token;
- ``prefix``: the length of their common prefix over the length (one early difference costs
  everything after it);
- ``rougeL``: ROUGE-L F1 of the two token sequences (longest common subsequence), CALM's
  "textual consistency".

Calibration certifies one of these, and `bench` reports all three next to the certified bound.
"""

from __future__ import annotations

import numpy as np
import torch


def _as_rows(a) -> np.ndarray:
    array = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    return array.reshape(1, -1) if array.ndim == 1 else array


def token_share(generated, reference) -> np.ndarray:
    """Per row: the share of positions where `generated` equals `reference` ([B, T] each)."""
    g, r = _as_rows(generated), _as_rows(reference)
    return (g == r).mean(axis=1)


def prefix_share(generated, reference) -> np.ndarray:
    """Per row: the length of the common prefix over the length."""
    g, r = _as_rows(generated), _as_rows(reference)
    differ = g != r
    first = np.where(differ.any(axis=1), differ.argmax(axis=1), g.shape[1])
    return first / g.shape[1]


def _lcs_length(a: np.ndarray, b: np.ndarray) -> int:
    previous = np.zeros(len(b) + 1, dtype=np.int64)
    for x in a:
        current = np.zeros_like(previous)
        for j, y in enumerate(b, start=1):
            current[j] = previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1])
        previous = current
    return int(previous[-1])


def rouge_l(generated, reference) -> np.ndarray:
    """Per row: ROUGE-L F1 (2PR / (P + R) with P = R = LCS / length for equal lengths)."""
    g, r = _as_rows(generated), _as_rows(reference)
    out = np.empty(g.shape[0])
    for i in range(g.shape[0]):
        lcs = _lcs_length(g[i], r[i])
        precision, recall = lcs / max(len(g[i]), 1), lcs / max(len(r[i]), 1)
        out[i] = 0.0 if lcs == 0 else 2 * precision * recall / (precision + recall)
    return out


MEASURE_FUNCTIONS = {"tokens": token_share, "prefix": prefix_share, "rougeL": rouge_l}


def consistency(measure: str, generated, reference) -> np.ndarray:
    """Per-row consistency of `generated` with `reference` under `measure` (one of CONSISTENCY_MEASURES)."""
    return MEASURE_FUNCTIONS[measure](generated, reference)


def all_measures(generated, reference) -> dict[str, float]:
    """The mean of every measure over the rows."""
    return {name: float(np.mean(fn(generated, reference))) for name, fn in MEASURE_FUNCTIONS.items()}

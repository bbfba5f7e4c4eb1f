"""The per-layer exit probe: how early could each token leave the model?

For every hidden-state index (0 = embedding output, i = after decoder layer i) and each
lens it measures, on held-out tokens: top-1 agreement with the final layer, top-1
accuracy against the true next token, KL(final || layer), entropy, mean max-probability
and the expected calibration error of that max-probability. It also computes each
token's prediction depth (the first index from which the top-1 equals the final top-1 and
stays equal) and the oracle compute saving of exiting exactly there.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from dyninfer.core import distributed
from dyninfer.core.choices import LOGIT
from dyninfer.core.cost import CostModel
from dyninfer.core.distributed import World
from dyninfer.core.layered import LayeredModel
from dyninfer.core.progress import ProgressFn, silent

ECE_BINS = 15
# Full-vocabulary tensors alive at once while one layer of a token chunk is scored: the final
# distribution's probabilities, the layer's logits, log-probabilities, probabilities and one product.
_VOCAB_TENSORS = 5
DEFAULT_MEMORY_BUDGET = 256 * 2**20  # bytes for those tensors; the token chunk is sized from it


def token_chunk(vocab_size: int, budget: int = DEFAULT_MEMORY_BUDGET) -> int:
    """Tokens scored together so that the full-vocabulary float32 tensors stay within `budget` bytes."""
    return max(1, budget // (_VOCAB_TENSORS * 4 * vocab_size))


@dataclass
class _Accumulator:
    """Running sums for one lens over all hidden-state indices."""

    n_index: int
    agree: np.ndarray = None
    correct: np.ndarray = None
    kl: np.ndarray = None
    entropy: np.ndarray = None
    max_prob: np.ndarray = None
    bin_count: np.ndarray = None
    bin_conf: np.ndarray = None
    bin_correct: np.ndarray = None
    top1: list = field(default_factory=list)  # per batch: [n_index, tokens] int64

    def __post_init__(self):
        z = lambda *shape: np.zeros(shape, dtype=np.float64)
        self.agree, self.correct, self.kl = z(self.n_index), z(self.n_index), z(self.n_index)
        self.entropy, self.max_prob = z(self.n_index), z(self.n_index)
        self.bin_count = z(self.n_index, ECE_BINS)
        self.bin_conf = z(self.n_index, ECE_BINS)
        self.bin_correct = z(self.n_index, ECE_BINS)


def prediction_depth(top1: np.ndarray) -> np.ndarray:
    """First index from which each column's top-1 equals the last row's and stays equal.

    `top1` is [n_index, tokens]; the last row is the model's own prediction.
    """
    same = top1 == top1[-1:]
    # Walk back from the top: a token's depth is one past the deepest disagreement.
    disagree_from_top = np.flip(~same, axis=0)
    any_disagree = disagree_from_top.any(axis=0)
    deepest = top1.shape[0] - 1 - np.argmax(disagree_from_top, axis=0)
    return np.where(any_disagree, deepest + 1, 0)


@dataclass
class OracleSaving:
    mean_depth: float  # in decoder layers
    expected_cost: float
    full_cost: float

    @property
    def saving(self) -> float:
        return 1.0 - self.expected_cost / self.full_cost

    def to_dict(self) -> dict:
        return {
            "mean_depth": self.mean_depth,
            "expected_cost": self.expected_cost,
            "full_cost": self.full_cost,
            "saving": self.saving,
        }


def oracle_saving(depth_counts: np.ndarray, costs: CostModel, translated: bool) -> OracleSaving:
    """Expected cost of exiting every token exactly at its prediction depth."""
    total = depth_counts.sum()
    exit_costs = np.array([costs.exit_cost(d, translated) for d in range(len(depth_counts))])
    mean_depth = float((np.arange(len(depth_counts)) * depth_counts).sum() / total)
    return OracleSaving(mean_depth, float((exit_costs * depth_counts).sum() / total), costs.full_cost())


@dataclass
class ProbeResult:
    layers: pd.DataFrame  # one row per (lens, index)
    depth: pd.DataFrame  # one row per (lens, index): tokens whose prediction depth is index
    oracle: dict[str, OracleSaving]
    costs: CostModel
    n_tokens: int
    seconds: float
    forward_tokens_per_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.n_tokens / self.seconds

    def lenses(self) -> list[str]:
        return list(dict.fromkeys(self.layers["lens"]))

    def summary(self) -> dict:
        """A compact JSON-able summary (per-layer agreement per lens, depth, savings)."""
        out: dict = {"n_tokens": self.n_tokens, "lenses": {}}
        for lens in self.lenses():
            rows = self.layers[self.layers["lens"] == lens]
            depth = self.depth[self.depth["lens"] == lens]
            out["lenses"][lens] = {
                "agreement": [round(float(v), 6) for v in rows["agreement"]],
                "accuracy": [round(float(v), 6) for v in rows["accuracy"]],
                "kl": [round(float(v), 6) for v in rows["kl"]],
                "depth_fraction": [round(float(v), 6) for v in depth["fraction"]],
                "oracle": self.oracle[lens].to_dict(),
            }
        out["cost_model"] = self.costs.to_dict()
        out["throughput"] = {
            "probe_tokens_per_s": self.tokens_per_s,
            "forward_tokens_per_s": self.forward_tokens_per_s,
            "probe_seconds": self.seconds,
        }
        return out


@dataclass
class _FinalDistribution:
    """What every layer is compared with, computed once per batch."""

    probs: torch.Tensor
    neg_entropy: torch.Tensor  # sum p log p, per token
    top1: torch.Tensor

    @classmethod
    def from_logits(cls, logits: torch.Tensor) -> _FinalDistribution:
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        probs = logprobs.exp()
        return cls(probs, (probs * logprobs).sum(-1), logprobs.argmax(-1))


def _update(acc: _Accumulator, index: int, logits: torch.Tensor, final: _FinalDistribution, targets):
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    probs = logprobs.exp()
    max_prob, top1 = probs.max(dim=-1)
    acc.top1[-1][index] = top1.cpu().numpy()
    correct = top1 == targets
    # KL(final || layer) = sum p_f log p_f - sum p_f log p_layer
    kl = final.neg_entropy - torch.linalg.vecdot(final.probs, logprobs)
    acc.agree[index] += (top1 == final.top1).sum().item()
    acc.correct[index] += correct.sum().item()
    acc.kl[index] += kl.sum().item()
    acc.entropy[index] += (-torch.linalg.vecdot(probs, logprobs)).sum().item()
    acc.max_prob[index] += max_prob.sum().item()
    conf, hit = max_prob.double().cpu().numpy(), correct.double().cpu().numpy()
    bins = np.minimum((conf * ECE_BINS).astype(int), ECE_BINS - 1)
    acc.bin_count[index] += np.bincount(bins, minlength=ECE_BINS)
    acc.bin_conf[index] += np.bincount(bins, weights=conf, minlength=ECE_BINS)
    acc.bin_correct[index] += np.bincount(bins, weights=hit, minlength=ECE_BINS)


@torch.no_grad()
def _time_plain_forward(model: torch.nn.Module, windows: torch.Tensor, batch_size: int) -> float:
    started = time.perf_counter()
    for start in range(0, windows.shape[0], batch_size):
        model(windows[start : start + batch_size, :-1].to(model.device), use_cache=False)
    return windows.shape[0] * (windows.shape[1] - 1) / (time.perf_counter() - started)


def _lens_rows(kind: str, acc: _Accumulator, n_tokens: int, world: World) -> tuple[list[dict], list[dict], np.ndarray]:
    """One lens's rows over all ranks: per index its metrics and its prediction-depth share, and the depth counts.

    `acc`'s sums are all-reduced in place first, so every rank reports over every rank's tokens."""
    layer_rows, depth_rows = [], []
    for name in ("agree", "correct", "kl", "entropy", "max_prob", "bin_count", "bin_conf", "bin_correct"):
        setattr(acc, name, world.sum(getattr(acc, name)))
    n = float(n_tokens)
    occupied = acc.bin_count > 0
    gap = np.abs(acc.bin_correct - acc.bin_conf)  # |sum correct - sum conf| per bin = n_b * |acc_b - conf_b|
    ece = np.where(occupied, gap, 0.0).sum(axis=1) / n
    depth = prediction_depth(np.concatenate(acc.top1, axis=1))
    counts = world.sum(np.bincount(depth, minlength=acc.n_index)).astype(np.int64)
    cumulative = np.cumsum(counts) / n
    for index in range(acc.n_index):
        layer_rows.append(
            {
                "lens": kind,
                "layer": index,
                "name": "embed" if index == 0 else f"layer {index}",
                "agreement": acc.agree[index] / n,
                "accuracy": acc.correct[index] / n,
                "kl": acc.kl[index] / n,
                "entropy": acc.entropy[index] / n,
                "max_prob": acc.max_prob[index] / n,
                "ece": ece[index],
                "exit_fraction": counts[index] / n,
                "can_exit_by": cumulative[index],
            }
        )
        depth_rows.append({"lens": kind, "layer": index, "tokens": int(counts[index]), "fraction": counts[index] / n})
    return layer_rows, depth_rows, counts


@torch.no_grad()
def run_probe(
    lm: LayeredModel,
    windows: torch.Tensor,
    lenses: Sequence,
    costs: CostModel,
    *,
    batch_size: int = 2,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: ProgressFn | None = None,
    world: World = World(),
) -> ProbeResult:
    """Probe `windows` ([n, seq_len + 1] token ids) with each lens in `lenses`.

    No tensor spans layers × tokens × vocabulary: each layer's distribution is scored on chunks of
    tokens sized so that the full-vocabulary tensors fit `memory_budget` bytes. Peak memory above
    the weights is the hidden states of one batch plus that budget, whatever the vocabulary.

    In a data-parallel run each rank passes its shard of the windows; the sums, the ECE bins and
    the prediction-depth counts are all-reduced, so every rank returns the result over all of them.
    """
    report = progress or silent
    n_index = lm.num_layers + 1
    accs = {lens.kind: _Accumulator(n_index) for lens in lenses}
    n_batches = (windows.shape[0] + batch_size - 1) // batch_size
    n_tokens = 0
    started = time.perf_counter()
    report("probing layers", 0, n_batches)
    for b, start in enumerate(range(0, windows.shape[0], batch_size)):
        batch = windows[start : start + batch_size].to(lm.device)
        inputs, targets = batch[:, :-1], batch[:, 1:].reshape(-1)
        states = [h.reshape(-1, h.shape[-1]) for _, h in lm.hidden_states(inputs)]
        n_tokens += targets.numel()
        chunk = token_chunk(lm.vocab_size, memory_budget)
        for lo in range(0, targets.numel(), chunk):
            hi = min(lo + chunk, targets.numel())
            final = _FinalDistribution.from_logits(lm.logits_from(states[-1][lo:hi]))
            for lens in lenses:
                acc = accs[lens.kind]
                acc.top1.append(np.zeros((n_index, hi - lo), dtype=np.int64))
                for index, hidden in enumerate(states):
                    _update(acc, index, lens.logits(index, hidden[lo:hi]), final, targets[lo:hi])
            del final
        report("probing layers", b + 1, n_batches)
    seconds = time.perf_counter() - started
    report("timing the plain forward", 0, 1)
    forward_tps = world.sum(_time_plain_forward(lm.model, windows, batch_size))  # ranks run side by side
    report("timing the plain forward", 1, 1)
    n_tokens, seconds = int(world.sum(n_tokens)), world.max(seconds)

    layer_rows, depth_rows, oracle = [], [], {}
    for kind, acc in accs.items():
        lens_layers, lens_depths, counts = _lens_rows(kind, acc, n_tokens, world)
        layer_rows += lens_layers
        depth_rows += lens_depths
        oracle[kind] = oracle_saving(counts, costs, translated=kind != LOGIT)
    return ProbeResult(
        layers=pd.DataFrame(layer_rows),
        depth=pd.DataFrame(depth_rows),
        oracle=oracle,
        costs=costs,
        n_tokens=n_tokens,
        seconds=seconds,
        forward_tokens_per_s=forward_tps,
    )


@torch.no_grad()
def heldout_quality(lm: LayeredModel, windows: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(perplexity, argmax prediction per position, window-major) of the model's own forward on `windows`.

    Data-parallel: each rank evaluates its share of the windows; the sums and predictions are combined.
    """
    world = distributed.current()
    nll, count, argmax = 0.0, 0, []
    for window in windows[world.shard(windows.shape[0], "held-out windows")]:
        logits = lm.model(window[None, :-1].to(lm.device), use_cache=False).logits[0].float()
        nll += float(F.cross_entropy(logits, window[1:].to(lm.device), reduction="sum"))
        count += window.shape[0] - 1
        argmax.append(logits.argmax(-1).cpu())
    nll, count = world.sum(np.array([nll, count], dtype=np.float64)).tolist()
    return math.exp(nll / count), world.gather_window_columns(torch.cat(argmax), windows.shape[0], dim=0)

"""Dense vs sparse speed of a pruned model, side by side in one run (batch-1 decoding).

Two measurements, each interleaving dense and sparse so that load changes hit both alike:

- the MLP block: every layer's MLP on one real decoding token, dense module vs `SparseMLP`
  (which reads only active rows through the sparse kernels); median over rounds;
- end-to-end decoding: greedy generation from held-out prompts, the dense model vs the
  same model with its MLPs replaced, tokens/s and token agreement.

Masked-dense (multiply by zero) is never timed here: it cannot be faster than dense.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from dyninfer.compressors.pruning import PruningPlan, dense_inside, pruned, resolve_backend, sparse_modules
from dyninfer.core.layered import LayeredModel
from dyninfer.core.progress import ProgressFn
from dyninfer.profilers.bench import greedy_generate


@dataclass
class SpeedResult:
    mlp_dense_ms: float  # all layers' MLPs for one token
    mlp_sparse_ms: float
    decode_dense_tok_s: float
    decode_sparse_tok_s: float
    decode_agreement: float  # sparse greedy tokens equal to the dense ones, position by position
    backend: str

    @property
    def mlp_speedup(self) -> float:
        return self.mlp_dense_ms / self.mlp_sparse_ms

    @property
    def decode_speedup(self) -> float:
        return self.decode_sparse_tok_s / self.decode_dense_tok_s

    def to_dict(self) -> dict:
        return {
            "mlp_dense_ms": self.mlp_dense_ms,
            "mlp_sparse_ms": self.mlp_sparse_ms,
            "mlp_speedup": self.mlp_speedup,
            "decode_dense_tok_s": self.decode_dense_tok_s,
            "decode_sparse_tok_s": self.decode_sparse_tok_s,
            "decode_speedup": self.decode_speedup,
            "decode_agreement": self.decode_agreement,
            "backend": self.backend,
        }


def _sweep_seconds(modules, inputs) -> float:
    started = time.perf_counter()
    for module, x in zip(modules, inputs):
        module(x)
    return time.perf_counter() - started


@torch.inference_mode()
def time_mlp_blocks(
    lm: LayeredModel, plan: PruningPlan, inputs: list[torch.Tensor], *, rounds: int = 30, backend: str = "auto"
) -> tuple[float, float]:
    """Median ms of all layers' MLPs on one token each (`inputs[i]`: [1, 1, d]), dense and sparse."""
    with pruned(lm, plan, backend):
        sparse = sparse_modules(lm)
        dense = [m.dense for m in sparse]
        for _ in range(3):  # warm-up: kernel compilation, weight layouts, caches
            _sweep_seconds(dense, inputs)
            _sweep_seconds(sparse, inputs)
        dense_s, sparse_s = [], []
        for _ in range(rounds):
            dense_s.append(_sweep_seconds(dense, inputs))
            sparse_s.append(_sweep_seconds(sparse, inputs))
    return statistics.median(dense_s) * 1e3, statistics.median(sparse_s) * 1e3


@torch.inference_mode()
def time_decode(
    lm: LayeredModel,
    plan: PruningPlan,
    prompts: torch.Tensor,
    new_tokens: int,
    *,
    backend: str = "auto",
    progress: ProgressFn | None = None,
) -> tuple[float, float, float]:
    """(dense tok/s, sparse tok/s, agreement) of greedy decoding, prompt by prompt, interleaved."""
    model = lm.model
    warm = prompts[:1, : min(8, prompts.shape[1])]
    dense_s = sparse_s = 0.0
    same = total = 0
    # Installed once: the kernels' weight layouts are built on the first decoding step (the
    # warm-up), not inside a timed prompt; the dense runs take the masks out around them.
    with pruned(lm, plan, backend):
        greedy_generate(model, warm, 2)
        with dense_inside(lm):
            greedy_generate(model, warm, 2)
        for i in range(prompts.shape[0]):
            prompt = prompts[i : i + 1]
            with dense_inside(lm):
                started = time.perf_counter()
                dense_out = greedy_generate(model, prompt, new_tokens)
                dense_s += time.perf_counter() - started
            started = time.perf_counter()
            sparse_out = greedy_generate(model, prompt, new_tokens)
            sparse_s += time.perf_counter() - started
            same += int((dense_out == sparse_out).sum())
            total += dense_out.numel()
            if progress:
                progress("timing decode (dense vs sparse)", i + 1, prompts.shape[0])
    return total / dense_s, total / sparse_s, same / total


def measure_speed(
    lm: LayeredModel,
    plan: PruningPlan,
    mlp_inputs: list[torch.Tensor],
    prompts: torch.Tensor,
    new_tokens: int,
    *,
    backend: str = "auto",
    rounds: int = 30,
    progress: ProgressFn | None = None,
) -> SpeedResult:
    dense_ms, sparse_ms = time_mlp_blocks(lm, plan, mlp_inputs, rounds=rounds, backend=backend)
    dense_tps, sparse_tps, agreement = time_decode(lm, plan, prompts, new_tokens, backend=backend, progress=progress)
    return SpeedResult(dense_ms, sparse_ms, dense_tps, sparse_tps, agreement, resolved_backend(lm, backend))


def resolved_backend(lm: LayeredModel, backend: str) -> str:
    """The kernel family `backend` resolves to on this model's device and dtype."""
    return resolve_backend(backend, lm.device, lm.lm_head.weight.dtype)

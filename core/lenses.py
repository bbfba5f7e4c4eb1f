"""Exit heads: read a next-token distribution off any layer's hidden state.

- Logit lens: the model's own final norm and LM head, applied to an intermediate layer.
- Tuned lens (Belrose et al., tuned-lens): one affine translator per layer,
  h -> h + A_l h + b_l, then the final norm and head; trained to minimise
  KL(final || lens). We initialise A_l, b_l by least squares from layer l's residual
  stream to the last layer's (Din et al., "Jump to Conclusions"), which gets most of the
  gain in closed form, and then refine with the KL objective. On 2 CPU cores this matters:
  full-vocabulary KL steps through a 49k-token head are the expensive part.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from dyninfer.core import distributed
from dyninfer.core.choices import LOGIT, TUNED
from dyninfer.core.errors import DyninferError
from dyninfer.core.layered import LayeredModel
from dyninfer.core.progress import ProgressFn, silent

_WEIGHT = "tuned_lens.weight"
_BIAS = "tuned_lens.bias"


class LogitLens:
    kind = LOGIT

    def __init__(self, lm: LayeredModel):
        self.lm = lm

    def logits(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm.logits_from(hidden)


class TunedLens(nn.Module):
    """Affine translators for hidden-state indices 0..L-1 (index L is the model's output).

    The translators are float32 whatever the model's dtype (master weights for training, and a
    translation computed in float32); the translated state goes to the head in the model's dtype.
    """

    kind = TUNED

    def __init__(self, lm: LayeredModel):
        super().__init__()
        self.lm = lm
        n, d = lm.num_layers, lm.hidden_size
        self.weight = nn.Parameter(torch.zeros(n, d, d, dtype=torch.float32, device=lm.device))
        self.bias = nn.Parameter(torch.zeros(n, d, dtype=torch.float32, device=lm.device))

    def translate(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        if index >= self.lm.num_layers:
            return hidden
        x = hidden.float()
        return (x + x @ self.weight[index].T + self.bias[index]).to(hidden.dtype)

    def logits(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm.logits_from(self.translate(index, hidden))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {_WEIGHT: self.weight.detach().cpu().contiguous(), _BIAS: self.bias.detach().cpu().contiguous()}

    @classmethod
    def from_tensors(cls, lm: LayeredModel, tensors: dict[str, torch.Tensor]) -> TunedLens:
        lens = cls(lm)
        if _WEIGHT not in tensors or _BIAS not in tensors:
            raise DyninferError("the artifact has no tuned lens; train one into it with `dyninfer probe` (tuned lens) first")
        w, b = tensors[_WEIGHT], tensors[_BIAS]
        if tuple(w.shape) != tuple(lens.weight.shape) or tuple(b.shape) != tuple(lens.bias.shape):
            raise DyninferError(
                f"the artifact's tuned lens has shape {tuple(w.shape)}, this model needs {tuple(lens.weight.shape)}; "
                "it was trained for another model"
            )
        with torch.no_grad():
            lens.weight.copy_(w)
            lens.bias.copy_(b)
        return lens


class ExitTranslators(nn.Module):
    """A tuned lens's translators at a few hidden-state indices only (an exported package's exit points).

    Each is stored as its own transposed matrix, so an exported graph keeps only these (not all L stacked,
    40 MB in float32 for a 30-layer, 576-wide model) and the weight quantizer sees a MatMul on a constant.
    Translates exactly as the lens does at those indices.
    """

    kind = TUNED

    def __init__(self, lens: TunedLens, indices):
        super().__init__()
        self.lm = lens.lm
        kept = sorted({int(i) for i in indices if i < lens.lm.num_layers})
        self.rows = {index: row for row, index in enumerate(kept)}
        self.weights = nn.ParameterList([nn.Parameter(lens.weight[i].detach().T.contiguous()) for i in kept])
        self.biases = nn.ParameterList([nn.Parameter(lens.bias[i].detach().clone()) for i in kept])

    def translate(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        if index >= self.lm.num_layers:
            return hidden
        row = self.rows[index]
        x = hidden.float()
        return (x + x @ self.weights[row] + self.biases[row]).to(hidden.dtype)

    def logits(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm.logits_from(self.translate(index, hidden))


@dataclass
class TunedLensTraining:
    """How the tuned lens was trained, and how well (recorded in the artifact)."""

    train_tokens: int
    validation_tokens: int
    steps: int
    tokens_per_step: int
    vocab_top_k: int
    lr: float
    seed: int
    init: str
    seconds: float = 0.0
    # Mean KL(final || lens) per layer on the validation tokens. Since #28 `kl_init` and `kl_refined` are the
    # training objective's KL (restricted to each chunk's top-k candidates, `mean_subset_kl_per_layer`), and
    # `kl_logit` is no longer computed: the probe reports both lenses' full-vocabulary KL on held-out text.
    kl_logit: list[float] = field(default_factory=list)
    kl_init: list[float] = field(default_factory=list)
    kl_refined: list[float] = field(default_factory=list)
    kept_refined: list[bool] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def local_hidden_states(lm: LayeredModel, windows: torch.Tensor, batch_size: int = 4, first: int = 0) -> torch.Tensor:
    """Hidden states [L+1, N, d] of this process's `windows` (inputs = w[:, :-1]) from position `first` on."""
    chunks = []
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size, :-1].to(lm.device)
        chunks.append(torch.stack([h[:, first:].reshape(-1, h.shape[-1]) for _, h in lm.hidden_states(ids)]))
    return torch.cat(chunks, dim=1)


@torch.no_grad()
def collect_hidden_states(lm: LayeredModel, windows: torch.Tensor, batch_size: int = 4, first: int = 0) -> torch.Tensor:
    """Hidden states [L+1, N, d] for every input position of `windows` from `first` on.

    In a data-parallel run each rank runs the model on its share of the windows and every rank
    gets all the states, in window order.
    """
    world = distributed.current()
    if world.size == 1:
        return local_hidden_states(lm, windows, batch_size, first)
    own = local_hidden_states(lm, windows[world.shard(windows.shape[0], "windows")], batch_size, first)
    return world.gather_window_columns(own.cpu(), windows.shape[0]).to(lm.device)


def kl_final_vs(lens_logits: torch.Tensor, final_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL(final || lens) from lens logits and final log-probabilities."""
    logq = torch.log_softmax(lens_logits.float(), dim=-1)
    return (final_logprobs.exp() * (final_logprobs - logq)).sum(-1)


@torch.no_grad()
def _least_squares_init(lens: TunedLens, states: torch.Tensor, ridge: float = 1e-3) -> None:
    """Fit h_l -> h_L affinely (closed form, ridge-regularised), stored as a residual map."""
    target = states[-1].double()
    for index in range(lens.lm.num_layers):
        x = states[index].double()
        x1 = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)
        gram = x1.T @ x1
        gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        solution = torch.linalg.solve(gram, x1.T @ target)  # [(d+1), d]
        a, b = solution[:-1].T, solution[-1]
        lens.weight[index].copy_((a - torch.eye(a.shape[0], dtype=a.dtype, device=a.device)).to(lens.weight.dtype))
        lens.bias[index].copy_(b.to(lens.bias.dtype))


@torch.no_grad()
def mean_kl_per_layer(lens, lm: LayeredModel, states: torch.Tensor, chunk: int = 512) -> list[float]:
    """Mean full-vocabulary KL(final || lens) for each hidden-state index (chunks shared among the ranks)."""
    n, world = states.shape[1], distributed.current()
    totals = torch.zeros(lm.num_layers + 1, dtype=torch.float64)
    for start in list(range(0, n, chunk))[world.rank :: world.size]:
        block = states[:, start : start + chunk]
        final = torch.log_softmax(lm.logits_from(block[-1]).float(), dim=-1)
        for index in range(lm.num_layers + 1):
            totals[index] += kl_final_vs(lens.logits(index, block[index]), final).sum().item()
    return (torch.as_tensor(world.sum(totals.numpy())) / n).tolist()


@torch.no_grad()
def mean_subset_kl_per_layer(lens: TunedLens, lm: LayeredModel, states: torch.Tensor, top_k: int, chunk: int = 128) -> list[float]:
    """Mean KL(final || lens) per layer restricted to each chunk's candidate tokens: the objective the lens trains
    on (`_subset_kl_step`), out of sample. Scores the full head once per token (the final layer), not at every
    layer: on a 262k vocabulary the full-vocabulary KL at every layer costs minutes."""
    n, world = states.shape[1], distributed.current()
    totals = torch.zeros(lm.num_layers, dtype=torch.float64)
    for start in list(range(0, n, chunk))[world.rank :: world.size]:
        block = states[:, start : start + chunk]
        final_logits = lm.logits_from(block[-1]).float()
        candidates = torch.unique(final_logits.topk(min(top_k, lm.vocab_size), dim=-1).indices)
        final = torch.log_softmax(final_logits[:, candidates], dim=-1)
        for index in range(lm.num_layers):
            normed = lm.final_norm(lens.translate(index, block[index]))
            totals[index] += kl_final_vs(lm.head_rows(normed, candidates), final).sum().item()
    return (torch.as_tensor(world.sum(totals.numpy())) / n).tolist()


def _subset_kl_step(lens: TunedLens, lm: LayeredModel, batch: torch.Tensor, top_k: int) -> None:
    """Accumulate gradients of KL(final || lens), both restricted to the batch's candidate tokens.

    The candidates are the union of each token's top-k under the final distribution; that
    holds nearly all the final probability mass and costs a fraction of the full head.

    Data-parallel (DDP's scheme): each rank takes every size-th token of the batch, the candidates
    are the union over all ranks, each rank's loss is its tokens' share of the batch mean, and the
    gradients are summed, so every rank takes the step one process would.
    """
    world = distributed.current()
    n = batch.shape[1]
    batch = batch[:, world.rank :: world.size]
    with torch.no_grad():
        final_logits = lm.logits_from(batch[-1]).float()
        candidates = world.union(torch.unique(final_logits.topk(top_k, dim=-1).indices))
        final = torch.log_softmax(final_logits[:, candidates], dim=-1)
    for index in range(lm.num_layers):  # one backward per layer: one small graph alive at a time
        normed = lm.final_norm(lens.translate(index, batch[index]))
        loss = kl_final_vs(lm.head_rows(normed, candidates), final).sum() / (n * lm.num_layers)
        loss.backward()
    world.sum_gradients(lens.parameters())


def train_tuned_lens(
    lm: LayeredModel,
    windows: torch.Tensor,
    *,
    steps: int = 60,
    tokens_per_step: int = 128,
    vocab_top_k: int = 64,
    lr: float = 1e-4,
    validation_tokens: int = 512,
    seed: int = 0,
    init: str = "least-squares",
    progress: ProgressFn | None = None,
) -> tuple[TunedLens, TunedLensTraining]:
    """Train a tuned lens on token windows of the training split.

    The last `validation_tokens` positions are kept aside; per layer, the KL-refined
    translator replaces the initial one only if it lowers the validation KL (the training objective, out of sample).
    """
    if steps < 0 or tokens_per_step < 1 or vocab_top_k < 1:
        raise DyninferError("tuned-lens steps must be >= 0, tokens per step and top-k >= 1")
    if init not in ("least-squares", "identity"):
        raise DyninferError(f"unknown tuned-lens init '{init}'; use least-squares or identity")
    started = time.perf_counter()
    for p in lm.model.parameters():
        p.requires_grad_(False)
    report = progress or silent
    report("tuned lens: hidden states", 0, 1)
    states = collect_hidden_states(lm, windows)
    report("tuned lens: hidden states", 1, 1)
    n_val = min(validation_tokens, states.shape[1] // 4)
    fit, val = states[:, : states.shape[1] - n_val], states[:, states.shape[1] - n_val :]
    if fit.shape[1] < 2 * lm.hidden_size:
        raise DyninferError(
            f"too little data to train a tuned lens: {fit.shape[1]} tokens for a {lm.hidden_size}-wide model; "
            "raise `lens_train_tokens` or use more data"
        )
    lens = TunedLens(lm)
    record = TunedLensTraining(fit.shape[1], n_val, steps, tokens_per_step, vocab_top_k, lr, seed, init)
    if init == "least-squares":
        _least_squares_init(lens, fit)
    report("tuned lens: validation KL before training", 0, 1)
    with torch.no_grad():
        record.kl_init = mean_subset_kl_per_layer(lens, lm, val, vocab_top_k)
    report("tuned lens: validation KL before training", 1, 1)
    initial = {k: v.detach().clone() for k, v in lens.state_dict().items()}

    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(lens.parameters(), lr=lr)
    report("tuned lens: KL steps", 0, steps)
    for step in range(steps):
        pick = torch.randint(0, fit.shape[1], (min(tokens_per_step, fit.shape[1]),), generator=generator)
        optimiser.zero_grad(set_to_none=True)
        _subset_kl_step(lens, lm, fit[:, pick], vocab_top_k)
        optimiser.step()
        report("tuned lens: KL steps", step + 1, steps)

    with torch.no_grad():
        report("tuned lens: validation KL after training", 0, 1)
        record.kl_refined = mean_subset_kl_per_layer(lens, lm, val, vocab_top_k) if steps else list(record.kl_init)
        report("tuned lens: validation KL after training", 1, 1)
        for index in range(lm.num_layers):
            keep = record.kl_refined[index] <= record.kl_init[index]
            record.kept_refined.append(bool(keep))
            if not keep:
                lens.weight[index].copy_(initial["weight"][index])
                lens.bias[index].copy_(initial["bias"][index])
    record.seconds = time.perf_counter() - started
    lens.eval()
    return lens, record

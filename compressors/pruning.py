"""Per-token dynamic MLP pruning: each token uses only the MLP neurons it needs.

Both methods give every neuron of a layer a score per token and keep the neurons whose
score exceeds the layer's threshold. Thresholds are quantiles of the scores on calibration
data, so each layer reaches its target sparsity on text like the calibration text.

- `threshold` (TEAL / CATS, training-free): the score is |h|, the magnitude of the MLP's
  activation h = act(gate x) * up x (the down projection's input). Optionally the MLP input x
  is sparsified too (TEAL's input sparsity for gate/up), so gate and up skip weight rows.
  Thresholding |act(gate x)| (CATS) was measured here and cost 10x more perplexity than |h|
  at the same sparsity on SmolLM2-135M (+29% against +3.3% at 50%; docs/prune.md), so |h| is the criterion.
- `predictor` (Deja Vu / FTWT): a low-rank predictor reads the MLP input and scores the
  neurons before any of them is computed, so gate, up and down all skip inactive neurons.
  It is trained self-supervised on the neurons that contribute most to the token's MLP output,
  |h_j| * ||down[:, j]|| (top-k, or FTWT's top mass), with class-weighted BCE, each term also
  weighted by that contribution.

`SparseMLP` replaces a layer's MLP. Decoding one token (batch 1) takes the sparse kernels
(`kernels/`), which read only the weight rows of active neurons/inputs; anything else
(prefill, batches, export tracing) takes the masked-dense path, which computes the same
function with standard ops. This module holds the plan and the installed masks; calibrating the
thresholds and training the predictors is `pruning_calibration`'s.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dyninfer.core.adapters import MlpWeights
from dyninfer.core.choices import PRUNE_BACKENDS as BACKENDS
from dyninfer.core.choices import PRUNE_METHODS as METHODS
from dyninfer.core.errors import DyninferError, is_number
from dyninfer.core.layered import LayeredModel
from dyninfer.core.records import PruneRecord
from dyninfer.core.stages import MASKS_GROUP
from dyninfer.kernels.cpu_sparse_mlp import (
    cpu_kernel_available,
    predicted_mlp_cpu,
    rows_axpy_above_cpu,
    rows_axpy_cpu,
    sparse_mlp_cpu,
)
from dyninfer.kernels.reference import activation, pack_gated, pack_plain, rows_axpy_reference, sparse_mlp_reference

# --------------------------------------------------------------------------- predictor


class NeuronPredictor(nn.Module):
    """Low-rank scorer: logits = up(down(x)) + bias; one logit per MLP neuron."""

    def __init__(self, hidden_size: int, neurons: int, rank: int):
        super().__init__()
        self.down = nn.Linear(hidden_size, rank, bias=False)
        self.up = nn.Linear(rank, neurons)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


# --------------------------------------------------------------------------- the plan


@dataclass
class PruningPlan:
    """What `prune` decided: per-layer thresholds (and predictors), stored in the artifact."""

    method: str
    sparsity: float  # overall target: mean over layers of the fraction of inactive neurons
    allocation: str
    layer_sparsity: list[float]
    thresholds: list[float]  # on |h| (threshold) or on the predictor's logit (predictor)
    input_sparsity: float = 0.0
    input_thresholds: list[float] = field(default_factory=list)  # on |x|; empty when off
    rank: int = 0
    label: str = "topk"
    mass: float = 0.0
    predictors: list[NeuronPredictor] | None = None

    @property
    def num_layers(self) -> int:
        return len(self.thresholds)

    def describe(self) -> dict:
        return {
            "method": self.method,
            "sparsity": self.sparsity,
            "allocation": self.allocation,
            "input_sparsity": self.input_sparsity,
            "rank": self.rank,
            "label": self.label,
            "mass": self.mass,
            "layer_sparsity": [round(s, 4) for s in self.layer_sparsity],
            "num_layers": self.num_layers,
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {
            "thresholds": torch.tensor(self.thresholds, dtype=torch.float32),
            "layer_sparsity": torch.tensor(self.layer_sparsity, dtype=torch.float32),
        }
        if self.input_thresholds:
            out["input_thresholds"] = torch.tensor(self.input_thresholds, dtype=torch.float32)
        for i, predictor in enumerate(self.predictors or []):
            for name, value in predictor.state_dict().items():
                out[f"predictor.{i}.{name}"] = value.detach().float().contiguous()
        return out

    @classmethod
    def from_artifact(cls, record: PruneRecord, tensors: dict[str, torch.Tensor], lm: LayeredModel) -> PruningPlan:
        """The plan an artifact holds, checked against this model; one-line errors when it does not fit."""
        plan = record.plan
        if not isinstance(plan, dict) or plan.get("method") not in METHODS:
            raise DyninferError(f"the artifact's prune stage has no valid plan (a method of {', '.join(METHODS)}); re-run `dyninfer prune`")
        method = plan["method"]
        try:
            thresholds = tensors["thresholds"].tolist()
            layer_sparsity = tensors["layer_sparsity"].tolist()
        except KeyError as missing:
            raise DyninferError(f"the artifact's pruning masks lack {missing}; re-run `dyninfer prune`") from None
        for name in ("sparsity", "input_sparsity", "mass", "rank"):
            if name in plan and not is_number(plan[name]):
                raise DyninferError(f"the artifact's pruning plan has a non-numeric {name} ({plan[name]!r}); re-run `dyninfer prune`")
        if len(thresholds) != lm.num_layers:
            raise DyninferError(
                f"the pruning masks are for {len(thresholds)} layers but the model has {lm.num_layers}; prune this model again"
            )
        predictors = None
        if method == "predictor":
            predictors = []
            for i in range(lm.num_layers):
                state = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"predictor.{i}.")}
                if "down.weight" not in state:
                    raise DyninferError(f"the artifact's pruning predictor for layer {i} is missing; re-run `dyninfer prune`")
                rank, hidden = state["down.weight"].shape
                predictor = NeuronPredictor(hidden, lm.mlp_weights(i).neurons, rank)
                try:
                    predictor.load_state_dict(state)
                except RuntimeError:  # missing or misshapen weights
                    raise DyninferError(
                        f"the artifact's pruning predictor for layer {i} does not fit this model; re-run `dyninfer prune`"
                    ) from None
                predictors.append(predictor.to(lm.device).eval().requires_grad_(False))
        return cls(
            method=method,
            sparsity=float(plan.get("sparsity", 0.0)),
            allocation=plan.get("allocation", "uniform"),
            layer_sparsity=layer_sparsity,
            thresholds=thresholds,
            input_sparsity=float(plan.get("input_sparsity", 0.0)),
            input_thresholds=tensors["input_thresholds"].tolist() if "input_thresholds" in tensors else [],
            rank=int(plan.get("rank", 0)),
            label=plan.get("label", "topk"),
            mass=float(plan.get("mass", 0.0)),
            predictors=predictors,
        )


# --------------------------------------------------------------------------- the module


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The kernel family `backend` ("auto" or a name) means for tensors on `device` in `dtype`."""
    if backend != "auto":
        return backend
    if device.type == "cpu" and dtype == torch.float32:
        return "cpu" if cpu_kernel_available() else "reference"
    if device.type == "cuda":
        # Imported on first use, not with this module: importing it imports triton (seconds), and
        # triton reads TRITON_INTERPRET when the kernels are decorated, i.e. at that import.
        from dyninfer.kernels.triton_sparse_mlp import triton_available

        return "triton" if triton_available() else "reference"
    return "reference"


def _kernels_for(backend: str):
    """(sparse_mlp, rows_axpy) implementations of a resolved backend."""
    if backend == "cpu":
        return sparse_mlp_cpu, rows_axpy_cpu
    if backend == "triton":
        from dyninfer.kernels.triton_sparse_mlp import rows_axpy_triton, sparse_mlp_triton  # see resolve_backend

        return sparse_mlp_triton, rows_axpy_triton
    return sparse_mlp_reference, rows_axpy_reference


def _in_dtype(weight: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return weight if weight is None or weight.dtype == dtype else weight.to(dtype)


def mlp_hidden(w: MlpWeights, x: torch.Tensor, input_threshold: float = 0.0) -> torch.Tensor:
    """h, the MLP activation (the down projection's input), computed in `x`'s dtype, with the
    input sparsity (|x| <= `input_threshold` zeroed) applied when it is positive."""
    if input_threshold > 0:
        x = torch.where(x.abs() > input_threshold, x, torch.zeros_like(x))
    first = _in_dtype(w.first, x.dtype)
    if w.kind == "gated":
        return activation(w.act, F.linear(x, first)) * F.linear(x, _in_dtype(w.up, x.dtype))
    return activation(w.act, F.linear(x, first, _in_dtype(w.first_bias, x.dtype)))


class SparseMLP(nn.Module):
    """A decoder layer's MLP with per-token neuron masks.

    `dense` is the original module (kept to restore it and as the owner of the weights).
    Decoding one token takes the sparse kernels; everything else the masked-dense path.
    """

    def __init__(
        self,
        dense: nn.Module,
        weights: MlpWeights,
        threshold: float,
        *,
        input_threshold: float = 0.0,
        predictor: NeuronPredictor | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        self.dense = dense
        self.weights = weights
        self.threshold = float(threshold)
        self.input_threshold = float(input_threshold)
        self.predictor = predictor
        self.backend = backend
        self._layouts: dict[str, torch.Tensor] = {}
        self._kernels = None
        self._resolved = backend
        self.counts: list[float] | None = None  # [active neurons, tokens] when counting

    # --- masked dense: prefill, batches, export (standard ops only)
    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        return mlp_hidden(self.weights, x, self.input_threshold)

    def scores(self, x: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return self.predictor(x) if self.predictor is not None else hidden.abs()

    def masked_dense(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hidden(x)
        keep = self.scores(x, h) > self.threshold
        if self.counts is not None:
            self.counts[0] += float(keep.sum())
            self.counts[1] += float(keep[..., 0].numel())
        h = torch.where(keep, h, torch.zeros_like(h))
        return F.linear(h, self.weights.down, self.weights.down_bias)

    # --- sparse decoding
    def _layout(self, name: str) -> torch.Tensor:
        """Weight layouts for the sparse kernels, built on first use (decoding only)."""
        if name not in self._layouts:
            w = self.weights
            with torch.no_grad():
                if name == "packed":
                    value = pack_gated(w.first, w.up, w.down) if w.kind == "gated" else pack_plain(w.first, w.down)
                elif name == "down_rows":
                    value = w.down.t().contiguous()
                else:  # input_rows: one row per input dim holding its gate and up columns
                    parts = [w.first.t()] + ([w.up.t()] if w.kind == "gated" else [])
                    value = torch.cat(parts, dim=1).contiguous()
            self._layouts[name] = value
        return self._layouts[name]

    def _decoding(self, x: torch.Tensor) -> bool:
        # Tracing (export) first: a symbolic shape must not be compared, and graphs need standard ops.
        if self.backend == "masked" or torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return False
        return x.shape[:-1].numel() == 1 and not (torch.is_grad_enabled() and x.requires_grad)

    def sparse_step(self, x: torch.Tensor) -> torch.Tensor:
        """One token through the sparse kernels: only active rows are read."""
        if self._kernels is None:
            self._resolved = resolve_backend(self.backend, x.device, x.dtype)
            self._kernels = _kernels_for(self._resolved)
        sparse_mlp, rows_axpy = self._kernels
        w, flat = self.weights, x.reshape(-1)
        if self.predictor is not None and self._resolved == "cpu":  # predictor + selection + MLP in one call
            out, count = predicted_mlp_cpu(flat, self.predictor, self.threshold, self._layout("packed"), w.act, w.first_bias)
        elif self.predictor is not None:
            active = torch.nonzero(self.predictor(flat) > self.threshold).squeeze(1)
            out = sparse_mlp(flat, self._layout("packed"), active, w.act, fc_bias=w.first_bias)
            count = active.numel()
        else:
            if self.input_threshold > 0:
                inputs = torch.nonzero(flat.abs() > self.input_threshold).squeeze(1)
                pre = rows_axpy(self._layout("input_rows"), inputs, flat.index_select(0, inputs))
                if w.kind == "gated":
                    gate, up = pre.split(w.neurons)
                    h = activation(w.act, gate) * up
                else:
                    h = activation(w.act, pre + w.first_bias if w.first_bias is not None else pre)
            else:
                h = self.hidden(flat)
            if self._resolved == "cpu":  # selection inside the kernel: one call per layer
                out, count = rows_axpy_above_cpu(self._layout("down_rows"), h, self.threshold)
            else:
                active = torch.nonzero(h.abs() > self.threshold).squeeze(1)
                out = rows_axpy(self._layout("down_rows"), active, h.index_select(0, active))
                count = active.numel()
        if self.counts is not None:
            self.counts[0] += count
            self.counts[1] += 1
        if w.down_bias is not None:
            out = out + w.down_bias
        return out.view_as(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sparse_step(x) if self._decoding(x) else self.masked_dense(x)


def install_pruning(lm: LayeredModel, plan: PruningPlan, backend: str = "auto") -> None:
    """Replace every decoder layer's MLP by a `SparseMLP` following `plan` (idempotent)."""
    if backend not in BACKENDS:
        raise DyninferError(f"`backend` must be one of {', '.join(BACKENDS)}, got '{backend}'")
    if plan.num_layers != lm.num_layers:
        raise DyninferError(f"the pruning plan has {plan.num_layers} layers but the model has {lm.num_layers}")
    remove_pruning(lm)
    for i in range(lm.num_layers):
        dense = lm.mlp(i)
        module = SparseMLP(
            dense,
            lm.mlp_weights(i),
            plan.thresholds[i],
            input_threshold=plan.input_thresholds[i] if plan.input_thresholds else 0.0,
            predictor=plan.predictors[i] if plan.predictors else None,
            backend=backend,
        )
        lm.set_mlp(i, module)


def load_pruning(artifact, lm: LayeredModel, backend: str = "auto") -> PruningPlan | None:
    """Install the artifact's pruning masks on `lm` (returns the plan; None when it has none)."""
    record = PruneRecord.read(artifact)
    if record is None:
        return None
    plan = PruningPlan.from_artifact(record, artifact.tensors.get(MASKS_GROUP, {}), lm)
    install_pruning(lm, plan, backend)
    return plan


def remove_pruning(lm: LayeredModel) -> None:
    """Put every layer's dense MLP back (nothing to do on families without MLP blocks)."""
    if lm.adapter.recurrent:
        return
    for i in range(lm.num_layers):
        module = lm.mlp(i)
        if isinstance(module, SparseMLP):
            lm.set_mlp(i, module.dense)


def sparse_modules(lm: LayeredModel) -> list[SparseMLP]:
    return [m for m in (lm.mlp(i) for i in range(lm.num_layers)) if isinstance(m, SparseMLP)]


@contextlib.contextmanager
def pruned(lm: LayeredModel, plan: PruningPlan | None, backend: str = "auto") -> Iterator[None]:
    """The model with `plan`'s masks inside the block (dense again after; `None`: dense)."""
    if plan is None:
        yield
        return
    install_pruning(lm, plan, backend)
    try:
        yield
    finally:
        remove_pruning(lm)


@contextlib.contextmanager
def dense_inside(lm: LayeredModel) -> Iterator[None]:
    """The installed masks taken out inside the block (the dense baseline of a pruned model)."""
    modules = {i: lm.mlp(i) for i in range(lm.num_layers) if isinstance(lm.mlp(i), SparseMLP)}
    for i, module in modules.items():
        lm.set_mlp(i, module.dense)
    try:
        yield
    finally:
        for i, module in modules.items():
            lm.set_mlp(i, module)


@contextlib.contextmanager
def counting_active(lm: LayeredModel) -> Iterator[list[list[float]]]:
    """Count active neurons per layer while inside: yields [[active, tokens], ...] per layer."""
    modules = sparse_modules(lm)
    for m in modules:
        m.counts = [0.0, 0.0]
    try:
        yield [m.counts for m in modules]
    finally:
        for m in modules:
            m.counts = None

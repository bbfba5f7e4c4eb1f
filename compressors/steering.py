"""Steering directions that control chain-of-thought length, and how they enter a model.

Two kinds, both scaled by α (α = 0 is the base model exactly; +α shortens):

* `ActivationSteering` (Efficiency Steering / repeng): one vector per chosen decoder layer,
  added to that layer's output at every position. Applied either with forward hooks
  (`hooked`) or baked into a bias of the module whose output the layer adds to the
  residual stream last (`bake`): the same sum, so the model needs no hooks and exports
  like any other.
* `ValveDelta` (CoT-Valve): a direction in parameter space, θ + α·Δθ. Each adapted weight
  holds either a low-rank delta `up @ down` (a LoRA, scaling folded in, laid out like the
  weight itself) or a dense delta (the difference of two checkpoints).

Both live in the artifact's `steering` tensor group; the `steer` stage records how they
were made and the α applied (`APPLIED`), which every loader bakes in before anything else.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from dyninfer.core.artifacts import Artifact
from dyninfer.core.choices import STEER_METHODS as METHODS
from dyninfer.core.errors import DyninferError, is_number
from dyninfer.core.layered import LayeredModel
from dyninfer.core.records import SteerRecord
from dyninfer.core.stages import STEERING_GROUP

_ACTIVATION_PREFIX = "activation.layer"
_VALVE_PREFIX = "valve."


# --------------------------------------------------------------------------- activation steering


@dataclass
class ActivationSteering:
    """direction[i]: the vector added to decoder layer i's output (0-based) at α = 1."""

    directions: dict[int, torch.Tensor]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"{_ACTIVATION_PREFIX}{i}": v.detach().float().cpu() for i, v in sorted(self.directions.items())}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> ActivationSteering | None:
        found = {int(k[len(_ACTIVATION_PREFIX) :]): v for k, v in tensors.items() if k.startswith(_ACTIVATION_PREFIX)}
        return cls(found) if found else None

    def largest_change(self, alpha: float) -> float:
        """The largest entry of α·direction (float64: α may be out of any model dtype's range)."""
        return max((abs(alpha) * float(v.double().abs().max()) for v in self.directions.values()), default=0.0)

    def check(self, lm: LayeredModel) -> None:
        for i, v in self.directions.items():
            if not 0 <= i < lm.num_layers or v.shape != (lm.hidden_size,):
                raise DyninferError(
                    f"the steering direction for layer {i} (shape {tuple(v.shape)}) does not fit this "
                    f"model ({lm.num_layers} layers, hidden size {lm.hidden_size}); "
                    "extract it again for this model"
                )


class _OutputBias(nn.Module):
    """`module(x) + bias`, for a residual-out module with no bias of its own (Gemma's post-norm, a mixture of
    experts, which also returns its router logits)."""

    def __init__(self, module: nn.Module, bias: torch.Tensor):
        super().__init__()
        self.inner = module
        self.bias = nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor):
        out = self.inner(x)
        if isinstance(out, tuple):
            return (out[0] + self.bias, *out[1:])
        return out + self.bias


def _add_bias(lm: LayeredModel, index: int, vector: torch.Tensor) -> None:
    module = lm.residual_out(index)
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor) and bias.shape == vector.shape:
        with torch.no_grad():
            bias.add_(vector.to(bias))
    elif isinstance(module, nn.Linear) and bias is None:
        weight = module.weight
        module.bias = nn.Parameter(vector.to(device=weight.device, dtype=weight.dtype).clone(), requires_grad=False)
    else:
        weight = next(module.parameters())
        lm.set_residual_out(index, _OutputBias(module, vector.to(device=weight.device, dtype=weight.dtype).clone()))


@contextlib.contextmanager
def hooked(lm: LayeredModel, steering: ActivationSteering, alpha: float) -> Iterator[None]:
    """Add α·direction to the chosen layers' outputs with forward hooks while inside."""
    steering.check(lm)

    def hook_for(vector: torch.Tensor):
        def hook(module, args, output):
            if isinstance(output, tuple):
                return (output[0] + vector,) + tuple(output[1:])
            return output + vector

        return hook

    handles = [lm.layers[i].register_forward_hook(hook_for(alpha * v.to(lm.device))) for i, v in steering.directions.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# --------------------------------------------------------------------------- CoT-Valve


@dataclass
class ValveDelta:
    """Δθ per parameter name: a (up [.., r], down [r, ..]) pair or a dense tensor, shaped like the parameter."""

    low_rank: dict[str, tuple[torch.Tensor, torch.Tensor]]
    dense: dict[str, torch.Tensor]

    def tensors(self, prefix: str = _VALVE_PREFIX) -> dict[str, torch.Tensor]:
        out = {}
        for name, (up, down) in self.low_rank.items():
            out[f"{prefix}{name}.up"] = up.detach().float().cpu()
            out[f"{prefix}{name}.down"] = down.detach().float().cpu()
        for name, delta in self.dense.items():
            out[f"{prefix}{name}.delta"] = delta.detach().float().cpu()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str = _VALVE_PREFIX) -> ValveDelta | None:
        """The delta stored under `prefix` (the valve's, or another low-rank delta such as tune-exits' LoRA)."""
        low_rank, dense = {}, {}
        for key, value in tensors.items():
            if not key.startswith(prefix):
                continue
            name, _, part = key[len(prefix) :].rpartition(".")
            if part == "delta":
                dense[name] = value
            elif part == "up":
                down = tensors.get(f"{prefix}{name}.down")
                if down is None:
                    raise DyninferError(f"the stored low-rank delta of '{name}' has no down half; the artifact is damaged: make it again")
                low_rank[name] = (value, down)
        return cls(low_rank, dense) if low_rank or dense else None

    def names(self) -> list[str]:
        return sorted([*self.low_rank, *self.dense])

    def delta(self, name: str) -> torch.Tensor:
        if name in self.dense:
            return self.dense[name]
        up, down = self.low_rank[name]
        return up @ down

    def parameters_of(
        self, model: nn.Module, what: str = "the CoT-Valve delta", remedy: str = "extract it again for this model"
    ) -> dict[str, nn.Parameter]:
        """The model's parameters this delta adapts, checked for shape."""
        params = dict(model.named_parameters())
        found = {}
        for name in self.names():
            param = params.get(name)
            expected = self.dense[name].shape if name in self.dense else (self.low_rank[name][0].shape[0], self.low_rank[name][1].shape[1])
            if param is None or tuple(param.shape) != tuple(expected):
                raise DyninferError(
                    f"{what} adapts '{name}' {tuple(expected)}, which this model "
                    f"{'lacks' if param is None else 'has as ' + str(tuple(param.shape))}; {remedy}"
                )
            found[name] = param
        return found

    def add_to(
        self, model: nn.Module, alpha: float, what: str = "the CoT-Valve delta", remedy: str = "extract it again for this model"
    ) -> None:
        """θ += α·Δθ on every parameter this delta adapts (shapes checked first)."""
        with torch.no_grad():
            for name, param in self.parameters_of(model, what, remedy).items():
                param.add_((alpha * self.delta(name)).to(param))

    def largest_change(self, alpha: float) -> float:
        """A bound on the largest entry of α·Δθ (float64), from the halves' row and column norms (Cauchy-Schwarz):
        the products themselves would be weight-sized."""
        largest = 0.0
        for up, down in self.low_rank.values():
            largest = max(largest, float(up.double().norm(dim=1).max()) * float(down.double().norm(dim=0).max()))
        for delta in self.dense.values():
            largest = max(largest, float(delta.double().abs().max()))
        return abs(alpha) * largest

    def numel(self) -> int:
        return sum(up.numel() + down.numel() for up, down in self.low_rank.values()) + sum(d.numel() for d in self.dense.values())


# --------------------------------------------------------------------------- baking


@dataclass
class Steering:
    """What an artifact holds: either or both kinds of direction."""

    activation: ActivationSteering | None = None
    valve: ValveDelta | None = None

    @classmethod
    def from_artifact(cls, artifact: Artifact) -> Steering:
        tensors = artifact.tensors.get(STEERING_GROUP, {})
        return cls(ActivationSteering.from_tensors(tensors), ValveDelta.from_tensors(tensors))

    def get(self, method: str):
        found = self.activation if method == "activation" else self.valve if method == "valve" else None
        if method not in METHODS:
            raise DyninferError(f"`method` must be one of {', '.join(METHODS)}, got '{method}'")
        if found is None:
            raise DyninferError(
                f"the artifact holds no {method} direction; extract one into it with `dyninfer steer extract` ({method}) first"
            )
        return found

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**(self.activation.tensors() if self.activation else {}), **(self.valve.tensors() if self.valve else {})}


def bake(lm: LayeredModel, direction: ActivationSteering | ValveDelta, alpha: float) -> None:
    """Fold α·direction into the weights for good (α = 0 leaves every weight untouched)."""
    if alpha == 0:
        return
    if isinstance(direction, ActivationSteering):
        direction.check(lm)
        for i, v in direction.directions.items():
            _add_bias(lm, i, alpha * v.float())
        return
    direction.add_to(lm.model, alpha)


@contextlib.contextmanager
def steered(lm: LayeredModel, direction: ActivationSteering | ValveDelta, alpha: float) -> Iterator[None]:
    """The model baked with α·direction while inside; every weight and module restored exactly after."""
    if alpha == 0:
        yield
        return
    if isinstance(direction, ValveDelta):
        saved = {name: p.detach().clone() for name, p in direction.parameters_of(lm.model).items()}
        try:
            bake(lm, direction, alpha)
            yield
        finally:
            params = dict(lm.model.named_parameters())
            with torch.no_grad():
                for name, value in saved.items():
                    params[name].copy_(value)
        return
    modules = {i: lm.residual_out(i) for i in direction.directions}
    biases = {i: (m.bias.detach().clone() if isinstance(getattr(m, "bias", None), torch.Tensor) else None) for i, m in modules.items()}
    try:
        bake(lm, direction, alpha)
        yield
    finally:
        for i, module in modules.items():
            lm.set_residual_out(i, module)
            with torch.no_grad():
                if biases[i] is None:
                    if isinstance(module, nn.Linear):
                        module.bias = None
                else:
                    module.bias.copy_(biases[i])


# A hidden-state or weight change past this squares to inf in float32 (RMSNorm and LayerNorm square their input), so every
# output after it would be NaN.
LARGEST_SAFE_CHANGE = math.sqrt(torch.finfo(torch.float32).max)


def safe_change(change: float) -> bool:
    return math.isfinite(change) and change <= LARGEST_SAFE_CHANGE


def applied(artifact: Artifact) -> dict | None:
    """The stage's record of the baked steering ({"method", "alpha"}), if any."""
    record = SteerRecord.read(artifact)
    return None if record is None else record.applied


def load_steering(artifact: Artifact, lm: LayeredModel) -> dict | None:
    """Bake the artifact's applied steering into the model (before masks are installed); its record."""
    record = applied(artifact)
    if record:
        if (
            not isinstance(record, dict)
            or record.get("method") not in METHODS
            or not (is_number(record.get("alpha")) and math.isfinite(record["alpha"]))
        ):
            raise DyninferError(f"the artifact's applied steering is invalid ({record!r}); apply it again with `dyninfer steer apply`")
        direction = Steering.from_artifact(artifact).get(record["method"])
        if not safe_change(direction.largest_change(float(record["alpha"]))):
            raise DyninferError(
                f"the artifact's applied steering (α = {record['alpha']:g}) would make the model's weights inf or NaN; apply a "
                "smaller α with `dyninfer steer apply`"
            )
        bake(lm, direction, float(record["alpha"]))
    return record

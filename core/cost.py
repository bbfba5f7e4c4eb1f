"""Per-layer cost model: FLOPs per generated token, counted with torch's flop counter.

An early exit at depth d costs the embedding, the first d decoder layers, the final norm
and the LM head (plus a tuned-lens translator when one is used). The head is not cheap on
small models: SmolLM2-135M's head costs about as much as eight of its decoder layers, so
every exit check that needs logits has to pay for it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from dyninfer.core.artifacts import Artifact
from dyninfer.core.errors import DyninferError, is_number
from dyninfer.core.layered import LayeredModel
from dyninfer.core.records import ProfileRecord, PruneRecord


@dataclass
class CostModel:
    context: int  # tokens already in the cache when the counted token is decoded
    embed: float
    layers: list[float]  # FLOPs of decoder layer i (0-based) for one decode step
    norm: float
    head: float
    translator: float  # one tuned-lens affine map (d x d) applied to one token
    unit: str = "FLOPs/token"
    source: str = "torch.utils.flop_counter"
    # Exit checks that read only the hidden state, in the same unit: "saturation" (a cosine),
    # "classifier" (final norm + a dot product) and "head_row" (one scored vocabulary row).
    # Empty: their FLOP formulas (see `check`).
    checks: dict[str, float] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def full_cost(self) -> float:
        return self.embed + sum(self.layers) + self.norm + self.head

    def exit_cost(self, depth: int, translated: bool = False) -> float:
        """Cost of a token that leaves after `depth` decoder layers (0 = embedding output)."""
        cost = self.embed + sum(self.layers[:depth]) + self.norm + self.head
        if translated and depth < self.num_layers:
            cost += self.translator
        return cost

    def check(self, name: str, hidden_size: int) -> float:
        """Cost of one hidden-state check (`checks`), or its FLOP count when none is recorded."""
        if name in self.checks:
            return self.checks[name]
        flops = {"saturation": 3.0 * hidden_size, "classifier": self.norm + 2.0 * hidden_size, "head_row": 2.0 * hidden_size}
        return flops[name]

    @classmethod
    def from_dict(cls, d: dict) -> CostModel:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def head_in_layers(self) -> float:
        """The LM head's cost in units of an average decoder layer."""
        return self.head / (sum(self.layers) / self.num_layers)

    def to_dict(self) -> dict:
        return asdict(self)


def speedup_basis(cost_model: dict | None) -> str:
    """What predicted speedups from this (serialised) cost model are ratios of:
    "latency" (measured by `profile`, in ms) or "FLOPs"."""
    return "latency" if (cost_model or {}).get("unit", "").startswith("ms") else "FLOPs"


def measured_cost(artifact: Artifact) -> CostModel | None:
    """The per-piece decode latency a `profile` recorded in this artifact, if any."""
    record = ProfileRecord.read(artifact)
    if record is None or record.measured_cost is None:
        return None
    cost = record.measured_cost
    numbers = ("context", "embed", "norm", "head", "translator")
    if not (
        isinstance(cost, dict)
        and all(is_number(cost.get(k)) for k in numbers)
        and isinstance(cost.get("layers"), list)
        and cost["layers"]
        and all(is_number(v) for v in cost["layers"])
        and all(is_number(v) for v in (cost.get("checks") or {}).values())
    ):
        raise DyninferError("the artifact's profile has an invalid measured cost; run `dyninfer profile` into it again")
    return CostModel.from_dict(cost)


def profile_is_stale(artifact: Artifact) -> bool:
    """True when the artifact was pruned after its profile was measured (or the other way round)."""
    record = ProfileRecord.read(artifact)
    return record is not None and record.pruned != (PruneRecord.read(artifact) is not None)


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch's counter knows the CUDA attention kernels but not the CPU flash kernel that
# F.scaled_dot_product_attention dispatches to here; without this, attention counts as 0.
EXTRA_FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def _flops(fn):
    """(FLOPs counted while running fn(), what fn returned)."""
    with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as counter:
        result = fn()
    return float(counter.get_total_flops()), result


@torch.no_grad()
def count_costs(lm: LayeredModel, context: int = 256) -> CostModel:
    """FLOPs of one decode step at `context` tokens of history, piece by piece."""
    context = max(1, context)
    device = lm.device
    prompt = torch.zeros(1, context, dtype=torch.long, device=device)
    # The dynamic model's cache (every layer keeps every position, as `profile` measures it):
    # fill it so the counted step attends to `context` tokens.
    cache = lm.new_decoding_cache(1)
    lm.forward_logits(prompt, cache=cache)
    step = torch.zeros(1, 1, dtype=torch.long, device=device)
    embed, fwd = _flops(lambda: lm.begin(step, cache=cache))
    hidden = fwd.hidden
    layers = []
    for i in range(lm.num_layers):
        flops, hidden = _flops(lambda: lm.run_layer(fwd, i, hidden))
        layers.append(flops)
    norm, normed = _flops(lambda: lm.final_norm(hidden))
    head, _ = _flops(lambda: lm.head(normed))
    d = lm.hidden_size
    return CostModel(
        context=context,
        embed=embed,
        layers=layers,
        norm=norm,
        head=head,
        translator=2.0 * d * d + d,
    )

"""Choosing the speculative draft layer and draft length from measured costs and acceptance rates.

One cycle of self-speculation drafts k tokens with the first l layers and the draft head, then
verifies them with the other L - l layers in one pass over the k positions. With a per-token
acceptance a (the exit's top-1 equals the full model's: the probe's agreement at depth l), the
accepted drafts X follow a truncated geometric law, E[X] = a + a^2 + ... + a^k, and a cycle emits
E[X] + 1 - a^k tokens (the full model's token replaces the first failed draft). Its cost, from
times measured on this machine:

    k * (l * layer(1) + draft_head) + (L - l) * layer(k) + head(k)

where layer(k) and head(k) are one decoder layer and the full head over k new positions at once
(interpolated between the measured 1 and K). One plain decoding step costs L * layer(1) + head.
Assumptions: acceptances are independent from token to token, and every cycle drafts k tokens
(the confidence stop only shortens cycles that were about to fail, so it can only help).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from dyninfer.core.errors import DyninferError


@dataclass
class StepCosts:
    """Measured seconds on this machine, batch 1."""

    num_layers: int
    layer_one: float  # one decoder layer, one new position
    layer_many: float  # one decoder layer, `many` new positions at once
    many: int
    head: float  # the full LM head (final norm included), one position
    draft_head: float  # the draft head (restricted to its vocabulary when there is one), one position
    head_many: float | None = None  # the full head over `many` positions at once (None: `many` times `head`)

    def layer(self, k: int) -> float:
        return _between(self.layer_one, self.layer_many, k, self.many)

    def heads(self, k: int) -> float:
        """The full head over k positions at once (verification scores every draft)."""
        return _between(self.head, self.head_many if self.head_many is not None else self.many * self.head, k, self.many)

    def plain_step(self) -> float:
        return self.num_layers * self.layer_one + self.head

    def draft_token(self, layer: int) -> float:
        """One draft: the first `layer` layers and the draft head, one position."""
        return layer * self.layer_one + self.draft_head

    def verify(self, layer: int, k: int) -> float:
        """Verifying k drafts: the other layers and the full head over the k positions at once."""
        return (self.num_layers - layer) * self.layer(k) + self.heads(k)


def _between(one: float, many: float, k: int, n: int) -> float:
    """Linear between the time of 1 position and of n positions."""
    return one if n == 1 else one + (many - one) * (k - 1) / (n - 1)


def tokens_per_cycle(acceptance: float, k: int) -> float:
    """Expected tokens one cycle of k drafts emits: the accepted drafts, and the correction after a failed one."""
    return sum(acceptance**i for i in range(1, k + 1)) + 1 - acceptance**k


def expected_speedup(acceptance: float, layer: int, k: int, costs: StepCosts) -> float:
    """Tokens per second of speculation at (layer, k) over plain decoding's, under the model above."""
    tokens = tokens_per_cycle(acceptance, k)
    cycle = k * costs.draft_token(layer) + costs.verify(layer, k)
    return tokens / cycle * costs.plain_step()


def needed_acceptance(layer: int, k: int, costs: StepCosts, speedup: float) -> float | None:
    """The per-token acceptance at which (layer, k) reaches `speedup` (None: not even every draft accepted)."""
    if expected_speedup(1.0, layer, k, costs) < speedup:
        return None
    low, high = 0.0, 1.0
    for _ in range(40):  # the speedup rises with the acceptance
        middle = (low + high) / 2
        low, high = (middle, high) if expected_speedup(middle, layer, k, costs) < speedup else (low, middle)
    return high


@dataclass
class SpeculationPlan:
    layer: int
    max_draft: int
    acceptance: float  # the measured agreement at that layer
    predicted_speedup: float
    # The acceptance this layer and draft length would need for 1.3x (None: out of reach even at 1.0).
    needed_for_1_3x: float | None
    source: str  # where the acceptance came from
    costs: StepCosts | None = None

    def to_dict(self) -> dict:
        out = asdict(self)
        if self.costs is not None:  # the trade-off in seconds: one draft token, one verification of all drafts
            out["draft_token_seconds"] = self.costs.draft_token(self.layer)
            out["verify_seconds"] = self.costs.verify(self.layer, self.max_draft)
            out["plain_step_seconds"] = self.costs.plain_step()
        return out


def plan_speculation(agreement: list[float], costs: StepCosts, max_draft: int, source: str) -> SpeculationPlan:
    """The (layer, draft length) with the highest expected speedup; `agreement[d]`: acceptance at depth d (0..L)."""
    if len(agreement) != costs.num_layers + 1:
        raise DyninferError(
            f"the measured agreement covers {len(agreement) - 1} layers but the model has {costs.num_layers}; probe this model again"
        )
    if max_draft < 1:
        raise DyninferError(f"`max_draft` must be at least 1, got {max_draft}")
    best = max(
        (expected_speedup(agreement[layer], layer, k, costs), layer, k)
        for layer in range(1, costs.num_layers)
        for k in range(1, max_draft + 1)
    )
    speedup, layer, k = best
    return SpeculationPlan(layer, k, agreement[layer], speedup, needed_acceptance(layer, k, costs, 1.3), source, costs)

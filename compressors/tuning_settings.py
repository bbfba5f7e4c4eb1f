"""`tune-exits`' training settings, apart from the training (compressors/exit_tuning.py): importable
without torch, so the CLI builds `dyninfer tune-exits --help` from them without loading it."""

from __future__ import annotations

import math
from dataclasses import dataclass

from dyninfer.core.choices import CURRICULA, DEPTH_WEIGHTINGS, EXIT_TARGETS
from dyninfer.core.errors import DyninferError, check_at_least, check_between, check_choice, check_positive, option

__all__ = ["CURRICULA", "DEPTH_WEIGHTINGS", "EXIT_TARGETS", "TuningSettings"]


@dataclass
class TuningSettings:
    exit_layers: tuple[int, ...] = ()  # exit depths (1 .. L-1) trained; () = every one
    rank: int = 16
    targets: tuple[str, ...] = ()  # linear module names to adapt; () = the architecture adapter's
    # 60 steps of 4 windows: about 20 minutes with its measurements on 2 CPU cores for a 135M model
    # (docs/tune-exits.md compares it with a 72-step run); LayerSkip-scale gains need far more.
    steps: int = 60
    lr: float = 1e-3
    batch_size: int = 4
    curriculum: str = "rotational"
    rotation: int = 4
    depth_weighting: str = "linear"
    layer_dropout: float = 0.0
    exit_weight: float = 1.0
    # At 1 the tuned full model drifted from the original (final KL 0.35 nats by step 48); at 10 it stayed
    # within 0.06 nats and +0.4% perplexity while the exits still learned (docs/tune-exits.md).
    kl_weight: float = 10.0
    exit_target: str = "teacher"
    # Share of each step's positions the exit losses score (a random sample, the same for every exit): on a big
    # vocabulary the head costs several layers, once per exit; the final KL always scores every position.
    exit_token_fraction: float = 0.25
    checkpointing: bool = False  # recompute each layer in the backward pass (activation memory of one layer)
    seed: int = 0

    def validate(self) -> None:
        for name, allowed in (("curriculum", CURRICULA), ("exit_target", EXIT_TARGETS), ("depth_weighting", DEPTH_WEIGHTINGS)):
            check_choice(name, getattr(self, name), allowed)
        for name in ("rank", "steps", "batch_size", "rotation"):
            check_at_least(name, getattr(self, name), 1)
        check_positive("lr", self.lr)
        check_between("layer_dropout", self.layer_dropout, 0.0, 1.0, low_open=False)
        check_between("exit_token_fraction", self.exit_token_fraction, 0.0, 1.0, high_open=False)
        for name in ("exit_weight", "kl_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise DyninferError(f"{option(name)} must be a finite number >= 0, got {value}")
        if self.exit_weight == 0:
            raise DyninferError(f"{option('exit_weight')} 0 trains no exit; give it a positive weight")

    def depths(self, num_layers: int) -> list[int]:
        """The exit depths trained (checked against the model's depth)."""
        if num_layers < 2:
            raise DyninferError(f"the model has {num_layers} layer; early exits need at least 2")
        for d in self.exit_layers:
            if not 1 <= d < num_layers:
                raise DyninferError(
                    f"{option('exit_layers')} {d} is out of range: this model's exits are after layers "
                    f"1 to {num_layers - 1} (the last layer is the full model)"
                )
        return sorted(set(self.exit_layers)) or list(range(1, num_layers))

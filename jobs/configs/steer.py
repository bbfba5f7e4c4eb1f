"""`dyninfer steer extract|sweep|apply`'s options, and the α values a steering check sweeps."""

from __future__ import annotations

import math
from dataclasses import dataclass

from dyninfer.core.choices import (
    BUILTIN_COT,
    DEFAULT_MODEL,
    STEER_KINDS,
    STEER_METHODS,
)
from dyninfer.core.errors import DyninferError, check_at_least, check_between, check_choice, option
from dyninfer.core.placement import PlacementOptions
from dyninfer.jobs.configs.common import check_config_seed

# α values a steering check sweeps by default: around where each method starts to act (docs/steer.md).
STEER_ALPHAS = {"activation": (0.25, 0.5, 1.0), "valve": (0.1, 0.2, 0.5)}


@dataclass
class ExtractConfig(PlacementOptions):
    model: str = DEFAULT_MODEL
    method: str = "activation"
    data: str = BUILTIN_COT
    examples: int = 128  # training examples (the first `shots` of them become the prompt's worked examples)
    heldout: int = 32
    seed: int = 0
    shots: int = 0
    layers: tuple[int, ...] | None = None
    kind: str = "mean"
    rank: int = 8
    steps: int = 150
    lr: float = 2e-3
    batch_size: int = 4
    targets: tuple[str, ...] | None = None
    delta_from: str | None = None
    delta_to: str | None = None

    def validate(self) -> None:
        self.placement().validate()
        check_config_seed(self)
        check_choice("method", self.method, STEER_METHODS)
        check_choice("kind", self.kind, STEER_KINDS)
        for name, low in (("examples", 2), ("heldout", 1), ("rank", 1), ("steps", 1), ("batch_size", 1), ("shots", 0)):
            check_at_least(name, getattr(self, name), low)
        if self.shots >= self.examples:
            raise DyninferError(f"{option('shots')} ({self.shots}) must be smaller than {option('examples')} ({self.examples})")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise DyninferError(f"{option('lr')} must be a positive number, got {self.lr}")
        if (self.delta_from is None) != (self.delta_to is None):
            raise DyninferError(f"{option('delta_from')} and {option('delta_to')} go together (either may be `base`)")
        if self.delta_from is not None and self.method != "valve":
            raise DyninferError(f"{option('delta_from')}/{option('delta_to')} make a CoT-Valve direction: use {option('method')} valve")

    def split_record(self) -> dict:
        return {"data": self.data, "seed": self.seed, "examples": self.examples, "heldout": self.heldout, "shots": self.shots}


@dataclass
class SweepConfig(PlacementOptions):
    method: str | None = None  # None: the only method the artifact holds
    alphas: tuple[float, ...] = (-1.0, -0.5, 0.0, 0.5, 1.0)  # 0 is always swept
    questions: int | None = None  # None: the extraction's held-out count
    max_new_tokens: int = 128
    batch_size: int = 16
    keep: float = 0.9  # share of the unsteered answers a setting must keep to count as best
    model: str | None = None  # None: the artifact's base model spec

    def validate(self) -> None:
        self.placement().validate()
        check_config_seed(self)
        if self.method is not None:
            check_choice("method", self.method, STEER_METHODS)
        check_at_least("max_new_tokens", self.max_new_tokens, 1)
        check_at_least("batch_size", self.batch_size, 1)
        check_between("keep", self.keep, 0.0, 1.0, high_open=False)
        if any(not math.isfinite(a) for a in self.alphas):
            raise DyninferError(f"{option('alphas')} must be finite numbers")
        if self.questions is not None:
            check_at_least("questions", self.questions, 1)


@dataclass
class ApplyConfig:
    alpha: float = 0.0  # 0 is the base model, positive shortens
    method: str | None = None  # None: the only method the artifact holds

    def validate(self) -> None:
        if not math.isfinite(self.alpha):
            raise DyninferError(f"{option('alpha')} must be a finite number, got {self.alpha}")
        if self.method is not None:
            check_choice("method", self.method, STEER_METHODS)

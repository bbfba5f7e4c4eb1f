"""`dyninfer prune`'s options."""

from __future__ import annotations

from dataclasses import dataclass

from dyninfer.core.choices import (
    DEFAULT_DATA,
    DEFAULT_MODEL,
    PRUNE_ALLOCATIONS,
    PRUNE_BACKENDS,
    PRUNE_LABELS,
    PRUNE_METHODS,
)
from dyninfer.core.errors import DyninferError, check_at_least, check_between, check_choice, option
from dyninfer.core.placement import PlacementOptions
from dyninfer.jobs.configs.common import check_config_seed


@dataclass
class PruneConfig(PlacementOptions):
    model: str = DEFAULT_MODEL
    data: str = DEFAULT_DATA
    field: str | None = None
    seq_len: int = 256
    seed: int = 0
    method: str = "threshold"
    sparsity: float = 0.5
    sweep: tuple[float, ...] = ()  # more sparsities to evaluate (reported; the artifact keeps `sparsity`)
    allocation: str = "uniform"
    input_sparsity: float = 0.0
    rank: int = 64
    label: str = "topk"
    mass: float = 0.9
    steps: int = 300
    calibration_tokens: int = 4096
    heldout_tokens: int = 4096
    speed: bool = True
    prompts: int = 4
    prompt_tokens: int = 64
    new_tokens: int = 32
    backend: str = "auto"

    def validate(self) -> None:
        self.placement().validate()
        check_config_seed(self)
        for name, allowed in (
            ("method", PRUNE_METHODS),
            ("allocation", PRUNE_ALLOCATIONS),
            ("label", PRUNE_LABELS),
            ("backend", PRUNE_BACKENDS),
        ):
            check_choice(name, getattr(self, name), allowed)
        for name, value in (("sparsity", self.sparsity), *(("sweep", s) for s in self.sweep)):
            check_between(name, value, 0.0, 1.0)
        check_between("input_sparsity", self.input_sparsity, 0.0, 1.0, low_open=False)
        if self.input_sparsity and self.method != "threshold":
            raise DyninferError(f"{option('input_sparsity')} applies to {option('method')} threshold only")
        if self.label == "mass":
            check_between("mass", self.mass, 0.0, 1.0)
        for name, low in (
            ("rank", 1),
            ("steps", 1),
            ("calibration_tokens", 1),
            ("heldout_tokens", 1),
            ("prompts", 1),
            ("prompt_tokens", 1),
            ("new_tokens", 1),
            ("seq_len", 2),
        ):
            check_at_least(name, getattr(self, name), low)

    def sparsities(self) -> list[float]:
        return sorted({round(s, 6) for s in [self.sparsity, *self.sweep]})

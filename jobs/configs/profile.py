"""`dyninfer profile`'s options."""

from __future__ import annotations

from dataclasses import dataclass

from dyninfer.core.choices import (
    DEFAULT_DATA,
    DEFAULT_MODEL,
)
from dyninfer.core.errors import check_at_least, check_positive
from dyninfer.core.placement import PlacementOptions
from dyninfer.jobs.configs.common import check_config_seed


@dataclass
class ProfileConfig(PlacementOptions):
    model: str = DEFAULT_MODEL
    data: str = DEFAULT_DATA  # where the prompt comes from (pruned models' masks depend on the text)
    field: str | None = None
    context: int = 256  # prompt length of the prefill; cached tokens before the decode step
    warmup: int = 3
    repeats: int = 20
    energy_seconds: float = 3.0  # per energy window on a GPU
    seed: int = 0

    def validate(self) -> None:
        self.placement().validate()
        check_config_seed(self)
        for name, low in (("context", 1), ("warmup", 0), ("repeats", 3)):
            check_at_least(name, getattr(self, name), low)
        check_positive("energy_seconds", self.energy_seconds)

"""`dyninfer probe`'s options."""

from __future__ import annotations

from dataclasses import dataclass

from dyninfer.core.choices import (
    DEFAULT_DATA,
    DEFAULT_MODEL,
    LENS_KINDS,
    LOGIT,
    TUNED,
)
from dyninfer.core.errors import DyninferError, check_at_least, option
from dyninfer.core.placement import PlacementOptions
from dyninfer.jobs.configs.common import check_config_seed


@dataclass
class ProbeConfig(PlacementOptions):
    model: str = DEFAULT_MODEL
    data: str = DEFAULT_DATA
    field: str | None = None
    lenses: tuple[str, ...] = (LOGIT,)
    tokens: int = 2048  # held-out next-token predictions to probe
    seq_len: int = 256
    seed: int = 0
    batch_size: int = 2
    lens_train_tokens: int = 16384
    lens_steps: int = 60
    lens_from: str | None = None  # an artifact whose tuned lens to reuse instead of training
    retrain_lens: bool = False  # train a new tuned lens even if the artifact has one
    memory_budget_mib: int = 256  # full-vocabulary tensors of one token chunk (see run_probe)

    def validate(self) -> None:
        self.placement().validate()
        check_config_seed(self)
        unknown = [k for k in self.lenses if k not in LENS_KINDS]
        if unknown or not self.lenses:
            raise DyninferError(f"unknown lens {', '.join(unknown) or '(none)'}; choose from: {', '.join(LENS_KINDS)}")
        for name, low in (
            ("tokens", 1),
            ("seq_len", 2),
            ("batch_size", 1),
            ("lens_train_tokens", 1),
            ("lens_steps", 0),
            ("memory_budget_mib", 1),
        ):
            check_at_least(name, getattr(self, name), low)
        if self.lens_from and TUNED not in self.lenses:
            raise DyninferError(f"{option('lens_from')} only makes sense with {option('lenses')} tuned")

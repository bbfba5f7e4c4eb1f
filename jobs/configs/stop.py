"""`dyninfer stop`'s options."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from dyninfer.core.artifact_files import check_output_dir
from dyninfer.core.choices import (
    BUILTIN_CODE,
    BUILTIN_COT,
    COMPLETION,
    DEFAULT_MODEL,
    REASONING,
    STOP_CONDITIONS,
    STOP_MODES,
    STOP_PROBE_SITES,
    STOP_SIGNALS,
    STOP_VALUE_UNITS,
    STOP_WORKLOADS,
)
from dyninfer.core.errors import DyninferError, check_at_least, check_between, check_choice, option
from dyninfer.core.placement import PlacementOptions
from dyninfer.core.records import StopDraw
from dyninfer.jobs.configs.common import check_config_seed


@dataclass
class StopConfig(PlacementOptions):
    """`dyninfer stop`: fit and certify a stop rule for completions (corpus prefixes) or reasoning (problems)."""

    workload: str = COMPLETION  # completion: a corpus's prefixes; reasoning: problems with answers
    model: str = DEFAULT_MODEL
    data: str | None = None  # None: builtin:stdlib-code (completion) or builtin:arithmetic (reasoning)
    field: str | None = None
    seed: int = 0
    signal: str = "auto"  # auto: the signal that saves most on the fit split at the target
    target: float = 0.95  # value (completion) or right answers (reasoning) kept
    epsilon: float = 0.05
    condition: str = "valued"  # the guarantee is about units with something to lose (valued) or all units
    value_unit: str = "tokens"  # completion value: the matching prefix in tokens, characters or lines
    prompt_tokens: int = 64  # completion
    new_tokens: int = 64  # completion length
    fit_prompts: int = 64  # units that choose the signal and the candidate thresholds
    prompts: int = 192  # calibration units (Learn-then-Test's examples)
    heldout_prompts: int = 64  # units that report what the certified rule does
    batch_size: int = 16
    mode: str = "full"  # the generation it is certified on: full, or early-exit with the artifact's exits
    shots: int = 0  # reasoning: worked examples in the prompt
    probe_tokens: int = 6  # reasoning: tokens a trial answer may take
    probe_at: str = "auto"  # reasoning: probe at sentence or line ends (auto: the one that saves most on the fit units)
    chain_tokens: int = 160  # reasoning: the chain's token budget

    def resolved_data(self) -> str:
        return self.data or (BUILTIN_CODE if self.workload == COMPLETION else BUILTIN_COT)

    def draw(self) -> StopDraw:
        """Where the rule's units come from (the artifact records it: bench draws the held-out units again)."""
        return StopDraw(
            self.workload,
            self.resolved_data(),
            self.field,
            self.seed,
            self.fit_prompts,
            self.prompts,
            self.heldout_prompts,
            self.prompt_tokens,
            self.new_tokens,
            self.shots,
        )

    def validate(self) -> None:
        self.placement().validate()
        check_config_seed(self)
        check_choice("workload", self.workload, STOP_WORKLOADS)
        check_choice("signal", self.signal, ("auto", *STOP_SIGNALS[self.workload]))
        check_choice("condition", self.condition, STOP_CONDITIONS)
        check_choice("value_unit", self.value_unit, STOP_VALUE_UNITS)
        check_choice("mode", self.mode, STOP_MODES)
        check_choice("probe_at", self.probe_at, ("auto", *STOP_PROBE_SITES))
        check_between("target", self.target, 0.0, 1.0)
        check_between("epsilon", self.epsilon, 0.0, 1.0)
        for name, low in (
            ("prompt_tokens", 1),
            ("new_tokens", 1),
            ("fit_prompts", 1),
            ("prompts", 1),
            ("heldout_prompts", 1),
            ("batch_size", 1),
            ("shots", 0),
            ("probe_tokens", 1),
            ("chain_tokens", 1),
        ):
            check_at_least(name, getattr(self, name), low)
        defaults = StopConfig()
        only = {COMPLETION: ("prompt_tokens", "new_tokens", "value_unit"), REASONING: ("shots", "probe_tokens", "chain_tokens", "probe_at")}
        for workload, names in only.items():
            for name in names:
                if workload != self.workload and getattr(self, name) != getattr(defaults, name):
                    raise DyninferError(f"{option(name)} is for {option('workload')} {workload}; leave it out or change the workload")

    def target_path(self, out: str | os.PathLike) -> Path:
        return check_output_dir(out)

"""`dyninfer audit`'s options: each stage's own Config, sized for minutes, and the CI gates."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dyninfer.core.choices import (
    DEFAULT_DATA,
    DEFAULT_MODEL,
    LOGIT,
    REASONING,
    STEER_METHODS,
    STOP_WORKLOADS,
    TUNED,
)
from dyninfer.core.errors import DyninferError, check_between, check_choice, check_positive, option
from dyninfer.core.placement import PlacementOptions
from dyninfer.jobs.configs.calibrate import CalibrateConfig
from dyninfer.jobs.configs.probe import ProbeConfig
from dyninfer.jobs.configs.profile import ProfileConfig
from dyninfer.jobs.configs.prune import PruneConfig
from dyninfer.jobs.configs.steer import STEER_ALPHAS, ExtractConfig, SweepConfig
from dyninfer.jobs.configs.stop import StopConfig


def audit_stop(workload: str) -> StopConfig:
    """The audit's stop check (completion units follow the calibration's: `AuditConfig.stop_config`)."""
    check_choice("stop", workload, STOP_WORKLOADS)
    return StopConfig(workload=workload, fit_prompts=32, prompts=128, heldout_prompts=32)


def _quick_probe() -> ProbeConfig:
    # Sizes from measured curves (benchmarks/audit_defaults.py, docs/audit.md): 512 probe tokens read the oracle
    # saving within about a point of 2,048 tokens' in a quarter of the time; lens steps past 30 lower the
    # validation KL a little and leave the saving where it is.
    return ProbeConfig(tokens=512, lens_train_tokens=4096, lens_steps=30)


def _quick_calibrate() -> CalibrateConfig:
    # 0.99 needs at least 299 calibration prompts at epsilon 0.05 (ltt.min_examples): more than the bundled corpus
    # offers at the default window length, so the extra target is 0.9.
    return CalibrateConfig(fit_tokens=2048, heldout_tokens=1024, lens_train_tokens=4096, lens_steps=30, extra_targets=(0.9,))


def audit_steering(method: str) -> ExtractConfig:
    """The audit's steering check: a direction from 32 worked examples, 8 held-out questions."""
    return ExtractConfig(method=method, examples=32, heldout=8)


@dataclass
class AuditConfig(PlacementOptions):
    """The audit: what every stage shares (model, data, windows, seed, lens, where it runs), each stage's own
    Config, and the CI gates. The stage Configs' defaults are sized so the bundled model's audit takes minutes
    on 2 CPU cores (docs/audit.md says how many); the shared fields override theirs when a stage runs."""

    model: str = DEFAULT_MODEL
    data: str = DEFAULT_DATA
    field: str | None = None
    seq_len: int = 256  # also the profile's context
    seed: int = 0
    lens: str = TUNED  # tuned: trains (or reuses) a tuned lens; logit: training-free and faster
    probe: ProbeConfig = dataclasses.field(default_factory=_quick_probe)
    profile: ProfileConfig = dataclasses.field(default_factory=lambda: ProfileConfig(warmup=2, repeats=10))
    calibrate: CalibrateConfig = dataclasses.field(default_factory=_quick_calibrate)  # its `target`: the gates' policy
    prune: PruneConfig | None = None  # set: learn threshold masks first, so the rest audits the pruned model
    steer: ExtractConfig | None = None  # set: extract a CoT-length direction and sweep it (not applied)
    # The sweep's alphas default to STEER_ALPHAS[method]; 128 new tokens: the bundled model's chains run past 96.
    sweep: SweepConfig = dataclasses.field(default_factory=lambda: SweepConfig(alphas=(), questions=8, max_new_tokens=128))
    # set: fit and certify a stop rule too (completion prompts from the audit's data, or reasoning problems)
    stop: StopConfig | None = None
    export: bool = False
    # CI gates (None: not checked); `run` still writes the report when one fails, and the CLI exits 1.
    min_oracle_saving: float | None = None  # the best lens's oracle FLOP saving (probe)
    min_speedup: float | None = None  # predicted held-out speedup of the certified policy at the calibration target
    min_consistency: float | None = None  # held-out token consistency of that policy
    min_stop_saving: float | None = None  # held-out tokens saved by the certified stop rule (needs `stop`)

    def _shared(self) -> dict:
        return self.placed() | {"model": self.model, "data": self.data, "field": self.field, "seed": self.seed}

    def probe_config(self) -> ProbeConfig:
        lenses = (LOGIT, TUNED) if self.lens == TUNED else (LOGIT,)
        return dataclasses.replace(self.probe, **self._shared(), seq_len=self.seq_len, lenses=lenses)

    def profile_config(self) -> ProfileConfig:
        return dataclasses.replace(self.profile, **self._shared(), context=self.seq_len)

    def calibrate_config(self) -> CalibrateConfig:
        extra = tuple(t for t in self.calibrate.extra_targets if t != self.calibrate.target)
        return dataclasses.replace(self.calibrate, **self._shared(), seq_len=self.seq_len, lens=self.lens, extra_targets=extra)

    def prune_config(self) -> PruneConfig | None:
        return None if self.prune is None else dataclasses.replace(self.prune, **self._shared(), seq_len=self.seq_len)

    def extract_config(self) -> ExtractConfig | None:
        if self.steer is None:
            return None
        return dataclasses.replace(self.steer, **self.placed(), model=self.model, seed=self.seed)

    def stop_config(self) -> StopConfig | None:
        if self.stop is None:
            return None
        if self.stop.workload == REASONING:
            return dataclasses.replace(self.stop, **self.placed(), model=self.model, seed=self.seed)
        # completions of the audit's data in the setting its exits are certified for: the same prompt and
        # continuation lengths, as many calibration and held-out prompts, a quarter as many to fit on
        calibrate = self.calibrate
        return dataclasses.replace(
            self.stop,
            **self._shared(),
            prompt_tokens=calibrate.prompt_tokens,
            new_tokens=calibrate.new_tokens,
            prompts=calibrate.prompts,
            heldout_prompts=calibrate.heldout_prompts,
            fit_prompts=max(8, calibrate.prompts // 4),
        )

    def alphas(self) -> list[float]:
        return list(self.sweep.alphas or STEER_ALPHAS.get(self.steer.method if self.steer else "", ()))

    def sweep_config(self) -> SweepConfig | None:
        if self.steer is None:
            return None
        return dataclasses.replace(
            self.sweep,
            **self.placed(),
            method=self.steer.method,
            alphas=tuple(self.alphas()),
            model=self.model,
        )

    def validate(self) -> None:
        """Every stage's options, before any model loads."""
        for name in ("min_oracle_saving", "min_consistency", "min_stop_saving"):
            if getattr(self, name) is not None:
                check_between(name, getattr(self, name), 0.0, 1.0, low_open=False, high_open=False)
        if self.min_stop_saving is not None and self.stop is None:
            raise DyninferError(f"{option('min_stop_saving')} gates the stop rule: pass {option('stop')} too")
        if self.min_speedup is not None:
            check_positive("min_speedup", self.min_speedup)
        check_choice("lens", self.lens, (LOGIT, TUNED))
        if self.steer is not None:
            check_choice("steer", self.steer.method, STEER_METHODS)
        for config in (
            self.probe_config(),
            self.profile_config(),
            self.calibrate_config(),
            self.prune_config(),
            self.extract_config(),
            self.sweep_config(),
            self.stop_config(),
        ):
            if config is not None:
                config.validate()

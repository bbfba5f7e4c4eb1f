"""`dyninfer run`'s options."""

from __future__ import annotations

from dataclasses import dataclass

from dyninfer.core.choices import (
    KV_MODES,
    ONNX_PROVIDERS,
    RUN_BACKENDS,
    RUN_MODES,
)
from dyninfer.core.errors import DyninferError, check_at_least, check_between, check_choice, check_positive, option
from dyninfer.core.placement import PlacementOptions
from dyninfer.jobs.configs.common import check_config_seed, check_stop_setting, refuse_unused


@dataclass
class RunConfig(PlacementOptions):
    mode: str = "early-exit"  # early-exit, speculative (lossless; torch backend) or full
    backend: str = "torch"  # torch, or onnx: the package made by `export`
    provider: str | None = None  # onnx backend: cuda or cpu (None: the package's own)
    max_new_tokens: int = 64
    sample: bool = False
    temperature: float = 0.8
    seed: int = 0
    raw: bool = False  # do not wrap the prompt in the model's chat template
    model: str | None = None  # load the base model from here instead (same weights)
    kv_mode: str | None = None  # override the policy's KV mode
    # speculative: draft with the exit after this layer (None: planned from the artifact's measured agreement and
    # this machine's step costs, else 70% of the depth)
    draft_layer: int | None = None
    draft_threshold: float = 0.5  # speculative: keep drafting while the draft's max probability reaches this
    stop: str | None = None  # obey the artifact's certified stop rule for this workload (completion, reasoning)

    def validate(self) -> None:
        self.placement().validate()
        check_config_seed(self)
        check_choice("mode", self.mode, RUN_MODES)
        check_stop_setting(self)
        check_choice("backend", self.backend, RUN_BACKENDS)
        if self.provider is not None:
            check_choice("provider", self.provider, ONNX_PROVIDERS)
        if self.kv_mode is not None:
            check_choice("kv_mode", self.kv_mode, KV_MODES)
        check_at_least("max_new_tokens", self.max_new_tokens, 1)
        check_positive("temperature", self.temperature)
        check_between("draft_threshold", self.draft_threshold, 0.0, 1.0, low_open=False, high_open=False)
        if self.draft_layer is not None:
            check_at_least("draft_layer", self.draft_layer, 1)
        if self.backend == "onnx" and self.mode == "speculative":
            raise DyninferError(
                f"the ONNX backend runs {option('mode')} early-exit or full; speculative runs with {option('backend')} torch"
            )
        refuse_unused(self, RunConfig())

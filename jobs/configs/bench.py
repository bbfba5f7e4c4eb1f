"""`dyninfer bench`'s options."""

from __future__ import annotations

import os
from dataclasses import dataclass

from dyninfer.core.choices import (
    KV_MODES,
    ONNX_PROVIDERS,
    RUN_BACKENDS,
    STOP_WORKLOADS,
)
from dyninfer.core.errors import DyninferError, check_at_least, check_between, check_choice, check_positive, option
from dyninfer.core.placement import PlacementOptions
from dyninfer.jobs.configs.common import check_config_seed, refuse_unused


@dataclass
class BenchConfig(PlacementOptions):
    data: str | None = None  # prompt source; None: the calibration's data
    field: str | None = None
    prompts: int = 8
    prompt_tokens: int | None = None  # None: the calibration's (generation risk), else 64
    new_tokens: int | None = None  # None: the calibration's (generation risk), else 64
    seed: int = 0
    model: str | None = None  # load the base model from here instead (same weights)
    kv_mode: str | None = None  # override the policy's KV mode
    # speculative mode: draft with the exit after this layer (None: planned from the artifact's measured agreement
    # and this machine's step costs, else 70% of the depth)
    draft_layer: int | None = None
    draft_threshold: float = 0.5  # speculative mode: keep drafting while the draft's max probability reaches this
    backend: str = "torch"  # torch, or onnx: the exported package against optimum's ORT model
    package: str | None = None  # onnx backend: the exported package (None: ARTIFACT/onnx)
    provider: str | None = None  # onnx backend: cuda or cpu (None: the package's own)
    min_speedup: float | None = None  # gate on the gated mode's measured speedup
    min_consistency: float | None = None  # gate on its token consistency with the baseline
    stop: str | None = None  # benchmark the artifact's stop rule for this workload (time per request, value kept)
    memory: bool = True  # onnx backend: each row's peak RSS, from a process of its own (seconds a row)
    # onnx backend: a Python with onnxruntime-genai (its own virtualenv) that builds and runs its int4 export as a row
    # (None: this Python when onnxruntime-genai is importable here, else no such row and a note on how to get it)
    genai_python: str | None = None

    def validate(self) -> None:
        self.placement().validate()
        check_config_seed(self)
        if self.stop is not None:
            check_choice("stop", self.stop, STOP_WORKLOADS)
            for name in ("data", "field", "prompt_tokens", "min_consistency", "draft_layer", "kv_mode"):
                if getattr(self, name) is not None:
                    raise DyninferError(
                        f"{option(name)} does not apply to {option('stop')}: it benchmarks the rule on its own held-out units"
                    )
            if self.backend != "torch":
                raise DyninferError(
                    f"{option('stop')} benchmarks on {option('backend')} torch; `run` with {option('backend')} onnx obeys a package's rule"
                )
        for name in ("prompts", "prompt_tokens", "new_tokens"):
            if getattr(self, name) is not None:
                check_at_least(name, getattr(self, name), 1)
        check_choice("backend", self.backend, RUN_BACKENDS)
        if self.provider is not None:
            check_choice("provider", self.provider, ONNX_PROVIDERS)
        if self.genai_python is not None and not (os.path.isfile(self.genai_python) and os.access(self.genai_python, os.X_OK)):
            raise DyninferError(
                f"{option('genai_python')} {self.genai_python!r} is not an executable Python; give a virtualenv's bin/python "
                "with onnxruntime-genai installed (benchmarks/genai_baseline.py makes one)"
            )
        if self.kv_mode is not None:
            check_choice("kv_mode", self.kv_mode, KV_MODES)
        if self.draft_layer is not None:
            check_at_least("draft_layer", self.draft_layer, 1)
        check_between("draft_threshold", self.draft_threshold, 0.0, 1.0, low_open=False, high_open=False)
        if self.min_speedup is not None:
            check_positive("min_speedup", self.min_speedup)
        if self.min_consistency is not None:
            check_between("min_consistency", self.min_consistency, 0.0, 1.0, low_open=False, high_open=False)
        refuse_unused(self, BenchConfig())

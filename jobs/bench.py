"""`bench`: an artifact's dynamic model against the full model, side by side in one run, with CI gates.

torch backend: transformers' greedy decoding (the baseline) against early exit, lossless
self-speculation and the dynamic code path with exits disabled. onnx backend: optimum's
ORTModelForCausalLM (the baseline) against the exported package with and without exits, and
the torch dynamic model. Prompts are the start of held-out windows of the calibration's data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from dyninfer.compressors.exit_policy import KV_MODES
from dyninfer.core.data import DEFAULT_DATA, load_windows
from dyninfer.core.errors import DyninferError, check_at_least, check_between, check_choice, check_positive, option
from dyninfer.core.progress import ProgressFn
from dyninfer.exporters.onnx_runtime import PROVIDERS, read_package
from dyninfer.jobs.export import PACKAGE_DIR
from dyninfer.jobs.run import BACKENDS
from dyninfer.profilers.bench import BenchResult, run_bench, run_onnx_bench
from dyninfer.runtime.loader import load_dynamic


@dataclass
class BenchConfig:
    data: str | None = None  # prompt source; None: the calibration's data
    field: str | None = None
    prompts: int = 8
    prompt_tokens: int = 64
    new_tokens: int = 64
    seed: int = 0
    model: str | None = None  # load the base model from here instead (same weights)
    kv_mode: str | None = None  # override the policy's KV mode
    draft_layer: int | None = None  # speculative mode: draft with the exit after this layer (None: 70% of the depth)
    draft_threshold: float = 0.5  # speculative mode: keep drafting while the draft's max probability reaches this
    backend: str = "torch"  # torch, or onnx: the exported package against optimum's ORT model
    package: str | None = None  # onnx backend: the exported package (None: ARTIFACT/onnx)
    provider: str | None = None  # onnx backend: cuda or cpu (None: the package's own)
    min_speedup: float | None = None  # gate on the gated mode's measured speedup
    min_consistency: float | None = None  # gate on its token consistency with the baseline

    def validate(self) -> None:
        for name in ("prompts", "prompt_tokens", "new_tokens"):
            check_at_least(name, getattr(self, name), 1)
        check_choice("backend", self.backend, BACKENDS)
        if self.provider is not None:
            check_choice("provider", self.provider, PROVIDERS)
        if self.kv_mode is not None:
            check_choice("kv_mode", self.kv_mode, KV_MODES)
        if self.draft_layer is not None:
            check_at_least("draft_layer", self.draft_layer, 1)
        check_between("draft_threshold", self.draft_threshold, 0.0, 1.0, low_open=False, high_open=False)
        if self.min_speedup is not None:
            check_positive("min_speedup", self.min_speedup)
        if self.min_consistency is not None:
            check_between("min_consistency", self.min_consistency, 0.0, 1.0, low_open=False, high_open=False)


@dataclass
class BenchReport:
    config: BenchConfig
    data: str
    result: BenchResult
    gates_failed: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.gates_failed

    def summary(self) -> dict:
        return {"command": "bench", "data": self.data, **self.result.to_dict(), "gates_failed": self.gates_failed}


def gate_failures(config: BenchConfig, result: BenchResult) -> list[str]:
    """One line per failed gate, naming the gate by its config field."""
    gated, failures = result.gated, []
    if config.min_speedup is not None and not gated.speedup >= config.min_speedup:
        failures.append(f"speedup {gated.speedup:.3f}x < `min_speedup` {config.min_speedup}")
    if config.min_consistency is not None and not gated.consistency >= config.min_consistency:
        failures.append(f"consistency {gated.consistency:.3f} < `min_consistency` {config.min_consistency}")
    return failures


def run(config: BenchConfig, artifact: str | os.PathLike, progress: ProgressFn | None = None) -> BenchReport:
    """Benchmark the artifact at `artifact` (batch 1, greedy) and judge the gates."""
    config.validate()
    package = Path(config.package) if config.package else Path(artifact) / PACKAGE_DIR
    if config.backend == "onnx":  # before the model loads
        if not package.exists():
            raise DyninferError(f"no ONNX package at '{package}'; run `dyninfer export` on the artifact first, or "
                                f"pass {option('package')}")
        read_package(package)
    dyn = load_dynamic(str(artifact), config.model, kv_mode=config.kv_mode, full_depth_is_enough=config.backend == "torch")
    spec = config.data or dyn.calibration.get("data", {}).get("spec") or DEFAULT_DATA
    windows = load_windows(spec, dyn.loaded.tokenizer, field=config.field, seq_len=config.prompt_tokens,
                           seed=config.seed)
    prompt_ids = windows.take("heldout", config.prompts * config.prompt_tokens, option="prompts")
    prompt_ids = prompt_ids[:, : config.prompt_tokens]
    if config.backend == "onnx":
        result = run_onnx_bench(dyn, package, prompt_ids, config.new_tokens, provider=config.provider,
                                progress=progress)
    else:
        result = run_bench(dyn, prompt_ids, config.new_tokens, draft_layer=config.draft_layer,
                           draft_threshold=config.draft_threshold, progress=progress)
    return BenchReport(config, spec, result, gate_failures(config, result))

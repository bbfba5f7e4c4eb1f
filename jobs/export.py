"""`export`: the artifact's dynamic model as an ONNX Runtime package (default `ARTIFACT/onnx/`).

`run` checks every option and the output path before the model loads, then builds, verifies and
swaps in the package (see `exporters.onnx_export`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from dyninfer.compressors.exit_policy import KV_MODES
from dyninfer.core.errors import check_choice
from dyninfer.core.progress import ProgressFn, silent
from dyninfer.exporters.onnx_export import DTYPES, ExportResult, export_dynamic, preflight
from dyninfer.exporters.onnx_runtime import PROVIDERS
from dyninfer.runtime.loader import load_dynamic

PACKAGE_DIR = "onnx"  # inside the artifact, unless `out` says otherwise


@dataclass
class ExportConfig:
    out: str | None = None  # the package directory; None: ARTIFACT/onnx
    provider: str = "cpu"  # the execution provider the package is for: cuda or cpu
    dtype: str = "fp32"  # fp16 is for the CUDA provider
    model: str | None = None  # load the base model from here instead (same weights)
    kv_mode: str | None = None  # override the policy's KV mode (the graph implements propagate)
    baseline: bool = True  # also export the plain model through optimum (for `bench` on ONNX)
    verify: bool = True  # check the package against torch on this machine's provider

    def validate(self) -> None:
        check_choice("provider", self.provider, PROVIDERS)
        check_choice("dtype", self.dtype, DTYPES)
        if self.kv_mode is not None:
            check_choice("kv_mode", self.kv_mode, KV_MODES)

    def target(self, artifact: str | os.PathLike) -> Path:
        return Path(self.out) if self.out else Path(artifact) / PACKAGE_DIR


def run(config: ExportConfig, artifact: str | os.PathLike, progress: ProgressFn | None = None) -> ExportResult:
    """Export the artifact at `artifact`; returns what was written and how it verified."""
    config.validate()
    target = config.target(artifact)
    preflight(target, config.provider, config.dtype, config.verify)
    report = progress or silent
    steps = 4 if config.baseline else 3
    report("loading the dynamic model", 0, steps)
    dyn = load_dynamic(str(artifact), config.model, require_policy=True, kv_mode=config.kv_mode)
    return export_dynamic(dyn, target, provider=config.provider, dtype=config.dtype, baseline=config.baseline,
                          verify=config.verify, progress=progress)

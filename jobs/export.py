"""`export`: the artifact's dynamic model as an ONNX Runtime package (default `ARTIFACT/onnx/`).

`run` checks every option and the output path before the model loads, then builds, verifies and
swaps in the package (see `exporters.onnx_export`).
"""

from __future__ import annotations

import os

from dyninfer.core.progress import ProgressFn, silent
from dyninfer.exporters.onnx_export import ExportResult, export_dynamic, preflight
from dyninfer.jobs.configs import ExportConfig
from dyninfer.runtime.loader import load_dynamic


def run(config: ExportConfig, artifact: str | os.PathLike, progress: ProgressFn | None = None) -> ExportResult:
    """Export the artifact at `artifact`; returns what was written and how it verified."""
    config.validate()
    target = config.target(artifact)
    preflight(target, config.provider, config.dtype, config.verify)
    report = progress or silent
    steps = (4 if config.baseline else 3) + (config.weights != "full")
    report("loading the dynamic model", 0, steps)
    dyn = load_dynamic(str(artifact), config.model, require_policy=True, kv_mode=config.kv_mode)
    return export_dynamic(
        dyn,
        target,
        provider=config.provider,
        dtype=config.dtype,
        baseline=config.baseline,
        verify=config.verify,
        weights=config.weights,
        block_size=config.block_size,
        progress=progress,
    )

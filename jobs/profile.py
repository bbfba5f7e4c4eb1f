"""`profile`: per-piece FLOPs, memory and latency, plus GPU power and energy.

The measured decode cost per piece is recorded in the artifact (`stages.profile.measured_cost`);
`calibrate` on that artifact uses it instead of FLOPs, so its predicted speedups are for
this machine. `save` writes the artifact and its `profile/` report folder.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dyninfer.core import stages
from dyninfer.core.artifacts import Artifact
from dyninfer.core.progress import ProgressFn
from dyninfer.core.records import ProfileRecord
from dyninfer.jobs.configs import ProfileConfig
from dyninfer.jobs.plots import profile_png
from dyninfer.profilers.layer_profile import LayerProfile, profile_layers, workloads
from dyninfer.profilers.nvml import GpuReport, GpuUnavailable, Nvml, measure_energy
from dyninfer.runtime.loader import ModelSession, workspace_for

REPORT_DIR = stages.PROFILE


@dataclass
class ProfileReport:
    config: ProfileConfig
    base_model: dict
    data: dict
    profile: LayerProfile
    gpu: GpuReport
    timings: dict = field(default_factory=dict)
    artifact: Artifact | None = None
    placement: dict | None = None  # where the model ran ({device, dtype})

    def summary(self) -> dict:
        return (
            {
                "command": "profile",
                "model": self.base_model,
                "data": self.data,
                "config": asdict(self.config),
                "timings": self.timings,
                "placement": self.placement,
            }
            | self.profile.to_dict()
            | {"gpu": self.gpu.to_dict()}
        )

    def figure(self) -> bytes:
        return profile_png(self.profile.pieces, f"{self.base_model['spec']}: cost per layer on {self.profile.device}")

    def files(self) -> dict[str, bytes]:
        """The profile/ report folder: the per-piece table (CSV, Parquet), the summary and the figure."""
        parquet = io.BytesIO()
        self.profile.pieces.to_parquet(parquet, index=False)
        return {
            "pieces.csv": self.profile.pieces.to_csv(index=False).encode(),
            "pieces.parquet": parquet.getvalue(),
            "summary.json": json.dumps(self.summary(), indent=2).encode(),
            "profile.png": self.figure(),
        }


def gpu_report(lm, prompt: torch.Tensor, device: torch.device, energy_seconds: float, nvml_module=None, synchronize=None) -> GpuReport:
    """NVML readings and energy per token for decode and prefill; a reason instead when no GPU."""
    if device.type != "cuda":
        return GpuReport(False, "no GPU: profiled on the CPU" + ("" if torch.cuda.is_available() else " (torch sees no CUDA GPU)"))
    try:
        gpu = Nvml.open(device.index or 0, module=nvml_module)
    except GpuUnavailable as exc:
        return GpuReport(False, f"no GPU readings: {exc}")
    try:
        energy = [
            measure_energy(gpu, label, run, min_seconds=energy_seconds, synchronize=synchronize or torch.cuda.synchronize)
            for label, run in workloads(lm, prompt).items()
        ]
        return GpuReport(True, device=gpu.reading(), energy=energy)  # memory read with the model loaded
    finally:
        gpu.close()


@torch.no_grad()
def run(
    config: ProfileConfig,
    progress: ProgressFn | None = None,
    existing: str | Artifact | None = None,
    session: ModelSession | None = None,
    nvml_module=None,
) -> ProfileReport:
    """Profile the model (with the artifact's steering and masks, when extending one) where it is loaded:
    `config.device` and `config.dtype`, or the shared `session`'s placement."""
    config.validate()
    torch.manual_seed(config.seed)
    ws = workspace_for(config, config.data, config.context, existing=existing, progress=progress, session=session)
    prompt = ws.windows.take("heldout", config.context, option="context")[:1, : config.context]
    profile = profile_layers(ws.lm, prompt, warmup=config.warmup, repeats=config.repeats, progress=progress)
    gpu = gpu_report(ws.lm, prompt, ws.lm.device, config.energy_seconds, nvml_module)
    ws.timings["profile_s"] = profile.seconds
    report = ProfileReport(
        config, ws.loaded.base_model_info(), ws.windows.describe(), profile, gpu, ws.timings, placement=ws.loaded.placement
    )
    # Pruning masks change what a layer costs: calibrate notes a profile taken before them.
    record = (
        {"config": asdict(config), "pruned": stages.PRUNE in ws.artifact.stages, "placement": ws.loaded.placement}
        | profile.to_dict()
        | {"gpu": gpu.to_dict()}
    )
    ProfileRecord.from_dict(record).write(ws.artifact)
    report.artifact = ws.artifact
    return report


def save(report: ProfileReport, out: str | os.PathLike, on_wait: Callable[[], None] | None = None) -> Path:
    """Save the artifact and its profile/ report folder."""
    return report.artifact.save(out, reports={REPORT_DIR: report.files()}, on_wait=on_wait)

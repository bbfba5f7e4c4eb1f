"""`profile` as a job: per-piece FLOPs, memory and latency, plus GPU power and energy.

The measured decode cost per piece is recorded in the artifact (`stages.profile.measured_cost`);
`calibrate` on that artifact uses it instead of FLOPs, so its predicted speedups are for
this machine.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dyninfer.artifacts import Artifact, write_report_dir
from dyninfer.compressors.pruning import PRUNE_STAGE
from dyninfer.data import DEFAULT_DATA
from dyninfer.errors import DyninferError
from dyninfer.models import DEFAULT_MODEL
from dyninfer.profilers.cost import CostModel
from dyninfer.profilers.layer_profile import LayerProfile, ProgressFn, profile_layers, workloads
from dyninfer.profilers.nvml import GpuReport, GpuUnavailable, Nvml, measure_energy
from dyninfer.workspace import open_workspace

PROFILE_STAGE = "profile"
REPORT_DIR = "profile"
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class ProfileConfig:
    model: str = DEFAULT_MODEL
    data: str = DEFAULT_DATA  # where the prompt comes from (pruned models' masks depend on the text)
    field: str | None = None
    context: int = 256  # prompt length of the prefill; cached tokens before the decode step
    warmup: int = 3
    repeats: int = 20
    device: str = "auto"
    energy_seconds: float = 3.0  # per energy window on a GPU
    seed: int = 0

    def validate(self) -> None:
        if self.device not in DEVICES:
            raise DyninferError(f"--device must be one of {', '.join(DEVICES)}, got '{self.device}'")
        for name, value, low in (("--context", self.context, 1), ("--warmup", self.warmup, 0),
                                 ("--repeats", self.repeats, 3)):
            if value < low:
                raise DyninferError(f"{name} must be at least {low}, got {value}")
        if not self.energy_seconds > 0:
            raise DyninferError(f"--energy-seconds must be positive, got {self.energy_seconds}")
        self.torch_device()

    def torch_device(self) -> torch.device:
        if self.device == "cuda" and not torch.cuda.is_available():
            raise DyninferError(f"--device cuda, but torch {torch.__version__} sees no CUDA GPU; use --device cpu")
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


@dataclass
class ProfileReport:
    config: ProfileConfig
    base_model: dict
    data: dict
    profile: LayerProfile
    gpu: GpuReport
    timings: dict = field(default_factory=dict)
    artifact: Artifact | None = None

    def summary(self) -> dict:
        return {"command": "profile", "model": self.base_model, "data": self.data, "config": asdict(self.config),
                "timings": self.timings} | self.profile.to_dict() | {"gpu": self.gpu.to_dict()}


def gpu_report(lm, prompt: torch.Tensor, device: torch.device, energy_seconds: float,
               nvml_module=None, synchronize=None) -> GpuReport:
    """NVML readings and energy per token for decode and prefill; a reason instead when no GPU."""
    if device.type != "cuda":
        return GpuReport(False, "no GPU: profiled on the CPU" + ("" if torch.cuda.is_available()
                                                                  else " (torch sees no CUDA GPU)"))
    try:
        gpu = Nvml.open(device.index or 0, module=nvml_module)
    except GpuUnavailable as exc:
        return GpuReport(False, f"no GPU readings: {exc}")
    try:
        energy = [measure_energy(gpu, label, run, min_seconds=energy_seconds,
                                 synchronize=synchronize or torch.cuda.synchronize)
                  for label, run in workloads(lm, prompt).items()]
        return GpuReport(True, device=gpu.reading(), energy=energy)  # memory read with the model loaded
    finally:
        gpu.close()


@torch.no_grad()
def run_profile_job(config: ProfileConfig, progress: ProgressFn | None = None, existing: str | Artifact | None = None,
                    nvml_module=None) -> ProfileReport:
    config.validate()
    torch.manual_seed(config.seed)
    ws = open_workspace(config.model, config.data, field=config.field, seq_len=config.context, seed=config.seed,
                        existing=existing, progress=progress)
    prompt = ws.windows.take("heldout", config.context, option="--context")[:1, : config.context]
    device = config.torch_device()
    ws.loaded.model.to(device)
    profile = profile_layers(ws.lm, prompt, warmup=config.warmup, repeats=config.repeats, progress=progress)
    gpu = gpu_report(ws.lm, prompt, device, config.energy_seconds, nvml_module)
    ws.timings["profile_s"] = profile.seconds
    report = ProfileReport(config, ws.loaded.base_model_info(), ws.windows.describe(), profile, gpu, ws.timings)
    # Pruning masks change what a layer costs: calibrate notes a profile taken before them.
    record = {"config": asdict(config), "pruned": PRUNE_STAGE in ws.artifact.stages} | profile.to_dict() \
        | {"gpu": gpu.to_dict()}
    ws.artifact.set_stage(PROFILE_STAGE, record)
    report.artifact = ws.artifact
    return report


def measured_cost(artifact: Artifact) -> CostModel | None:
    """The per-piece decode latency a `profile` recorded in this artifact, if any."""
    record = artifact.stages.get(PROFILE_STAGE)
    if not record or "measured_cost" not in record:
        return None
    return CostModel.from_dict(record["measured_cost"])


def profile_is_stale(artifact: Artifact) -> bool:
    """True when the artifact was pruned after its profile was measured (or the other way round)."""
    record = artifact.stages.get(PROFILE_STAGE) or {}
    return bool(record) and record.get("pruned", False) != (PRUNE_STAGE in artifact.stages)


def profile_files(report: ProfileReport) -> dict[str, bytes]:
    """The profile/ report folder: the per-piece table (CSV, Parquet) and the summary."""
    parquet = io.BytesIO()
    report.profile.pieces.to_parquet(parquet, index=False)
    return {
        "pieces.csv": report.profile.pieces.to_csv(index=False).encode(),
        "pieces.parquet": parquet.getvalue(),
        "summary.json": json.dumps(report.summary(), indent=2).encode(),
    }


def save_profile(report: ProfileReport, out_dir: str | os.PathLike, extra_files: dict[str, bytes] | None = None) -> Path:
    target = Path(report.artifact.save(out_dir))
    write_report_dir(target / REPORT_DIR, profile_files(report) | (extra_files or {}))
    return target

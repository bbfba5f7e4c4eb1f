"""`probe` as a job: load model and data, build the lenses, run the exit probe, record it.

The CLI and `audit` call `run_probe_job`; it returns data and an artifact to save, and
prints nothing.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dyninfer.artifacts import Artifact, write_report_dir
from dyninfer.data import DEFAULT_DATA
from dyninfer.errors import DyninferError
from dyninfer.models import DEFAULT_MODEL
from dyninfer.profilers.cost import CostModel, count_costs
from dyninfer.profilers.exit_probe import ProbeResult, ProgressFn, run_probe
from dyninfer.profilers.lenses import LENS_KINDS, LOGIT, TUNED, LogitLens, TunedLensTraining
from dyninfer.workspace import open_workspace

PROBE_STAGE = "probe"
REPORT_DIR = "probe"


@dataclass
class ProbeConfig:
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

    def validate(self) -> None:
        unknown = [k for k in self.lenses if k not in LENS_KINDS]
        if unknown or not self.lenses:
            raise DyninferError(f"unknown lens {', '.join(unknown) or '(none)'}; choose from: {', '.join(LENS_KINDS)}")
        for name, value, low in (
            ("--tokens", self.tokens, 1),
            ("--seq-len", self.seq_len, 2),
            ("--batch-size", self.batch_size, 1),
            ("--lens-train-tokens", self.lens_train_tokens, 1),
            ("--lens-steps", self.lens_steps, 0),
        ):
            if value < low:
                raise DyninferError(f"{name} must be at least {low}, got {value}")
        if self.lens_from and TUNED not in self.lenses:
            raise DyninferError("--lens-from only makes sense with --lens tuned")


@dataclass
class ProbeReport:
    config: ProbeConfig
    base_model: dict
    data: dict
    result: ProbeResult
    lens_training: TunedLensTraining | None
    timings: dict = field(default_factory=dict)
    artifact: Artifact | None = None

    def summary(self) -> dict:
        out = {
            "command": "probe",
            "model": self.base_model,
            "data": self.data,
            "config": asdict(self.config),
            "timings": self.timings,
        }
        out.update(self.result.summary())
        if self.lens_training is not None:
            out["tuned_lens_training"] = self.lens_training.to_dict()
        return out


def run_probe_job(config: ProbeConfig, progress: ProgressFn | None = None, existing: str | Artifact | None = None) -> ProbeReport:
    """Run the probe. `existing`: an artifact directory to extend (its base model must match)."""
    config.validate()
    torch.manual_seed(config.seed)
    ws = open_workspace(config.model, config.data, field=config.field, seq_len=config.seq_len, seed=config.seed,
                        existing=existing, progress=progress)
    heldout = ws.windows.take("heldout", config.tokens)  # raises early if the data is too short
    lm = ws.lm
    costs: CostModel = count_costs(lm, context=config.seq_len)
    # Both lenses side by side whenever both are available: the logit lens is free, and a
    # tuned lens already in the artifact being extended is reused rather than dropped.
    lenses: list = [LogitLens(lm)]
    training = None
    if TUNED in config.lenses:
        tuned, training = ws.tuned_lens(lens_from=config.lens_from, train_tokens=config.lens_train_tokens,
                                        steps=config.lens_steps, seed=config.seed, retrain=config.retrain_lens,
                                        progress=progress)
    else:
        tuned = ws.stored_tuned_lens()
    if tuned is not None:
        lenses.append(tuned)

    result = run_probe(lm, heldout, lenses, costs, batch_size=config.batch_size, progress=progress)
    ws.timings["probe_s"] = result.seconds
    report = ProbeReport(config, ws.loaded.base_model_info(), ws.windows.describe(), result, training, ws.timings)
    ws.artifact.set_stage(PROBE_STAGE, _stage_record(report))
    report.artifact = ws.artifact
    return report


def _stage_record(report: ProbeReport) -> dict:
    summary = report.summary()
    return {k: summary[k] for k in ("data", "config", "lenses", "cost_model", "throughput", "n_tokens")} | (
        {"tuned_lens_training": summary["tuned_lens_training"]} if "tuned_lens_training" in summary else {}
    )


def save_probe(report: ProbeReport, out_dir: str | os.PathLike, extra_files: dict[str, bytes] | None = None) -> Path:
    """Save the artifact and the report tables (CSV, Parquet, JSON) under OUT/probe/."""
    target = report.artifact.save(out_dir)
    write_report_dir(target / REPORT_DIR, probe_files(report) | (extra_files or {}))
    return target


def probe_files(report: ProbeReport) -> dict[str, bytes]:
    """The probe/ report folder: per-layer and depth tables (CSV, Parquet) and the summary."""
    parquet = io.BytesIO()
    report.result.layers.to_parquet(parquet, index=False)
    return {
        "layers.csv": report.result.layers.to_csv(index=False).encode(),
        "layers.parquet": parquet.getvalue(),
        "depth.csv": report.result.depth.to_csv(index=False).encode(),
        "summary.json": json.dumps(report.summary(), indent=2).encode(),
    }

"""`probe` as a job: load model and data, build the lenses, run the exit probe, record it.

The CLI and `audit` call `run_probe_job`; it returns data and an artifact to save, and
prints nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dyninfer.artifacts import Artifact, BaseModelInfo, artifact_exists
from dyninfer.data import DEFAULT_DATA, load_windows
from dyninfer.errors import DyninferError
from dyninfer.models import DEFAULT_MODEL, load_model
from dyninfer.profilers.cost import CostModel, count_costs
from dyninfer.profilers.exit_probe import ProbeResult, ProgressFn, run_probe
from dyninfer.profilers.lenses import (
    LENS_KINDS,
    LOGIT,
    TUNED,
    TUNED_LENS_GROUP,
    LogitLens,
    TunedLens,
    TunedLensTraining,
    train_tuned_lens,
)

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


def _tuned_lens(config: ProbeConfig, loaded, windows, progress) -> tuple[TunedLens, TunedLensTraining | None]:
    lm = loaded.layered
    if config.lens_from:
        source = Artifact.load(config.lens_from, expect_model_hash=loaded.content_hash)
        return TunedLens.from_tensors(lm, source.tensors.get(TUNED_LENS_GROUP, {})), None
    train = windows.take("train", config.lens_train_tokens)
    return train_tuned_lens(lm, train, steps=config.lens_steps, seed=config.seed, progress=progress)


def run_probe_job(config: ProbeConfig, progress: ProgressFn | None = None, existing: str | None = None) -> ProbeReport:
    """Run the probe. `existing`: an artifact directory to extend (its base model must match)."""
    config.validate()
    torch.manual_seed(config.seed)
    report = progress or (lambda *a: None)
    timings: dict[str, float] = {}

    started = time.perf_counter()
    report("loading model", 0, 1)
    loaded = load_model(config.model)
    report("loading model", 1, 1)
    timings["load_model_s"] = time.perf_counter() - started
    previous = None
    if existing and artifact_exists(existing):
        previous = Artifact.load(existing, expect_model_hash=loaded.content_hash)

    started = time.perf_counter()
    windows = load_windows(config.data, loaded.tokenizer, field=config.field, seq_len=config.seq_len, seed=config.seed)
    heldout = windows.take("heldout", config.tokens)  # raises early if the data is too short
    timings["load_data_s"] = time.perf_counter() - started

    lm = loaded.layered
    costs: CostModel = count_costs(lm, context=config.seq_len)
    # Both lenses side by side whenever both are available: the logit lens is free, and a
    # tuned lens already in the artifact being extended is reused rather than dropped.
    lenses, training, tuned = [LogitLens(lm)], None, None
    if TUNED in config.lenses:
        started = time.perf_counter()
        tuned, training = _tuned_lens(config, loaded, windows, report)
        timings["tuned_lens_s"] = time.perf_counter() - started
    elif previous is not None and previous.tensors.get(TUNED_LENS_GROUP):
        tuned = TunedLens.from_tensors(lm, previous.tensors[TUNED_LENS_GROUP])
    if tuned is not None:
        lenses.append(tuned)

    result = run_probe(lm, heldout, lenses, costs, batch_size=config.batch_size, progress=report)
    timings["probe_s"] = result.seconds

    probe_report = ProbeReport(config, loaded.base_model_info(), windows.describe(), result, training, timings)
    artifact = previous or Artifact(BaseModelInfo.from_dict(loaded.base_model_info()), tokenizer=config.model)
    artifact.set_stage(PROBE_STAGE, _stage_record(probe_report))
    if tuned is not None:
        artifact.put_tensors(TUNED_LENS_GROUP, tuned.tensors())
    probe_report.artifact = artifact
    return probe_report


def _stage_record(report: ProbeReport) -> dict:
    summary = report.summary()
    return {k: summary[k] for k in ("data", "config", "lenses", "cost_model", "throughput", "n_tokens")} | (
        {"tuned_lens_training": summary["tuned_lens_training"]} if "tuned_lens_training" in summary else {}
    )


def save_probe(report: ProbeReport, out_dir: str | os.PathLike, extra_files: dict[str, bytes] | None = None) -> Path:
    """Save the artifact and the report tables (CSV, Parquet, JSON) under OUT/probe/."""
    target = report.artifact.save(out_dir)
    reports = target / REPORT_DIR
    tmp = Path(tempfile.mkdtemp(prefix=".probe.tmp-", dir=target))
    try:
        report.result.layers.to_csv(tmp / "layers.csv", index=False)
        report.result.layers.to_parquet(tmp / "layers.parquet", index=False)
        report.result.depth.to_csv(tmp / "depth.csv", index=False)
        (tmp / "summary.json").write_text(json.dumps(report.summary(), indent=2))
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        if reports.exists():
            shutil.rmtree(reports)
        os.replace(tmp, reports)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target

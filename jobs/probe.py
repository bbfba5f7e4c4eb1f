"""`probe`: load model and data, build the lenses, run the exit probe, record it.

`run` returns a `ProbeReport` (with the artifact to save) and prints nothing; `save` writes the
artifact and its `probe/` report folder (per-layer and depth tables, summary, probe.png).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dyninfer.core import distributed, stages
from dyninfer.core.artifacts import Artifact
from dyninfer.core.choices import TUNED
from dyninfer.core.cost import CostModel, count_costs
from dyninfer.core.lenses import LogitLens, TunedLensTraining
from dyninfer.core.memory import peak_memory
from dyninfer.core.progress import ProgressFn
from dyninfer.core.records import ProbeRecord
from dyninfer.jobs.configs import ProbeConfig
from dyninfer.jobs.plots import probe_figure_png
from dyninfer.profilers.exit_probe import ProbeResult, run_probe
from dyninfer.runtime.loader import ModelSession, lens_to_train, workspace_for

REPORT_DIR = stages.PROBE


@dataclass
class ProbeReport:
    config: ProbeConfig
    base_model: dict
    data: dict
    result: ProbeResult
    lens_training: TunedLensTraining | None
    timings: dict = field(default_factory=dict)
    artifact: Artifact | None = None
    placement: dict | None = None  # where the model ran ({device, dtype})
    memory: dict | None = None  # peak RSS (and CUDA memory) of the process, and the weights' size, in MiB

    def summary(self) -> dict:
        out = {
            "command": "probe",
            "model": self.base_model,
            "data": self.data,
            "config": asdict(self.config),
            "timings": self.timings,
            "placement": self.placement,
            "memory": self.memory,
        }
        out.update(self.result.summary())
        if self.lens_training is not None:
            out["tuned_lens_training"] = self.lens_training.to_dict()
        return out

    def figure(self) -> bytes:
        return probe_figure_png(self.result.layers, f"{self.base_model['spec']} on {self.data['spec']}: exit accuracy per layer")

    def files(self) -> dict[str, bytes]:
        """The probe/ report folder: per-layer and depth tables (CSV, Parquet), the summary and the figure."""
        parquet = io.BytesIO()
        self.result.layers.to_parquet(parquet, index=False)
        return {
            "layers.csv": self.result.layers.to_csv(index=False).encode(),
            "layers.parquet": parquet.getvalue(),
            "depth.csv": self.result.depth.to_csv(index=False).encode(),
            "summary.json": json.dumps(self.summary(), indent=2).encode(),
            "probe.png": self.figure(),
        }


def check_data(config: ProbeConfig, windows, stored: Artifact | None) -> None:
    """The held-out tokens to probe, and the train tokens of a tuned lens it will train, are in the data."""
    windows.take("heldout", config.tokens)
    if TUNED in config.lenses and lens_to_train(stored, config.lens_from, config.retrain_lens):
        windows.take_rows("train", config.lens_train_tokens, option="lens_train_tokens")


def run(
    config: ProbeConfig, progress: ProgressFn | None = None, existing: str | Artifact | None = None, session: ModelSession | None = None
) -> ProbeReport:
    """Run the probe. `existing`: an artifact (or its directory) to extend; its base model must match."""
    config.validate()
    torch.manual_seed(config.seed)
    ws = workspace_for(
        config,
        config.data,
        config.seq_len,
        existing=existing,
        progress=progress,
        session=session,
        check_data=lambda windows, stored: check_data(config, windows, stored),
    )
    heldout = ws.windows.take("heldout", config.tokens)
    world = distributed.current()  # data-parallel: this rank probes every size-th held-out window
    heldout = heldout[world.shard(heldout.shape[0], "held-out windows")]
    lm = ws.lm
    costs: CostModel = count_costs(lm, context=config.seq_len)
    # Both lenses side by side whenever both are available: the logit lens is free, and a
    # tuned lens already in the artifact being extended is reused rather than dropped.
    lenses: list = [LogitLens(lm)]
    training = None
    if TUNED in config.lenses:
        tuned, training = ws.tuned_lens(
            lens_from=config.lens_from,
            train_tokens=config.lens_train_tokens,
            steps=config.lens_steps,
            seed=config.seed,
            retrain=config.retrain_lens,
            progress=progress,
        )
    else:
        tuned = ws.stored_tuned_lens()
    if tuned is not None:
        lenses.append(tuned)

    result = run_probe(
        lm,
        heldout,
        lenses,
        costs,
        batch_size=config.batch_size,
        memory_budget=config.memory_budget_mib * 2**20,
        progress=progress,
        world=world,
    )
    ws.timings["probe_s"] = result.seconds
    report = ProbeReport(
        config,
        ws.loaded.base_model_info(),
        ws.windows.describe(),
        result,
        training,
        ws.timings,
        placement=ws.loaded.placement,
        memory=peak_memory(lm.model),
    )
    ProbeRecord.from_dict(_stage_record(report)).write(ws.artifact)
    report.artifact = ws.artifact
    return report


def _stage_record(report: ProbeReport) -> dict:
    summary = report.summary()
    return {k: summary[k] for k in ("data", "config", "lenses", "cost_model", "throughput", "n_tokens", "placement")} | (
        {"tuned_lens_training": summary["tuned_lens_training"]} if "tuned_lens_training" in summary else {}
    )


def save(report: ProbeReport, out: str | os.PathLike, on_wait: Callable[[], None] | None = None) -> Path:
    """Save the artifact and its probe/ report folder."""
    return report.artifact.save(out, reports={REPORT_DIR: report.files()}, on_wait=on_wait)

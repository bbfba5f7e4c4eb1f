"""`calibrate`: workspace -> lens -> calibration -> policy recorded in the artifact.

`save` writes the artifact and its `calibrate/` report folder (the threshold curve as CSV and PNG,
the summary).
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch

from dyninfer.compressors.confidence import MEASURES
from dyninfer.compressors.exit_policy import KV_MODES, RISKS, CalibrationResult, run_calibrations
from dyninfer.core import stages
from dyninfer.core.artifacts import Artifact
from dyninfer.core.cost import count_costs, measured_cost, profile_is_stale, speedup_basis
from dyninfer.core.data import DEFAULT_DATA
from dyninfer.core.errors import DyninferError, check_at_least, check_between, check_choice, option
from dyninfer.core.lenses import LENS_KINDS, TUNED, LogitLens
from dyninfer.core.models import DEFAULT_MODEL
from dyninfer.core.progress import ProgressFn
from dyninfer.jobs.plots import calibration_curve_png
from dyninfer.runtime.loader import ModelSession, open_workspace

REPORT_DIR = stages.CALIBRATE
# auto: the latency a `profile` measured on this artifact when there is one, else FLOPs.
COST_SOURCES = ("auto", "flops", "measured")


@dataclass
class CalibrateConfig:
    model: str = DEFAULT_MODEL
    data: str = DEFAULT_DATA
    field: str | None = None
    seq_len: int = 256
    seed: int = 0
    lens: str = TUNED
    # CALM's learned classifier reads the hidden state: a check costs ~2d FLOPs instead of the
    # LM head, which on small models costs more than the layers an exit can save.
    measure: str = "classifier"
    target: float = 0.95
    epsilon: float = 0.05
    risk: str = "consistency"
    block: int = 16
    fit_tokens: int = 2048
    calibration_tokens: int = 8192
    heldout_tokens: int = 4096
    vocab_top_k: int = 0
    min_layer: int | None = None
    max_points: int = 8
    kv_mode: str = "propagate"
    lens_from: str | None = None
    lens_train_tokens: int = 16384
    lens_steps: int = 60
    cost: str = "auto"
    # More targets to calibrate on the same traces (reported; the artifact keeps `target`'s policy).
    extra_targets: tuple[float, ...] = ()

    def validate(self) -> None:
        for name, allowed in (("lens", LENS_KINDS), ("measure", MEASURES), ("risk", RISKS), ("kv_mode", KV_MODES),
                              ("cost", COST_SOURCES)):
            check_choice(name, getattr(self, name), allowed)
        for name, value in (("target", self.target), ("epsilon", self.epsilon),
                            *(("extra_targets", t) for t in self.extra_targets)):
            check_between(name, value, 0.0, 1.0)
        for name, low in (("block", 1), ("fit_tokens", 1), ("calibration_tokens", 1), ("heldout_tokens", 1),
                          ("vocab_top_k", 0), ("max_points", 1), ("seq_len", 2)):
            check_at_least(name, getattr(self, name), low)


@dataclass
class CalibrateReport:
    config: CalibrateConfig
    base_model: dict
    data: dict
    result: CalibrationResult
    timings: dict
    artifact: Artifact | None = None
    cost_model: dict | None = None  # the cost model the exit points were chosen with
    others: list[CalibrationResult] = field(default_factory=list)  # one per config.extra_targets

    @property
    def cost_unit(self) -> str:
        """What predicted speedups are ratios of: "latency" (a measured profile) or "FLOPs"."""
        return speedup_basis(self.cost_model)

    def summary(self) -> dict:
        out = {"command": "calibrate", "model": self.base_model, "data": self.data, "config": asdict(self.config),
               "timings": self.timings} | self.result.to_dict()
        if self.cost_model is not None:
            out["cost_model"] = self.cost_model
        if self.others:
            out["other_targets"] = [_brief(r) for r in self.others]
        return out

    def figure(self) -> bytes:
        return calibration_curve_png(self.result, f"{self.base_model['spec']} on {self.data['spec']}", self.others,
                                     self.cost_unit)

    def files(self) -> dict[str, bytes]:
        """The calibrate/ report folder: the threshold curve (CSV, PNG) and the summary."""
        curve = io.StringIO()
        pd.DataFrame([vars(c) for c in self.result.curve]).to_csv(curve, index=False)
        return {
            "curve.csv": curve.getvalue().encode(),
            "summary.json": json.dumps(self.summary(), indent=2, default=str).encode(),
            "curve.png": self.figure(),
        }


def _brief(result: CalibrationResult) -> dict:
    """A policy at another target: what it decided and what it achieved on held-out data."""
    return {"target": result.target, "policy": result.policy.to_dict(), "heldout": result.heldout,
            "naive_heldout": result.naive_heldout, "statement": result.ltt.statement(), "notes": result.notes}


def choose_costs(config: CalibrateConfig, lm, artifact: Artifact) -> tuple:
    """(cost model, notes): measured latency from the artifact's profile, or FLOPs."""
    measured = measured_cost(artifact) if config.cost != "flops" else None
    if config.cost == "measured" and measured is None:
        raise DyninferError(f"{option('cost')} measured needs a profile in the artifact: run `dyninfer profile` "
                            f"into it first, or use {option('cost')} flops")
    if measured is None:
        return count_costs(lm, context=config.seq_len), []
    notes = [f"exit points chosen with the decode latency measured by `profile` ({measured.source}); "
             "predicted speedups are for that machine"]
    if measured.num_layers != lm.num_layers:
        raise DyninferError(f"the artifact's profile has {measured.num_layers} layers but the model has "
                            f"{lm.num_layers}; re-run `dyninfer profile` on this artifact")
    if profile_is_stale(artifact):
        notes.append("the profile was measured before the artifact's pruning masks changed the model; re-run "
                     "`dyninfer profile` on it for predictions that match")
    if measured.context != config.seq_len:
        notes.append(f"the profile measured decoding at context {measured.context}, calibration uses "
                     f"{option('seq_len')} {config.seq_len}")
    return measured, notes


def run(config: CalibrateConfig, progress: ProgressFn | None = None, existing: str | Artifact | None = None,
        session: ModelSession | None = None) -> CalibrateReport:
    """Calibrate the policy at `config.target` (and `extra_targets`); the artifact keeps the first."""
    config.validate()
    torch.manual_seed(config.seed)
    ws = open_workspace(config.model, config.data, field=config.field, seq_len=config.seq_len, seed=config.seed,
                        existing=existing, progress=progress, session=session)
    lm, windows = ws.lm, ws.windows
    n_fit = math.ceil(config.fit_tokens / config.seq_len)
    n_cal = math.ceil(config.calibration_tokens / config.seq_len)
    n_train = windows.train.shape[0]
    if n_fit + n_cal > n_train:
        raise DyninferError(
            f"the train split of '{config.data}' has {n_train} windows of {config.seq_len} tokens but fitting and "
            f"calibration need {n_fit + n_cal}; lower {option('fit_tokens')}/{option('calibration_tokens')} or "
            "use more data"
        )
    heldout = windows.take("heldout", config.heldout_tokens, option="heldout_tokens")
    # Calibration windows come from the end of the train split; the tuned lens trains on its start.
    fit, calibration = windows.train[n_train - n_fit - n_cal : n_train - n_cal], windows.train[n_train - n_cal :]
    notes = []
    if config.lens == TUNED:
        lens, training = ws.tuned_lens(lens_from=config.lens_from, train_tokens=config.lens_train_tokens,
                                       steps=config.lens_steps, seed=config.seed, progress=progress)
        n_lens = math.ceil(config.lens_train_tokens / config.seq_len)
        if training is not None and n_lens > n_train - n_fit - n_cal:
            notes.append("the tuned lens was trained on windows that are also calibration windows; the guarantee "
                         f"is optimistic. Use more data or fewer {option('lens_train_tokens')}")
    else:
        lens = LogitLens(lm)
    costs, cost_notes = choose_costs(config, lm, ws.artifact)
    notes += cost_notes
    targets = [config.target, *config.extra_targets]
    results = run_calibrations(
        lm, lens, costs, fit, calibration, heldout, targets=targets, measure=config.measure,
        epsilon=config.epsilon, risk=config.risk, block=config.block, vocab_top_k=config.vocab_top_k,
        min_layer=config.min_layer, max_points=config.max_points, progress=progress,
    )
    (result, classifier), others = results[0], [r for r, _ in results[1:]]
    for other in others:
        other.policy.kv_mode = config.kv_mode
    result.policy.kv_mode = config.kv_mode
    result.notes += notes
    report = CalibrateReport(config, ws.loaded.base_model_info(), windows.describe(), result, ws.timings,
                             cost_model=costs.to_dict(), others=others)
    ws.artifact.set_stage(stages.CALIBRATE, report.summary())
    # The exits group holds the tuned lens and, for the classifier measure, this policy's classifier.
    exits = {k: v for k, v in ws.artifact.tensors.get(stages.EXITS_GROUP, {}).items() if not k.startswith("classifier.")}
    if classifier is not None:
        exits.update(classifier.tensors())
    if exits:
        ws.artifact.put_tensors(stages.EXITS_GROUP, exits)
    report.artifact = ws.artifact
    return report


def save(report: CalibrateReport, out: str | os.PathLike, on_wait: Callable[[], None] | None = None) -> Path:
    """Save the artifact (policy, classifier) and its calibrate/ report folder."""
    return report.artifact.save(out, reports={REPORT_DIR: report.files()}, on_wait=on_wait)

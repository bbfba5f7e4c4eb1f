"""`calibrate` as a job: workspace -> lens -> calibration -> policy recorded in the artifact."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from dyninfer.artifacts import Artifact
from dyninfer.compressors.calibrate import RISKS, CalibrationResult, run_calibration
from dyninfer.compressors.confidence import MEASURES
from dyninfer.data import DEFAULT_DATA
from dyninfer.errors import DyninferError
from dyninfer.models import DEFAULT_MODEL
from dyninfer.profilers.cost import count_costs
from dyninfer.profilers.lenses import LENS_KINDS, TUNED, TUNED_LENS_GROUP, LogitLens
from dyninfer.workspace import ProgressFn, open_workspace

CALIBRATE_STAGE = "calibrate"
KV_MODES = ("propagate", "recompute")


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

    def validate(self) -> None:
        choices = (("--lens", self.lens, LENS_KINDS), ("--measure", self.measure, MEASURES),
                   ("--risk", self.risk, RISKS), ("--kv-mode", self.kv_mode, KV_MODES))
        for name, value, allowed in choices:
            if value not in allowed:
                raise DyninferError(f"{name} must be one of {', '.join(allowed)}, got '{value}'")
        for name, value in (("--target", self.target), ("--epsilon", self.epsilon)):
            if not 0.0 < value < 1.0:
                raise DyninferError(f"{name} must be between 0 and 1 (exclusive), got {value}")
        for name, value, low in (("--block", self.block, 1), ("--fit-tokens", self.fit_tokens, 1),
                                 ("--calibration-tokens", self.calibration_tokens, 1),
                                 ("--heldout-tokens", self.heldout_tokens, 1), ("--vocab-top-k", self.vocab_top_k, 0),
                                 ("--max-points", self.max_points, 1), ("--seq-len", self.seq_len, 2)):
            if value < low:
                raise DyninferError(f"{name} must be at least {low}, got {value}")


@dataclass
class CalibrateReport:
    config: CalibrateConfig
    base_model: dict
    data: dict
    result: CalibrationResult
    timings: dict
    artifact: Artifact | None = None

    def summary(self) -> dict:
        return {"command": "calibrate", "model": self.base_model, "data": self.data, "config": asdict(self.config),
                "timings": self.timings} | self.result.to_dict()


def run_calibrate_job(config: CalibrateConfig, progress: ProgressFn | None = None,
                      existing: str | None = None) -> CalibrateReport:
    config.validate()
    torch.manual_seed(config.seed)
    ws = open_workspace(config.model, config.data, field=config.field, seq_len=config.seq_len, seed=config.seed,
                        existing=existing, progress=progress)
    lm, windows = ws.lm, ws.windows
    n_fit = math.ceil(config.fit_tokens / config.seq_len)
    n_cal = math.ceil(config.calibration_tokens / config.seq_len)
    n_train = windows.train.shape[0]
    if n_fit + n_cal > n_train:
        raise DyninferError(
            f"the train split of '{config.data}' has {n_train} windows of {config.seq_len} tokens but fitting and "
            f"calibration need {n_fit + n_cal}; lower --fit-tokens/--calibration-tokens or use more data"
        )
    heldout = windows.take("heldout", config.heldout_tokens, option="--heldout-tokens")
    # Calibration windows come from the end of the train split; the tuned lens trains on its start.
    fit, calibration = windows.train[n_train - n_fit - n_cal : n_train - n_cal], windows.train[n_train - n_cal :]
    notes = []
    if config.lens == TUNED:
        lens, training = ws.tuned_lens(lens_from=config.lens_from, train_tokens=config.lens_train_tokens,
                                       steps=config.lens_steps, seed=config.seed, progress=progress)
        n_lens = math.ceil(config.lens_train_tokens / config.seq_len)
        if training is not None and n_lens > n_train - n_fit - n_cal:
            notes.append("the tuned lens was trained on windows that are also calibration windows; the guarantee "
                         "is optimistic. Use more data or fewer --lens-train-tokens")
    else:
        lens = LogitLens(lm)
    costs = count_costs(lm, context=config.seq_len)
    result, classifier = run_calibration(
        lm, lens, costs, fit, calibration, heldout, measure=config.measure, target=config.target,
        epsilon=config.epsilon, risk=config.risk, block=config.block, vocab_top_k=config.vocab_top_k,
        min_layer=config.min_layer, max_points=config.max_points, progress=progress,
    )
    result.policy.kv_mode = config.kv_mode
    result.notes += notes
    report = CalibrateReport(config, ws.loaded.base_model_info(), windows.describe(), result, ws.timings)
    ws.artifact.set_stage(CALIBRATE_STAGE, report.summary() | {"cost_model": costs.to_dict()})
    # The exits group holds the tuned lens and, for the classifier measure, this policy's classifier.
    exits = {k: v for k, v in ws.artifact.tensors.get(TUNED_LENS_GROUP, {}).items() if not k.startswith("classifier.")}
    if classifier is not None:
        exits.update(classifier.tensors())
    if exits:
        ws.artifact.put_tensors(TUNED_LENS_GROUP, exits)
    report.artifact = ws.artifact
    return report

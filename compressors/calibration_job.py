"""`calibrate` as a job: workspace -> lens -> calibration -> policy recorded in the artifact."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from dyninfer.artifacts import Artifact
from dyninfer.compressors.calibrate import RISKS, CalibrationResult, run_calibrations
from dyninfer.compressors.confidence import MEASURES
from dyninfer.data import DEFAULT_DATA
from dyninfer.errors import DyninferError
from dyninfer.models import DEFAULT_MODEL
from dyninfer.profilers.cost import count_costs, speedup_basis
from dyninfer.profilers.lenses import LENS_KINDS, TUNED, TUNED_LENS_GROUP, LogitLens
from dyninfer.profilers.profile import measured_cost, profile_is_stale
from dyninfer.workspace import ProgressFn, open_workspace

CALIBRATE_STAGE = "calibrate"
KV_MODES = ("propagate", "recompute")
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
        choices = (("--lens", self.lens, LENS_KINDS), ("--measure", self.measure, MEASURES),
                   ("--risk", self.risk, RISKS), ("--kv-mode", self.kv_mode, KV_MODES),
                   ("--cost", self.cost, COST_SOURCES))
        for name, value, allowed in choices:
            if value not in allowed:
                raise DyninferError(f"{name} must be one of {', '.join(allowed)}, got '{value}'")
        for name, value in (("--target", self.target), ("--epsilon", self.epsilon),
                            *(("--targets", t) for t in self.extra_targets)):
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


def _brief(result: CalibrationResult) -> dict:
    """A policy at another target: what it decided and what it achieved on held-out data."""
    return {"target": result.target, "policy": result.policy.to_dict(), "heldout": result.heldout,
            "naive_heldout": result.naive_heldout, "statement": result.ltt.statement(), "notes": result.notes}


def choose_costs(config: CalibrateConfig, lm, artifact: Artifact) -> tuple:
    """(cost model, notes): measured latency from the artifact's profile, or FLOPs."""
    measured = measured_cost(artifact) if config.cost != "flops" else None
    if config.cost == "measured" and measured is None:
        raise DyninferError("--cost measured needs a profile in the artifact: run `dyninfer profile --out DIR` "
                            "on it first, or use --cost flops")
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
                     f"--seq-len {config.seq_len}")
    return measured, notes


def run_calibrate_job(config: CalibrateConfig, progress: ProgressFn | None = None,
                      existing: str | Artifact | None = None) -> CalibrateReport:
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
    ws.artifact.set_stage(CALIBRATE_STAGE, report.summary())
    # The exits group holds the tuned lens and, for the classifier measure, this policy's classifier.
    exits = {k: v for k, v in ws.artifact.tensors.get(TUNED_LENS_GROUP, {}).items() if not k.startswith("classifier.")}
    if classifier is not None:
        exits.update(classifier.tensors())
    if exits:
        ws.artifact.put_tensors(TUNED_LENS_GROUP, exits)
    report.artifact = ws.artifact
    return report

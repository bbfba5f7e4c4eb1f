"""`audit` as a job: probe, profile and calibrate (and prune / export when asked) in one go.

The stages chain in memory on one artifact: an existing artifact's stages (a tuned lens,
masks, steering) are used, the probe's tuned lens is reused by calibration, and the
profile's measured latency is calibration's cost model. The result is data: the stage
reports, headline numbers and the CI gates; `cli/audit.py` writes the report directory.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass, field


from dyninfer.artifacts import Artifact
from dyninfer.compressors.calibration_job import CalibrateConfig, CalibrateReport, run_calibrate_job
from dyninfer.compressors.prune_job import PruneConfig, PruneReport, run_prune_job
from dyninfer.compressors.steering import METHODS as STEER_METHODS
from dyninfer.compressors.steer_job import ExtractConfig, SweepJob, run_extract, run_sweep_job
from dyninfer.data import DEFAULT_DATA
from dyninfer.errors import DyninferError
from dyninfer.models import DEFAULT_MODEL
from dyninfer.profilers.exit_probe import oracle_saving
from dyninfer.profilers.lenses import LOGIT, TUNED
from dyninfer.profilers.probe import ProbeConfig, ProbeReport, run_probe_job
from dyninfer.profilers.profile import ProfileConfig, ProfileReport, run_profile_job
from dyninfer.workspace import ProgressFn

AUDIT_STAGE = "audit"
# Stages other commands record that the audit report summarises when the artifact has them.
REPORTED_STAGES = ("prune", "steer", "export")
# α values a steering check sweeps by default: around where each method starts to act (README, steer).
STEER_ALPHAS = {"activation": (0.25, 0.5, 1.0), "valve": (0.1, 0.2, 0.5)}


@dataclass
class Gates:
    """CI gates; None = not checked. Exit code 1 when any checked gate fails."""

    min_oracle_saving: float | None = None  # best lens's oracle FLOP saving (probe)
    min_speedup: float | None = None  # predicted held-out speedup of the certified policy at --target
    min_consistency: float | None = None  # held-out token consistency of that policy

    def validate(self) -> None:
        for name, value in (("--min-oracle-saving", self.min_oracle_saving),
                            ("--min-consistency", self.min_consistency)):
            if value is not None and not 0.0 <= value <= 1.0:
                raise DyninferError(f"{name} must be between 0 and 1, got {value}")
        if self.min_speedup is not None and not self.min_speedup > 0:
            raise DyninferError(f"--min-speedup must be positive, got {self.min_speedup}")


@dataclass
class GateResult:
    name: str
    threshold: float
    value: float
    passed: bool
    measures: str


@dataclass
class AuditConfig:
    model: str = DEFAULT_MODEL
    data: str = DEFAULT_DATA
    field: str | None = None
    seq_len: int = 256
    seed: int = 0
    lens: str = TUNED  # tuned: trains (or reuses) a tuned lens; logit: training-free and faster
    # Defaults sized so the bundled model's audit takes minutes on 2 CPU cores (the README says how many).
    probe_tokens: int = 1024
    lens_train_tokens: int = 4096
    lens_steps: int = 30
    target: float = 0.95  # the policy the artifact keeps and the gates judge
    extra_targets: tuple[float, ...] = (0.9, 0.99)
    epsilon: float = 0.05
    measure: str = "classifier"
    fit_tokens: int = 2048
    calibration_tokens: int = 4096
    heldout_tokens: int = 1024
    repeats: int = 10
    device: str = "auto"
    energy_seconds: float = 3.0
    prune: bool = False
    prune_sparsity: float = 0.5
    export: bool = False
    steer: str | None = None  # activation or valve: extract a CoT-length direction and sweep it
    steer_alphas: tuple[float, ...] = ()  # default: STEER_ALPHAS[steer]
    steer_examples: int = 32
    steer_questions: int = 8
    steer_max_new_tokens: int = 128  # the sweep's own default: the bundled model's chains run past 96
    gates: Gates = dataclasses.field(default_factory=Gates)  # `field` is the text-field option here

    def probe_config(self) -> ProbeConfig:
        return ProbeConfig(model=self.model, data=self.data, field=self.field, seq_len=self.seq_len, seed=self.seed,
                           lenses=(LOGIT, TUNED) if self.lens == TUNED else (LOGIT,), tokens=self.probe_tokens,
                           lens_train_tokens=self.lens_train_tokens, lens_steps=self.lens_steps)

    def profile_config(self) -> ProfileConfig:
        return ProfileConfig(model=self.model, data=self.data, field=self.field, context=self.seq_len,
                             repeats=self.repeats, warmup=2, device=self.device, energy_seconds=self.energy_seconds,
                             seed=self.seed)

    def calibrate_config(self) -> CalibrateConfig:
        return CalibrateConfig(model=self.model, data=self.data, field=self.field, seq_len=self.seq_len,
                               seed=self.seed, lens=self.lens, measure=self.measure, target=self.target,
                               epsilon=self.epsilon, fit_tokens=self.fit_tokens,
                               calibration_tokens=self.calibration_tokens, heldout_tokens=self.heldout_tokens,
                               lens_train_tokens=self.lens_train_tokens, lens_steps=self.lens_steps,
                               extra_targets=tuple(t for t in self.extra_targets if t != self.target))

    def prune_config(self) -> PruneConfig:
        return PruneConfig(model=self.model, data=self.data, field=self.field, seq_len=self.seq_len, seed=self.seed,
                           sparsity=self.prune_sparsity, heldout_tokens=self.heldout_tokens)

    def extract_config(self) -> ExtractConfig:
        return ExtractConfig(model=self.model, method=self.steer, examples=self.steer_examples,
                             heldout=self.steer_questions, seed=self.seed)

    def alphas(self) -> list[float]:
        return list(self.steer_alphas or STEER_ALPHAS.get(self.steer, ()))

    def validate(self) -> None:
        """Every stage's options, before any model loads."""
        self.gates.validate()
        if self.steer is not None:
            if self.steer not in STEER_METHODS:
                raise DyninferError(f"--steer must be one of {', '.join(STEER_METHODS)}, got '{self.steer}'")
            self.extract_config().validate()
            if self.steer_max_new_tokens < 1:
                raise DyninferError(f"--steer-max-new-tokens must be at least 1, got {self.steer_max_new_tokens}")
        if self.lens not in (LOGIT, TUNED):
            raise DyninferError(f"--lens must be logit or tuned, got '{self.lens}'")
        self.probe_config().validate()
        self.profile_config().validate()
        self.calibrate_config().validate()
        if self.prune:
            self.prune_config().validate()


@dataclass
class AuditReport:
    config: AuditConfig
    probe: ProbeReport
    profile: ProfileReport
    calibration: CalibrateReport
    prune: PruneReport | None = None
    steer: SweepJob | None = None
    export: dict | None = None
    timings: dict[str, float] = field(default_factory=dict)
    gates: list[GateResult] = field(default_factory=list)
    artifact: Artifact | None = None

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def oracle(self) -> dict[str, dict]:
        """Per lens: mean prediction depth, oracle saving in FLOPs and in measured decode time."""
        result = self.probe.result
        measured = self.profile.profile.measured
        out = {}
        for lens in result.lenses():
            counts = result.depth[result.depth["lens"] == lens]["tokens"].to_numpy(dtype=float)
            flops = result.oracle[lens]
            timed = oracle_saving(counts, measured, translated=lens == TUNED)
            out[lens] = {"mean_depth": flops.mean_depth, "flop_saving": flops.saving, "latency_saving": timed.saving}
        return out

    def targets(self) -> list[dict]:
        """One row per calibrated target: the policy and what it achieved on held-out data."""
        rows = []
        for r in [self.calibration.result, *self.calibration.others]:
            held = r.heldout
            rows.append({"target": r.target, "exit_points": r.policy.exit_points, "threshold": r.policy.threshold,
                         "consistency": held["consistency"], "accuracy": held["accuracy"],
                         "predicted_speedup": held["predicted_speedup"], "mean_exit_layer": held["mean_exit_layer"],
                         "kept_in_artifact": r is self.calibration.result})
        return sorted(rows, key=lambda row: row["target"])

    def headline(self) -> dict:
        oracle = self.oracle()
        best = max(oracle, key=lambda lens: oracle[lens]["flop_saving"])
        kept = self.calibration.result.heldout
        totals = self.profile.profile.totals()
        return {
            "oracle_flop_saving": oracle[best]["flop_saving"], "oracle_latency_saving": oracle[best]["latency_saving"],
            "oracle_lens": best, "mean_prediction_depth": oracle[best]["mean_depth"],
            "num_layers": self.probe.base_model["num_layers"], "target": self.config.target,
            "exit_points": self.calibration.result.policy.exit_points,
            "consistency": kept["consistency"], "predicted_speedup": kept["predicted_speedup"],
            "speedup_unit": self.calibration.cost_unit,
            "decode_tokens_per_s": totals["decode_tokens_per_s"], "params": totals["params"],
            "device": self.profile.profile.device, "gpu": self.profile.gpu.available,
        }

    def steer_summary(self) -> dict | None:
        return self.steer.result.summary() if self.steer is not None else None

    def summary(self) -> dict:
        artifact_stages = sorted(self.artifact.stages) if self.artifact is not None else []
        others = {name: _stage_brief(self.artifact.stages[name]) for name in REPORTED_STAGES
                  if self.artifact is not None and name in self.artifact.stages}
        return {
            "command": "audit", "passed": self.passed, "model": self.probe.base_model, "data": self.probe.data,
            "headline": self.headline(), "gates": [asdict(g) for g in self.gates],
            "oracle": self.oracle(), "targets": self.targets(),
            "calibration": {"statement": self.calibration.result.ltt.statement(), "epsilon": self.config.epsilon,
                            "measure": self.config.measure, "lens": self.config.lens,
                            "cost_model": self.calibration.cost_model, "notes": self.calibration.result.notes},
            "probe": self.probe.summary(), "profile": self.profile.summary(),
            "prune": self.prune.summary() if self.prune else None, "steer": self.steer_summary(),
            "export": self.export,
            "artifact_stages": artifact_stages, "other_stages": others,
            "timings": self.timings, "config": asdict(self.config),
        }


def _stage_brief(record: dict) -> dict:
    """The parts of another command's stage record worth a line in the audit."""
    keep = ("method", "alpha", "applied", "main", "summary", "sweeps", "dense_perplexity", "provider", "dtype",
            "exit_points", "verify_max_abs_diff")
    return {k: record[k] for k in keep if k in record}


def evaluate_gates(report: AuditReport) -> list[GateResult]:
    gates, head = report.config.gates, report.headline()
    checks = (
        ("min-oracle-saving", gates.min_oracle_saving, head["oracle_flop_saving"],
         f"oracle FLOP saving of the {head['oracle_lens']} lens (probe)"),
        ("min-speedup", gates.min_speedup, head["predicted_speedup"],
         f"predicted held-out speedup ({head['speedup_unit']}) of the certified policy at target {head['target']:g}"),
        ("min-consistency", gates.min_consistency, head["consistency"],
         f"held-out token consistency of the certified policy at target {head['target']:g}"),
    )
    return [GateResult(name, threshold, float(value), float(value) >= threshold, what)
            for name, threshold, value, what in checks if threshold is not None]


def run_audit(config: AuditConfig, progress: ProgressFn | None = None,
              existing: str | Artifact | None = None) -> AuditReport:
    """Prune (if asked), probe, profile and calibrate, all on one in-memory artifact."""
    config.validate()
    timings: dict[str, float] = {}
    started = time.perf_counter()
    report_progress = progress or (lambda *a: None)
    stages = ["prune"] * config.prune + ["probe", "profile", "calibrate"] + ["steer"] * bool(config.steer)

    def timed(name: str, run):
        label = f"audit stage {stages.index(name) + 1}/{len(stages)}: {name}"
        report_progress(label, 0, 1)
        begin = time.perf_counter()
        result = run()
        timings[f"{name}_s"] = time.perf_counter() - begin
        report_progress(label, 1, 1)
        return result

    artifact = existing
    pruned = None
    if config.prune:  # first, so the stages after it audit the pruned model that would ship
        pruned = timed("prune", lambda: run_prune_job(config.prune_config(), progress, existing=artifact))
        artifact = pruned.artifact
    probe = timed("probe", lambda: run_probe_job(config.probe_config(), progress, existing=artifact))
    profile = timed("profile", lambda: run_profile_job(config.profile_config(), progress, existing=probe.artifact))
    calibration = timed("calibrate",
                        lambda: run_calibrate_job(config.calibrate_config(), progress, existing=profile.artifact))
    artifact, steering = calibration.artifact, None
    if config.steer:  # extracted from the base model and swept; not applied, so nothing above changes

        def steer() -> SweepJob:
            extract = run_extract(config.extract_config(), existing=artifact, progress=progress)
            return run_sweep_job(extract.artifact, config.steer, config.alphas(), questions=config.steer_questions,
                                 max_new_tokens=config.steer_max_new_tokens, model=config.model, progress=progress)

        steering = timed("steer", steer)
        artifact = steering.artifact
    timings["total_s"] = time.perf_counter() - started
    report = AuditReport(config, probe, profile, calibration, prune=pruned, steer=steering, timings=timings,
                         artifact=artifact)
    report.gates = evaluate_gates(report)
    report.artifact.set_stage(AUDIT_STAGE, {"headline": report.headline(), "gates": [asdict(g) for g in report.gates],
                                            "passed": report.passed, "timings": timings})
    return report

"""`audit`: probe, profile and calibrate (prune, steer and export when asked) in one go, with CI gates.

The stages share one loaded model and chain in memory on one artifact: an existing
artifact's stages (a tuned lens, masks, steering) are used, the probe's tuned lens is reused
by calibration, and the profile's measured latency is calibration's cost model. `run` writes
OUT/: the artifact, each stage's report folder, `summary.json`, `report.md`, `report.html`
and, with `export`, the ONNX package in `onnx/`. OUT is replaced only when all of it worked.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dyninfer.core import stages
from dyninfer.core.artifact_files import check_output_dir
from dyninfer.core.artifact_paths import MANIFEST_NAME, artifact_exists
from dyninfer.core.artifacts import Artifact
from dyninfer.core.choices import TUNED
from dyninfer.core.cost import count_costs
from dyninfer.core.errors import DyninferError, option
from dyninfer.core.memory import peak_memory
from dyninfer.core.progress import ProgressFn, silent
from dyninfer.core.records import AuditRecord, LensRecord, read_all
from dyninfer.exporters.onnx_export import export_dynamic, preflight, provider_problem
from dyninfer.jobs import calibrate as calibrate_job
from dyninfer.jobs import probe as probe_job
from dyninfer.jobs import profile as profile_job
from dyninfer.jobs import prune as prune_job
from dyninfer.jobs import steer as steer_job
from dyninfer.jobs import stop as stop_job
from dyninfer.jobs.audit_report import html_page, markdown
from dyninfer.jobs.configs import PACKAGE_DIR, AuditConfig
from dyninfer.jobs.estimate import audit_plan, time_rates
from dyninfer.jobs.plots import depth_histogram_png
from dyninfer.profilers.exit_probe import oracle_saving
from dyninfer.runtime.loader import ModelSession, build_dynamic, load_checked

# Stages other commands record that the audit report summarises when the artifact has them.
REPORTED_STAGES = (stages.PRUNE, stages.STEER, stages.STOP)


@dataclass
class GateResult:
    name: str
    threshold: float
    value: float
    passed: bool
    measures: str


@dataclass
class AuditReport:
    config: AuditConfig
    probe: probe_job.ProbeReport
    profile: profile_job.ProfileReport
    calibration: calibrate_job.CalibrateReport
    prune: prune_job.PruneReport | None = None
    steer: steer_job.SweepReport | None = None
    stop: stop_job.StopReport | None = None
    export: dict | None = None
    path: Path | None = None  # OUT, once written
    timings: dict[str, float] = field(default_factory=dict)
    gates: list[GateResult] = field(default_factory=list)
    artifact: Artifact | None = None
    memory: dict | None = None  # peak RSS (and CUDA memory) over the whole audit, and the weights, in MiB
    expected: dict[str, float] = field(default_factory=dict)  # the plan's expected seconds per stage, said before it ran

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
            rows.append(
                {
                    "target": r.target,
                    "exit_points": r.policy.exit_points,
                    "threshold": r.policy.threshold,
                    "risk": r.risk,
                    "certified_bound": r.target,
                    "simulated_consistency": held["consistency"],
                    "accuracy": held["accuracy"],
                    "kept_in_artifact": r is self.calibration.result,
                }
                | _achieved(r)
            )
        return sorted(rows, key=lambda row: row["target"])

    def headline(self) -> dict:
        oracle = self.oracle()
        best = max(oracle, key=lambda lens: oracle[lens]["flop_saving"])
        kept = _achieved(self.calibration.result)
        totals = self.profile.profile.totals()
        return {
            "oracle_flop_saving": oracle[best]["flop_saving"],
            "oracle_latency_saving": oracle[best]["latency_saving"],
            "oracle_lens": best,
            "mean_prediction_depth": oracle[best]["mean_depth"],
            "num_layers": self.probe.base_model["num_layers"],
            "target": self.config.calibrate.target,
            "exit_points": self.calibration.result.policy.exit_points,
            "consistency": kept["consistency"],
            "consistency_is": kept["consistency_is"],
            "predicted_speedup": kept["predicted_speedup"],
            "speedup_unit": self.calibration.cost_unit,
            "decode_tokens_per_s": totals["decode_tokens_per_s"],
            "params": totals["params"],
            "device": self.profile.profile.device,
            "gpu": self.profile.gpu.available,
        }

    def steer_summary(self) -> dict | None:
        return self.steer.result.summary() if self.steer is not None else None

    def stop_summary(self) -> dict | None:
        if self.stop is None:
            return None
        full = self.stop.summary()
        return {k: full[k] for k in ("policy", "statement", "fit", "data")} | {
            "heldout": self.stop.certificate.heldout,
            "heldout_never": self.stop.certificate.heldout_never,
        }

    def summary(self) -> dict:
        records = read_all(self.artifact) if self.artifact is not None else {}
        artifact_stages = sorted(records)
        others = {name: _stage_brief(records[name].to_dict()) for name in REPORTED_STAGES if name in records}
        return {
            "command": "audit",
            "passed": self.passed,
            "model": self.probe.base_model,
            "data": self.probe.data,
            "headline": self.headline(),
            "gates": [asdict(g) for g in self.gates],
            "oracle": self.oracle(),
            "targets": self.targets(),
            "calibration": {
                "statement": self.calibration.result.ltt.statement(),
                "epsilon": self.config.calibrate.epsilon,
                "risk": self.calibration.result.risk,
                "units": self.calibration.result.units,
                "measure": self.config.calibrate.measure,
                "lens": self.config.lens,
                "cost_model": self.calibration.cost_model,
                "notes": self.calibration.result.notes,
            },
            "probe": self.probe.summary(),
            "profile": self.profile.summary(),
            "prune": self.prune.summary() if self.prune else None,
            "steer": self.steer_summary(),
            "stop": self.stop_summary(),
            "export": self.export,
            "artifact_stages": artifact_stages,
            "other_stages": others,
            "timings": self.timings,
            "expected_timings": {f"{name}_s": seconds for name, seconds in self.expected.items()},
            "config": asdict(self.config),
            "placement": self.probe.placement,
            "memory": self.memory,
        }


def _achieved(result) -> dict:
    """What the certified policy achieved on held-out data, in the terms of the risk it was certified for."""
    if result.generated is not None:
        g = result.generated
        return {
            "consistency": g["certified_measure"],
            "predicted_speedup": g["predicted_speedup"],
            "mean_exit_layer": g["mean_exit_layer"],
            "consistency_is": f"{g['measure']} consistency of {g['prompts']} held-out greedy continuations "
            f"({g['new_tokens']} new tokens) with the full model's",
        }
    held = result.heldout
    return {
        "consistency": held["consistency"],
        "predicted_speedup": held["predicted_speedup"],
        "mean_exit_layer": held["mean_exit_layer"],
        "consistency_is": "teacher-forced token consistency on held-out windows (simulated)",
    }


def _stage_brief(record: dict) -> dict:
    """The parts of another command's stage record worth a line in the audit."""
    keep = (
        "method",
        "alpha",
        "applied",
        "main",
        "summary",
        "sweeps",
        "dense_perplexity",
        "provider",
        "dtype",
        "exit_points",
        "verify_max_abs_diff",
    )
    return {k: record[k] for k in keep if k in record}


def evaluate_gates(report: AuditReport) -> list[GateResult]:
    config, head = report.config, report.headline()
    checks = (
        (
            "min-oracle-saving",
            config.min_oracle_saving,
            head["oracle_flop_saving"],
            f"oracle FLOP saving of the {head['oracle_lens']} lens (probe)",
        ),
        (
            "min-speedup",
            config.min_speedup,
            head["predicted_speedup"],
            f"predicted held-out speedup ({head['speedup_unit']}) of the certified policy at target {head['target']:g}",
        ),
        (
            "min-consistency",
            config.min_consistency,
            head["consistency"],
            f"held-out consistency of the certified policy at target {head['target']:g} ({head['consistency_is']})",
        ),
    )
    if report.stop is not None:
        held = report.stop.certificate.heldout
        checks += (
            (
                "min-stop-saving",
                config.min_stop_saving,
                held["tokens_saved"],
                f"held-out tokens saved by the certified {report.stop.policy.workload} stop rule",
            ),
        )
    return [
        GateResult(name, threshold, float(value), float(value) >= threshold, what)
        for name, threshold, value, what in checks
        if threshold is not None
    ]


def _export_provider(report: AuditReport) -> str:
    """CUDA when the profile ran there and ONNX Runtime can use it, else the CPU provider."""
    return "cuda" if report.profile.profile.device == "cuda" and not provider_problem("cuda") else "cpu"


def run(
    config: AuditConfig,
    out: str | os.PathLike | None = "audit",
    progress: ProgressFn | None = None,
    session: ModelSession | None = None,
    on_wait: Callable[[], None] | None = None,
    on_plan: Callable[[dict[str, float]], None] | None = None,
) -> AuditReport:
    """Run every stage on one loaded model (`session`, or the model loaded once here) and, when `out` is
    given, write OUT (an artifact there is extended). `export` needs `out`: the package goes to OUT/onnx.
    `on_plan` hears the expected seconds of each stage (`jobs.estimate`) before the first one starts."""
    config.validate()
    out = _checked_out(config, out)
    existing = str(out) if out is not None and artifact_exists(out) else None
    timings: dict[str, float] = {}
    started = time.perf_counter()
    timed = _stage_timer(_stage_plan(config), timings, progress or silent)
    lens_stored = existing is not None and LensRecord.read(Artifact.load(existing)) is not None
    session = _loaded(config, session, lens_stored, progress)
    expected = expected_durations(config, session, lens_stored)
    if on_plan is not None:
        on_plan(expected)
    report = _run_stages(config, existing, session, timed, progress)
    report.timings, report.expected = timings, expected
    report.gates = evaluate_gates(report)
    timings["total_s"] = time.perf_counter() - started
    report.memory = peak_memory(session.loaded.model)
    AuditRecord.from_dict(_stage_record(report)).write(report.artifact)
    if out is not None:
        write(report, out, session, progress, on_wait)
    return report


def _checked_out(config: AuditConfig, out: str | os.PathLike | None) -> Path | None:
    """OUT as a path, checked before any work; with `export`, also that the export it ends with can run."""
    out = Path(out) if out is not None else None
    if out is not None:
        check_output_dir(out)
    if config.export:
        if out is None:
            raise DyninferError(f"{option('export')} writes OUT/{PACKAGE_DIR}: pass {option('out')}")
        preflight(None, "cpu", "fp32", verify=True)
    return out


def _stage_plan(config: AuditConfig) -> list[str]:
    """The stages this audit runs, in order."""
    return (
        [stages.PRUNE] * (config.prune is not None)
        + [stages.PROBE, stages.PROFILE, stages.CALIBRATE]
        + [stages.STEER] * bool(config.steer)
        + [stages.STOP] * bool(config.stop)
    )


def _stage_timer(plan: list[str], timings: dict[str, float], progress: ProgressFn) -> Callable[[str, Callable], object]:
    """`timed(name, work)`: runs one stage of `plan`, reporting it as stage i of n and recording its seconds in `timings`."""

    def timed(name: str, work):
        label = f"audit stage {plan.index(name) + 1}/{len(plan)}: {name}"
        progress(label, 0, 1)
        begin = time.perf_counter()
        result = work()
        timings[f"{name}_s"] = time.perf_counter() - begin
        progress(label, 1, 1)
        return result

    return timed


def _loaded(config: AuditConfig, session: ModelSession | None, lens_stored: bool, progress: ProgressFn | None) -> ModelSession:
    """`session`, or the model loaded here; either way the data is checked for every stage before the first starts."""
    calibrate = config.calibrate_config()
    early = None
    if session is None:
        data = (calibrate.data, calibrate.field, calibrate.seq_len, calibrate.seed)
        session, early = load_checked(config.model, config.placement(), data, lambda w: _check_windows(config, w, lens_stored), progress)
    windows = session.windows(calibrate.data, calibrate.field, calibrate.seq_len, calibrate.seed, made=early)
    if early is None:
        _check_windows(config, windows, lens_stored)
    return session


def _run_stages(
    config: AuditConfig, existing: str | None, session: ModelSession, timed: Callable, progress: ProgressFn | None
) -> AuditReport:
    """Every stage in plan order, each on the artifact the one before it made (`existing` extended, when given)."""
    artifact: str | Artifact | None = existing
    pruned = None
    if config.prune is not None:  # first, so the stages after it audit the pruned model that would ship
        pruned = timed(stages.PRUNE, lambda: prune_job.run(config.prune_config(), progress, artifact, session))
        artifact = pruned.artifact
    probed = timed(stages.PROBE, lambda: probe_job.run(config.probe_config(), progress, artifact, session))
    profiled = timed(stages.PROFILE, lambda: profile_job.run(config.profile_config(), progress, probed.artifact, session))
    calibration = timed(stages.CALIBRATE, lambda: calibrate_job.run(config.calibrate_config(), progress, profiled.artifact, session))
    artifact, steering = calibration.artifact, None
    if config.steer:  # extracted from the base model and swept; not applied, so nothing above changes

        def steer_check() -> steer_job.SweepReport:
            extracted = steer_job.extract(config.extract_config(), artifact, progress, session)
            return steer_job.sweep(config.sweep_config(), extracted.artifact, progress, session)

        steering = timed(stages.STEER, steer_check)
        artifact = steering.artifact
    stopped = None
    if config.stop:  # on the model the artifact describes (its pruning and applied steering), like `run` would use
        stopped = timed(stages.STOP, lambda: stop_job.run(config.stop_config(), progress, artifact, session))
        artifact = stopped.artifact
    return AuditReport(config, probed, profiled, calibration, prune=pruned, steer=steering, stop=stopped, artifact=artifact)


def _check_windows(config: AuditConfig, windows, lens_stored: bool) -> None:
    """Refuse, before the first stage, data too short for a later stage: the calibration's draw (it comes last, after
    the tuned lens took its train windows) and the probe's held-out tokens (after the pruning). The first stage checks
    its own data before its work."""
    lens_tokens = config.probe.lens_train_tokens if config.lens == TUNED and not lens_stored else 0
    calibrate_job.check_draw(config.calibrate_config(), windows, lens_tokens)
    # The probe runs after the pruning (when asked for): its held-out tokens are checked before the pruning's work.
    windows.take("heldout", config.probe_config().tokens, option="probe_tokens")


def expected_durations(config: AuditConfig, session: ModelSession, lens_stored: bool) -> dict[str, float]:
    """Each stage's expected seconds (`jobs.estimate`), from rates timed on the loaded model."""
    lm = session.lm
    costs = count_costs(lm, context=config.seq_len)
    rates = time_rates(lm, costs, min(config.calibrate.batch_size, config.calibrate.prompts))
    return audit_plan(config, lm, costs, rates, lens_stored=lens_stored)


def _stage_record(report: AuditReport) -> dict:
    return {"headline": report.headline(), "gates": [asdict(g) for g in report.gates], "passed": report.passed, "timings": report.timings}


def _stage_files(report: AuditReport) -> dict[str, dict[str, bytes]]:
    """Each stage's report folder, rendered once: the HTML report embeds the same plots."""
    files = {
        probe_job.REPORT_DIR: report.probe.files(),
        profile_job.REPORT_DIR: report.profile.files(),
        calibrate_job.REPORT_DIR: report.calibration.files(),
    }
    if report.prune is not None:
        files[stages.PRUNE] = report.prune.files()
    if report.steer is not None:
        files[report.steer.folder] = report.steer.files()
    if report.stop is not None:
        files[f"{stop_job.REPORT_DIR}-{report.stop.policy.workload}"] = report.stop.files()
    return files


def _figures(report: AuditReport, files: dict[str, dict[str, bytes]]) -> dict[str, bytes]:
    figures = {
        "probe": files[probe_job.REPORT_DIR]["probe.png"],
        "depth": depth_histogram_png(report.probe.result.depth, f"{report.probe.base_model['spec']}: prediction depth"),
        "curve": files[calibrate_job.REPORT_DIR]["curve.png"],
        "cost": files[profile_job.REPORT_DIR]["profile.png"],
    }
    if report.steer is not None:
        figures["steer"] = files[report.steer.folder]["sweep.png"]
    return figures


def write(
    report: AuditReport, out: Path, session: ModelSession, progress: ProgressFn | None = None, on_wait: Callable[[], None] | None = None
) -> Path:
    """Save the artifact with the ONNX export (when asked), every stage's report folder and the audit
    report, in one swap (`Artifact.save`): `out` keeps what an existing artifact there holds (reports,
    onnx/, the user's files) and changes only if all of it works."""
    files = _stage_files(report)
    figures = _figures(report, files)

    def add_export_and_report(staged: Path) -> None:
        if report.config.export:
            started = time.perf_counter()
            dyn = build_dynamic(report.artifact, session)
            result = export_dynamic(
                dyn,
                staged / PACKAGE_DIR,
                provider=_export_provider(report),
                baseline=True,
                source_manifest=staged / MANIFEST_NAME,
                lock=False,
                progress=progress,
            )
            report.export = result.to_dict() | {"path": str(out / PACKAGE_DIR)}
            report.timings["export_s"] = time.perf_counter() - started
            report.timings["total_s"] += report.timings["export_s"]
        pages = {
            "summary.json": json.dumps(report.summary(), indent=2, default=str),
            "report.md": markdown(report),
            "report.html": html_page(report, figures),
        }
        for name, text in pages.items():
            (staged / name).write_text(text)

    report.artifact.save(out, reports=files, build=add_export_and_report, on_wait=on_wait)
    report.path = out
    return out

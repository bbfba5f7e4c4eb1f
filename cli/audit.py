"""`dyninfer audit`: probe, profile and calibrate in one command, with a report and CI gates."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import typer

from dyninfer.artifacts import artifact_exists, staged_directory, write_report_dir
from dyninfer.cli import calibrate as calibrate_cmd
from dyninfer.cli import prune as prune_cmd
from dyninfer.cli import steer as steer_cmd
from dyninfer.cli.output import (EXIT_GATE_FAILED, artifact_dir_option, handle_errors, number_list, print_json,
                                 progress_reporter, stderr, stdout)
from dyninfer.cli.plots import depth_histogram_png, probe_figure_png, profile_png
from dyninfer.cli.report import html_page, markdown
from dyninfer.data import DEFAULT_DATA
from dyninfer.errors import DyninferError
from dyninfer.models import DEFAULT_MODEL
from dyninfer.profilers.audit import AuditConfig, AuditReport, Gates, run_audit
from dyninfer.profilers.probe import REPORT_DIR as PROBE_DIR
from dyninfer.profilers.probe import probe_files
from dyninfer.profilers.profile import REPORT_DIR as PROFILE_DIR
from dyninfer.profilers.profile import profile_files

HELP = """One-shot model audit: how much could early exit save, what does each layer cost, what can be certified?

Runs the exit probe (logit lens, and a tuned lens unless --lens logit), the per-layer profile (FLOPs, memory, latency; GPU power and energy on a GPU) and a calibration at --target and each of --targets (exit points chosen with the measured latency), then writes OUT/: report.html (self-contained: exit accuracy per layer per lens, prediction-depth histogram, speedup vs consistency, cost per layer), report.md (the same as text, for CI logs and PR comments), summary.json, and the artifact with every stage (run/bench/export use it). --prune, --steer and --export add a pruning, a steering and an ONNX export check. An existing artifact in OUT is extended (its tuned lens, masks and steering are used) and replaced only when the audit succeeds.

Exit codes: 0 every gate passed (or none set), 1 a gate failed (the report is still written), 2 bad input or error.

Examples:

    dyninfer audit    (bundled model on Python's docs -> ./audit/)

    dyninfer audit --lens logit --min-oracle-saving 0.1 --min-consistency 0.9 --json

    dyninfer audit ./my-model --data code.jsonl --field content --targets 0.9,0.99 --prune --export --out audit-my-model/

    dyninfer audit --lens logit --steer activation --steer-alphas 0.5,1    (adds a CoT-length steering sweep)
"""


DEFAULTS = AuditConfig()  # the options' defaults are the library's


def _stage_files(report: AuditReport) -> dict[str, dict[str, bytes]]:
    """Each stage's report folder, rendered once: the HTML report embeds the same plots."""
    spec = report.probe.base_model["spec"]
    files = {
        PROBE_DIR: probe_files(report.probe) | {
            "probe.png": probe_figure_png(report.probe.result.layers, f"{spec}: exit accuracy per layer")},
        PROFILE_DIR: profile_files(report.profile) | {
            "profile.png": profile_png(report.profile.profile.pieces,
                                       f"{spec}: cost per layer on {report.profile.profile.device}")},
        "calibrate": calibrate_cmd.report_files(report.calibration),
    }
    if report.prune is not None:
        files["prune"] = prune_cmd.report_files(report.prune)
    if report.steer is not None:
        files["steer"] = steer_cmd.sweep_report_files(report.steer)
    return files


def _figures(report: AuditReport, files: dict[str, dict[str, bytes]]) -> dict[str, bytes]:
    figures = {
        "probe": files[PROBE_DIR]["probe.png"],
        "depth": depth_histogram_png(report.probe.result.depth, f"{report.probe.base_model['spec']}: prediction depth"),
        "curve": files["calibrate"]["curve.png"],
        "cost": files[PROFILE_DIR]["profile.png"],
    }
    if "steer" in files:
        figures["steer"] = files["steer"]["sweep.png"]
    return figures


def _check_out(out: Path) -> None:
    artifact_dir_option(out)
    if out.is_dir() and not artifact_exists(out) and any(out.iterdir()):
        raise DyninferError(f"--out '{out}' is not empty and is not a dyninfer artifact; choose another directory "
                            "or empty it")


def write_report(report: AuditReport, out: Path, had_artifact: bool, export: bool, progress) -> Path:
    """Save the artifact, every stage's report folder and the audit report; `out` changes only if all of it works."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with staged_directory(out) as tmp:
        if had_artifact:  # keep what the artifact already holds (reports, onnx/, the user's files)
            shutil.copytree(out, tmp, dirs_exist_ok=True, symlinks=True)
        report.artifact.save(tmp)
        if export:
            from dyninfer.exporters.onnx_export import export_package, provider_problem

            provider = "cuda" if report.profile.profile.device == "cuda" and not provider_problem("cuda") else "cpu"
            result = export_package(str(tmp), None, provider=provider, baseline=False, progress=progress)
            report.export = result.to_dict() | {"path": str(out / "onnx")}
        files = _stage_files(report)
        for folder, contents in files.items():
            if folder == "steer":
                steer_cmd.write_sweep_report(report.steer, tmp, contents)
            else:
                write_report_dir(tmp / folder, contents)
        figures = _figures(report, files)
        (tmp / "summary.json").write_text(json.dumps(report.summary(), indent=2, default=str))
        (tmp / "report.md").write_text(markdown(report))
        (tmp / "report.html").write_text(html_page(report, figures))
    return out


@handle_errors
def audit(
    model: str = typer.Argument(DEFAULT_MODEL, help="`default` (bundled SmolLM2-135M), a model dir, a .gguf file or a hub id."),
    data: str = typer.Option(DEFAULT_DATA, "--data", "-d", help="Data spec (see `dyninfer probe --help`)."),
    field: Optional[str] = typer.Option(None, "--field", help="Text field/column for file or hf data."),
    lens: str = typer.Option(DEFAULTS.lens, "--lens", "-l", help="tuned (trains a tuned lens, or reuses the artifact's; the logit lens is reported too) or logit (training-free, faster)."),
    tokens: int = typer.Option(DEFAULTS.probe_tokens, "--tokens", "-n", help="Held-out tokens the probe reads."),
    target: float = typer.Option(DEFAULTS.target, "--target", "-t", help="Consistency target of the policy the artifact keeps and the gates judge."),
    targets: str = typer.Option(",".join(map(str, DEFAULTS.extra_targets)), "--targets", help="More targets to calibrate and report (comma-separated; empty for none)."),
    epsilon: float = typer.Option(DEFAULTS.epsilon, "--epsilon", "-e", help="Allowed probability that a guarantee fails."),
    measure: str = typer.Option(DEFAULTS.measure, "--measure", "-m", help="Exit confidence (see `dyninfer calibrate --help`)."),
    calibration_tokens: int = typer.Option(DEFAULTS.calibration_tokens, "--calibration-tokens", help="Train-split tokens for the LTT test."),
    heldout_tokens: int = typer.Option(DEFAULTS.heldout_tokens, "--heldout-tokens", help="Held-out tokens to report achieved quality."),
    lens_train_tokens: int = typer.Option(DEFAULTS.lens_train_tokens, "--lens-train-tokens", help="Train-split tokens for the tuned lens."),
    lens_steps: int = typer.Option(DEFAULTS.lens_steps, "--lens-steps", help="KL steps of the tuned lens."),
    repeats: int = typer.Option(DEFAULTS.repeats, "--repeats", help="Timed runs per piece in the profile."),
    device: str = typer.Option(DEFAULTS.device, "--device", help="Device to profile: auto, cpu or cuda."),
    energy_seconds: float = typer.Option(DEFAULTS.energy_seconds, "--energy-seconds", help="GPU energy window per workload."),
    prune: bool = typer.Option(False, "--prune/--no-prune", help="Also learn threshold pruning masks (first, so the rest audits the pruned model)."),
    prune_sparsity: float = typer.Option(DEFAULTS.prune_sparsity, "--prune-sparsity", help="MLP sparsity for --prune."),
    steer: Optional[str] = typer.Option(None, "--steer", help="Also extract a CoT-length direction (activation or valve) and sweep it on built-in arithmetic problems."),
    steer_alphas: Optional[str] = typer.Option(None, "--steer-alphas", help="α values for --steer (default: 0.25,0.5,1 for activation, 0.1,0.2,0.5 for valve)."),
    export: bool = typer.Option(False, "--export/--no-export", help="Also export to ONNX Runtime and verify against torch (minutes)."),
    min_oracle_saving: Optional[float] = typer.Option(None, "--min-oracle-saving", help="Gate: the best lens's oracle FLOP saving is at least this (0-1)."),
    min_speedup: Optional[float] = typer.Option(None, "--min-speedup", help="Gate: the certified policy's predicted held-out speedup is at least this."),
    min_consistency: Optional[float] = typer.Option(None, "--min-consistency", help="Gate: the certified policy's held-out consistency is at least this (0-1)."),
    seq_len: int = typer.Option(DEFAULTS.seq_len, "--seq-len", help="Tokens per window; also the profile's context."),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(Path("audit"), "--out", "-o", help="Report and artifact directory (extended if it is an artifact)."),
    as_json: bool = typer.Option(False, "--json", help="Print summary.json on stdout and nothing else."),
) -> None:
    config = AuditConfig(
        model=model, data=data, field=field, seq_len=seq_len, seed=seed, lens=lens, probe_tokens=tokens,
        lens_train_tokens=lens_train_tokens, lens_steps=lens_steps, target=target,
        extra_targets=tuple(number_list(targets, "--targets")), epsilon=epsilon, measure=measure,
        calibration_tokens=calibration_tokens, heldout_tokens=heldout_tokens,
        repeats=repeats, device=device, energy_seconds=energy_seconds, prune=prune, prune_sparsity=prune_sparsity,
        export=export, steer=steer, steer_alphas=tuple(number_list(steer_alphas, "--steer-alphas")),
        gates=Gates(min_oracle_saving, min_speedup, min_consistency),
    )
    config.validate()
    _check_out(out)
    had_artifact = artifact_exists(out)
    with progress_reporter() as progress:
        report = run_audit(config, progress, existing=str(out) if had_artifact else None)
        write_report(report, out, had_artifact, export, progress)
    if as_json:
        print_json(report.summary())
    else:
        stdout.print(markdown(report), markup=False, highlight=False)
    stderr.print(f"wrote {out}/report.html, report.md, summary.json and the artifact "
                 f"({report.timings['total_s']:.0f} s)")
    if not report.passed:
        failed = ", ".join(f"{g.name} ({g.value:.4g} < {g.threshold:g})" for g in report.gates if not g.passed)
        stderr.print(f"[bold red]gate failed:[/] {failed}")
        raise typer.Exit(EXIT_GATE_FAILED)

"""`dyninfer audit`: probe, profile and calibrate in one command, with a report and CI gates."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from dyninfer.cli import options as opt
from dyninfer.cli.output import (
    duration,
    gates_failed,
    handle_errors,
    memory_line,
    print_json,
    progress_reporter,
    stderr,
    stdout,
    waiting,
    writing,
)
from dyninfer.jobs.configs import AuditConfig, CalibrateConfig, ProbeConfig, ProfileConfig, PruneConfig, audit_steering, audit_stop

DEFAULTS = AuditConfig()  # the options' defaults are the library's

HELP = """One-shot model audit: how much could early exit save, what does each layer cost, what can be certified?

Runs the exit probe (logit lens, and a tuned lens unless --lens logit), the per-layer profile (FLOPs, memory, latency; GPU power and energy on a GPU) and a calibration at --target and each of --targets (exit points chosen with the measured latency; by default certified on the dynamic model's own generations, --risk), then writes OUT/: report.html (self-contained: exit accuracy per layer per lens, prediction-depth histogram, speedup vs consistency, cost per layer), report.md (the same as text, for CI logs and PR comments), summary.json, and the artifact with every stage (run/bench/export use it). --prune, --steer, --stop and --export add a pruning, a steering, a certified stop rule and an ONNX export check. An existing artifact in OUT is extended (its tuned lens, masks and steering are used) and replaced only when the audit succeeds.

Exit codes: 0 every gate passed (or none set), 1 a gate failed (the report is still written), 2 bad input or error.

Examples:

    dyninfer audit    (bundled model on Python's docs -> ./audit/)

    dyninfer audit --lens logit --min-oracle-saving 0.1 --min-consistency 0.9 --json

    dyninfer audit ./my-model --data code.jsonl --field content --targets 0.9,0.99 --prompts 320 --prune --export --out audit-my-model/

    dyninfer audit --lens logit --steer activation --steer-alphas 0.5,1    (adds a CoT-length steering sweep)

    dyninfer audit --stop completion --min-stop-saving 0.3    (adds a certified stop rule for completions, and gates its saving)
"""  # noqa: E501 (help paragraphs are one line each: Typer keeps line breaks)


@handle_errors
def audit(
    model: opt.Model = DEFAULTS.model,
    data: opt.Data = DEFAULTS.data,
    field: opt.TextField = DEFAULTS.field,
    lens: Annotated[
        str,
        typer.Option(
            "--lens",
            "-l",
            help="tuned (trains a tuned lens, or reuses the artifact's; the logit lens is reported too) or logit (training-free, faster).",
        ),
    ] = DEFAULTS.lens,
    probe_tokens: Annotated[int, typer.Option("--tokens", "-n", help="Held-out tokens the probe reads.")] = DEFAULTS.probe.tokens,
    target: Annotated[
        float, typer.Option("--target", "-t", help="Consistency target of the policy the artifact keeps and the gates judge.")
    ] = DEFAULTS.calibrate.target,
    extra_targets: Annotated[
        opt.Numbers,
        typer.Option(
            "--targets", parser=opt.floats, metavar="X,Y", help="More targets to calibrate and report (comma-separated; empty for none)."
        ),
    ] = DEFAULTS.calibrate.extra_targets,
    epsilon: opt.Epsilon = DEFAULTS.calibrate.epsilon,
    measure: Annotated[
        str, typer.Option("--measure", "-m", help="Exit confidence (see `dyninfer calibrate --help`).")
    ] = DEFAULTS.calibrate.measure,
    risk: opt.Risk = DEFAULTS.calibrate.risk,
    prompts: opt.CalibrationPrompts = DEFAULTS.calibrate.prompts,
    heldout_prompts: opt.HeldoutPrompts = DEFAULTS.calibrate.heldout_prompts,
    prompt_tokens: opt.PromptTokens = DEFAULTS.calibrate.prompt_tokens,
    new_tokens: opt.NewTokens = DEFAULTS.calibrate.new_tokens,
    consistency: opt.Consistency = DEFAULTS.calibrate.consistency,
    fit_tokens: opt.FitTokens = DEFAULTS.calibrate.fit_tokens,
    calibration_tokens: opt.CalibrationTokens = DEFAULTS.calibrate.calibration_tokens,
    heldout_tokens: opt.HeldoutTokens = DEFAULTS.calibrate.heldout_tokens,
    lens_train_tokens: opt.LensTrainTokens = DEFAULTS.calibrate.lens_train_tokens,
    lens_steps: opt.LensSteps = DEFAULTS.calibrate.lens_steps,
    repeats: Annotated[int, typer.Option("--repeats", help="Timed runs per piece in the profile.")] = DEFAULTS.profile.repeats,
    energy_seconds: opt.EnergySeconds = DEFAULTS.profile.energy_seconds,
    prune: Annotated[
        bool, typer.Option("--prune/--no-prune", help="Also learn threshold pruning masks (first, so the rest audits the pruned model).")
    ] = False,
    prune_sparsity: Annotated[float, typer.Option("--prune-sparsity", help="MLP sparsity for --prune.")] = PruneConfig().sparsity,
    steer: Annotated[
        str | None,
        typer.Option(
            "--steer", help="Also extract a CoT-length direction (activation or valve) and sweep it on built-in arithmetic problems."
        ),
    ] = None,
    steer_alphas: Annotated[
        opt.Numbers,
        typer.Option(
            "--steer-alphas",
            parser=opt.floats,
            metavar="A,B",
            help="α values for --steer (default: 0.25,0.5,1 for activation, 0.1,0.2,0.5 for valve).",
        ),
    ] = DEFAULTS.sweep.alphas,
    stop: Annotated[
        str | None,
        typer.Option(
            "--stop",
            help="Also fit and certify a stop rule: completion (prompts from --data) or reasoning (built-in arithmetic problems).",
        ),
    ] = None,
    min_stop_saving: Annotated[
        float | None,
        typer.Option("--min-stop-saving", help="Gate: held-out tokens saved by the certified stop rule is at least this (0-1)."),
    ] = DEFAULTS.min_stop_saving,
    export: Annotated[
        bool, typer.Option("--export/--no-export", help="Also export to ONNX Runtime and verify against torch (minutes).")
    ] = DEFAULTS.export,
    min_oracle_saving: Annotated[
        float | None, typer.Option("--min-oracle-saving", help="Gate: the best lens's oracle FLOP saving is at least this (0-1).")
    ] = DEFAULTS.min_oracle_saving,
    min_speedup: Annotated[
        float | None, typer.Option("--min-speedup", help="Gate: the certified policy's predicted held-out speedup is at least this.")
    ] = DEFAULTS.min_speedup,
    min_consistency: Annotated[
        float | None, typer.Option("--min-consistency", help="Gate: the certified policy's held-out consistency is at least this (0-1).")
    ] = DEFAULTS.min_consistency,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per window; also the profile's context.")] = DEFAULTS.seq_len,
    seed: opt.Seed = DEFAULTS.seed,
    out: Annotated[Path, typer.Option("--out", "-o", help="Report and artifact directory (extended if it is an artifact).")] = Path(
        "audit"
    ),
    device: opt.Device = DEFAULTS.device,
    dtype: opt.Dtype = DEFAULTS.dtype,
    device_map: opt.DeviceMap = DEFAULTS.device_map,
    max_memory: opt.MaxMemory = DEFAULTS.max_memory,
    as_json: opt.Json = False,
) -> None:
    from dyninfer.jobs import audit as job

    config = audit_config(locals())
    with writing(out), progress_reporter() as progress:
        report = job.run(config, out, progress, on_wait=waiting(out), on_plan=say_plan)
    render(report, out, as_json)
    gates_failed([f"{g.name} ({g.value:.4g} < {g.threshold:g})" for g in report.gates if not g.passed])


def audit_config(values: dict) -> AuditConfig:
    """The audit's Config from the command's parameters: each stage's Config from the options named like its fields."""
    return opt.config_from(
        AuditConfig,
        values,
        probe=opt.config_from(ProbeConfig, values, base=DEFAULTS.probe, tokens=values["probe_tokens"]),
        profile=opt.config_from(ProfileConfig, values, base=DEFAULTS.profile),
        calibrate=opt.config_from(CalibrateConfig, values, base=DEFAULTS.calibrate),
        prune=PruneConfig(sparsity=values["prune_sparsity"], heldout_tokens=values["heldout_tokens"]) if values["prune"] else None,
        steer=audit_steering(values["steer"]) if values["steer"] else None,
        stop=audit_stop(values["stop"]) if values["stop"] else None,
        sweep=dataclasses.replace(DEFAULTS.sweep, alphas=tuple(values["steer_alphas"])),
    )


def render(report, out: Path, as_json: bool) -> None:
    """The summary as JSON or the Markdown report on stdout; where it was written on stderr."""
    from dyninfer.jobs.audit_report import markdown

    if as_json:
        print_json(report.summary())
    else:
        stdout.print(markdown(report), markup=False, highlight=False)
    stderr.print(
        f"wrote {out}/report.html, report.md, summary.json and the artifact "
        f"({report.timings['total_s']:.0f} s; {memory_line(report.probe.placement, report.memory)})",
        markup=False,
    )


def say_plan(expected: dict[str, float]) -> None:
    """The audit's plan and its expected duration, before the first stage starts."""
    stages = ", ".join(f"{name} about {duration(seconds)}" for name, seconds in expected.items())
    stderr.print(
        f"plan: {stages}; about {duration(sum(expected.values()))} in all (estimated from rates timed on this machine)",
        highlight=False,
        markup=False,
    )

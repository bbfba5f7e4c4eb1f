"""`dyninfer calibrate`: early-exit thresholds with a Learn-then-Test guarantee."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from dyninfer.cli import options as opt
from dyninfer.cli.output import handle_errors, notes, run_and_save, stdout
from dyninfer.jobs.configs import CalibrateConfig

if TYPE_CHECKING:  # the jobs load torch: a command imports its job when it runs (fast --help)
    from dyninfer.jobs import calibrate as job

DEFAULTS = CalibrateConfig()

HELP = """Calibrate early-exit thresholds with a statistical guarantee on what runs (CALM, Learn-then-Test).

Chooses the exit points with the per-layer cost model (FLOPs, or the decode latency `dyninfer profile` measured, when the artifact has a profile), then certifies the loosest confidence threshold whose risk is at most 1 - TARGET with probability at least 1 - EPSILON.

With --risk generation (the default) the risk is about the dynamic model's own greedy continuations: prompts drawn at random from the train split, each continued by the full model once (cached in the artifact) and by the early-exit model at each candidate threshold (the policy's KV mode), scored by --consistency (tokens: share of equal positions; prefix: common prefix over the length; rougeL). The teacher-forced risks (teacher-forced-consistency, teacher-forced-accuracy-drop) simulate exits on the full model's states: cheaper, and optimistic for free generation. Every LTT example is one random window or prompt.

Examples:

    dyninfer calibrate --out audit/    (bundled model, generation risk, 128 prompts, target 0.95)

    dyninfer calibrate --target 0.9 --kv-mode recompute --consistency prefix --out audit/

    dyninfer calibrate ./my-model --data code.jsonl --prompts 300 --new-tokens 64 --json

    dyninfer calibrate --risk teacher-forced-consistency --lens logit --vocab-top-k 64 --out audit/

    dyninfer profile --out audit/ && dyninfer calibrate --out audit/    (exit points chosen by measured latency)
"""  # noqa: E501 (help paragraphs are one line each: Typer keeps line breaks)


def render(report: job.CalibrateReport) -> None:
    r = report.result
    policy = r.policy
    stdout.print(
        f"[bold]Calibrated early exit[/]: {escape(report.base_model['spec'])} on {escape(report.data['spec'])} "
        f"({policy.lens} lens, {policy.measure} confidence, risk = {r.risk})"
    )
    stdout.print(f"exit points (after layer): {policy.exit_points or 'none'}; KV of skipped layers: {policy.kv_mode}")
    stdout.print(r.ltt.statement())
    stdout.print(
        f"[dim]LTT examples: {r.units}, drawn at random from the train split of {escape(report.data['spec'])}; "
        "the guarantee assumes deployment text is like it.[/]"
    )
    if r.generated is not None:
        render_generated(r)
    table = Table(box=box.SIMPLE_HEAD, title="held-out split, teacher-forced simulation", title_justify="left")
    for name in ("policy", "threshold", "consistency", "accuracy", f"predicted speedup ({report.cost_unit})", "mean exit layer"):
        table.add_column(name, justify="right" if name != "policy" else "left")
    rows = [("certified (LTT)", policy.threshold, r.heldout)]
    if r.naive_heldout is not None:
        rows.append(("naive grid (no guarantee)", r.naive_threshold, r.naive_heldout))
    for name, threshold, held in rows:
        table.add_row(
            name,
            "never exits" if threshold is None else f"{threshold:.4g}",
            f"{held['consistency']:.2%}",
            f"{held['accuracy']:.2%}",
            f"{held['predicted_speedup']:.3f}x",
            f"{held['mean_exit_layer']:.1f}",
        )
    table.add_row("full model", "-", "100.00%", f"{r.full_accuracy_heldout:.2%}", "1.000x", str(report.base_model["num_layers"]))
    stdout.print(table)
    dist = ", ".join(f"{layer}: {share:.1%}" for layer, share in r.heldout["exit_distribution"].items())
    stdout.print(f"exit-depth distribution (held-out, simulated, certified policy): {dist}")
    for other in report.others:
        held = other.generated or other.heldout
        value = held.get("certified_measure", held.get("consistency"))
        stdout.print(
            f"target {other.target:g}: exit points {other.policy.exit_points or 'none'}, held-out "
            f"consistency {value:.2%} ({other.risk}), predicted speedup {held['predicted_speedup']:.3f}x"
        )
    notes(r.notes)


def render_generated(r) -> None:
    g = r.generated
    table = Table(
        box=box.SIMPLE_HEAD,
        title=f"held-out generation: {g['prompts']} prompts x {g['new_tokens']} new tokens, against the full model's continuations",
        title_justify="left",
    )
    for name in ("certified", "tokens", "prefix", "rougeL", "predicted speedup", "mean exit layer"):
        table.add_column(name, justify="right")
    table.add_row(
        f"{g['measure']} >= {r.target:g}",
        f"{g['tokens']:.2%}",
        f"{g['prefix']:.2%}",
        f"{g['rougeL']:.2%}",
        f"{g['predicted_speedup']:.3f}x",
        f"{g['mean_exit_layer']:.1f}",
    )
    stdout.print(table)
    if g.get("fidelity"):
        f = g["fidelity"]
        stdout.print(
            f"fed the full model's continuations (certified): same top-1 {f['same_top1']:.2%}, mean KL {f['mean_kl']:.4f}, "
            f"99th-percentile KL {f['kl_p99']:.4f}, perplexity ratio {f['perplexity_ratio']:.4f}"
        )
    tested = len(r.ltt.lambdas)
    stdout.print(
        f"[dim]{tested} of {tested + r.ltt.untested} candidate thresholds generated (fixed-sequence testing "
        "stops at the first one not certified).[/]"
    )


@handle_errors
def calibrate(
    model: opt.Model = DEFAULTS.model,
    data: opt.Data = DEFAULTS.data,
    field: opt.TextField = DEFAULTS.field,
    target: opt.Target = DEFAULTS.target,
    epsilon: opt.Epsilon = DEFAULTS.epsilon,
    risk: opt.Risk = DEFAULTS.risk,
    lens: opt.LensKind = DEFAULTS.lens,
    measure: opt.Measure = DEFAULTS.measure,
    vocab_top_k: Annotated[
        int, typer.Option("--vocab-top-k", help="Dynamic vocabulary pruning: later checks score only the first check's top-K (0 = off).")
    ] = DEFAULTS.vocab_top_k,
    kv_mode: Annotated[
        str, typer.Option("--kv-mode", help="KV of skipped layers at run time: propagate (CALM) or recompute.")
    ] = DEFAULTS.kv_mode,
    min_layer: Annotated[
        int | None, typer.Option("--min-layer", help="Earliest exit point (default: a quarter of the depth).")
    ] = DEFAULTS.min_layer,
    max_points: Annotated[int, typer.Option("--max-points", help="Most exit points to place.")] = DEFAULTS.max_points,
    prompts: opt.CalibrationPrompts = DEFAULTS.prompts,
    heldout_prompts: opt.HeldoutPrompts = DEFAULTS.heldout_prompts,
    prompt_tokens: opt.PromptTokens = DEFAULTS.prompt_tokens,
    new_tokens: opt.NewTokens = DEFAULTS.new_tokens,
    consistency: opt.Consistency = DEFAULTS.consistency,
    kl_tau: Annotated[
        float | None,
        typer.Option("--kl-tau", help="--risk fidelity: also certify the share of positions with KL(full model || dynamic) <= this."),
    ] = DEFAULTS.kl_tau,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Prompts generated together (each exits as it would alone).")
    ] = DEFAULTS.batch_size,
    fit_tokens: opt.FitTokens = DEFAULTS.fit_tokens,
    calibration_tokens: opt.CalibrationTokens = DEFAULTS.calibration_tokens,
    heldout_tokens: opt.HeldoutTokens = DEFAULTS.heldout_tokens,
    cost: Annotated[
        str,
        typer.Option(
            "--cost",
            help="Cost model for choosing exit points: auto (the artifact's measured profile if any, else FLOPs), flops or measured.",
        ),
    ] = DEFAULTS.cost,
    extra_targets: opt.Targets = DEFAULTS.extra_targets,
    seq_len: opt.SeqLen = DEFAULTS.seq_len,
    seed: opt.Seed = DEFAULTS.seed,
    lens_from: opt.LensFrom = None,
    lens_train_tokens: opt.LensTrainTokens = DEFAULTS.lens_train_tokens,
    lens_steps: opt.LensSteps = DEFAULTS.lens_steps,
    out: opt.out_dir("Artifact dir to write/extend (the policy, and calibrate/ with the curve CSV/JSON/PNG).") = None,
    device: opt.Device = DEFAULTS.device,
    dtype: opt.Dtype = DEFAULTS.dtype,
    device_map: opt.DeviceMap = DEFAULTS.device_map,
    max_memory: opt.MaxMemory = DEFAULTS.max_memory,
    as_json: opt.Json = False,
) -> None:
    from dyninfer.jobs import calibrate as job

    config = opt.config_from(CalibrateConfig, locals())
    run_and_save(
        config,
        job.run,
        job.save,
        render,
        out=out,
        as_json=as_json,
        wrote=lambda target, _: f"wrote {target} (policy in dyninfer.json) and {target / job.REPORT_DIR}/",
    )

"""`dyninfer calibrate`: early-exit thresholds with a Learn-then-Test guarantee."""

from typing import Annotated

import typer
from rich import box
from rich.table import Table

from dyninfer.cli import options as opt
from dyninfer.cli.output import check_out_dir, handle_errors, notes, print_json, progress_reporter, stderr, stdout, waiting
from dyninfer.jobs import calibrate as job

DEFAULTS = job.CalibrateConfig()

HELP = """Calibrate early-exit thresholds with a statistical guarantee (CALM, Learn-then-Test).

Chooses the exit points with the per-layer cost model (FLOPs, or the decode latency `dyninfer profile` measured, when the artifact has a profile), then certifies the loosest confidence threshold whose risk (1 - token consistency with the full model, or the accuracy drop) is at most 1 - TARGET with probability at least 1 - EPSILON, on data exchangeable with the calibration data. Reports the held-out consistency, accuracy and predicted speedup, next to the naive baseline without a guarantee.

Examples:

    dyninfer calibrate --out audit/    (bundled model, tuned lens, classifier confidence, target 0.95)

    dyninfer calibrate --target 0.99 --epsilon 0.1 --measure softmax --out audit/

    dyninfer calibrate ./my-model --data code.jsonl --lens logit --vocab-top-k 64 --json

    dyninfer profile --out audit/ && dyninfer calibrate --out audit/    (exit points chosen by measured latency)
"""  # noqa: E501 (help paragraphs are one line each: Typer keeps line breaks)


def render(report: job.CalibrateReport) -> None:
    r = report.result
    policy = r.policy
    stdout.print(f"[bold]Calibrated early exit[/]: {report.base_model['spec']} on {report.data['spec']} "
                 f"({policy.lens} lens, {policy.measure} confidence, risk = {r.risk})")
    stdout.print(f"exit points (after layer): {policy.exit_points or 'none'}; KV of skipped layers: {policy.kv_mode}")
    stdout.print(r.ltt.statement())
    stdout.print("[dim]The guarantee assumes deployment text is like the calibration text "
                 f"(examples: {r.block}-token blocks of {report.data['spec']}).[/]")
    table = Table(box=box.SIMPLE_HEAD, title="held-out split", title_justify="left")
    for name in ("policy", "threshold", "consistency", "accuracy", f"predicted speedup ({report.cost_unit})",
                 "mean exit layer"):
        table.add_column(name, justify="right" if name != "policy" else "left")
    rows = (("certified (LTT)", policy.threshold, r.heldout), ("naive grid (no guarantee)", r.naive_threshold,
                                                                r.naive_heldout))
    for name, threshold, held in rows:
        table.add_row(name, "never exits" if threshold is None else f"{threshold:.4g}", f"{held['consistency']:.2%}",
                      f"{held['accuracy']:.2%}", f"{held['predicted_speedup']:.3f}x", f"{held['mean_exit_layer']:.1f}")
    table.add_row("full model", "-", "100.00%", f"{r.full_accuracy_heldout:.2%}", "1.000x",
                  str(report.base_model["num_layers"]))
    stdout.print(table)
    dist = ", ".join(f"{layer}: {share:.1%}" for layer, share in r.heldout["exit_distribution"].items())
    stdout.print(f"exit-depth distribution (held-out, certified policy): {dist}")
    for other in report.others:
        held = other.heldout
        stdout.print(f"target {other.target:g}: exit points {other.policy.exit_points or 'none'}, held-out "
                     f"consistency {held['consistency']:.2%}, predicted speedup {held['predicted_speedup']:.3f}x")
    notes(r.notes)


@handle_errors
def calibrate(
    model: opt.Model = DEFAULTS.model,
    data: opt.Data = DEFAULTS.data,
    field: opt.TextField = DEFAULTS.field,
    target: opt.Target = DEFAULTS.target,
    epsilon: opt.Epsilon = DEFAULTS.epsilon,
    risk: Annotated[str, typer.Option("--risk", help="consistency (vs the full model) or accuracy-drop (vs the true "
                                                     "token).")] = DEFAULTS.risk,
    lens: opt.LensKind = DEFAULTS.lens,
    measure: opt.Measure = DEFAULTS.measure,
    vocab_top_k: Annotated[int, typer.Option("--vocab-top-k", help="Dynamic vocabulary pruning: later checks score "
                                                                   "only the first check's top-K (0 = off).")]
    = DEFAULTS.vocab_top_k,
    kv_mode: Annotated[str, typer.Option("--kv-mode", help="KV of skipped layers at run time: propagate (CALM) or "
                                                           "recompute.")] = DEFAULTS.kv_mode,
    min_layer: Annotated[int | None, typer.Option("--min-layer", help="Earliest exit point (default: a quarter of "
                                                                      "the depth).")] = DEFAULTS.min_layer,
    max_points: Annotated[int, typer.Option("--max-points", help="Most exit points to place.")] = DEFAULTS.max_points,
    block: Annotated[int, typer.Option("--block", help="Tokens per calibration example (LTT's unit).")]
    = DEFAULTS.block,
    fit_tokens: opt.FitTokens = DEFAULTS.fit_tokens,
    calibration_tokens: opt.CalibrationTokens = DEFAULTS.calibration_tokens,
    heldout_tokens: opt.HeldoutTokens = DEFAULTS.heldout_tokens,
    cost: Annotated[str, typer.Option("--cost", help="Cost model for choosing exit points: auto (the artifact's "
                                                     "measured profile if any, else FLOPs), flops or measured.")]
    = DEFAULTS.cost,
    extra_targets: opt.Targets = DEFAULTS.extra_targets,
    seq_len: opt.SeqLen = DEFAULTS.seq_len,
    seed: opt.Seed = DEFAULTS.seed,
    lens_from: opt.LensFrom = None,
    lens_train_tokens: opt.LensTrainTokens = DEFAULTS.lens_train_tokens,
    lens_steps: opt.LensSteps = DEFAULTS.lens_steps,
    out: opt.out_dir("Artifact dir to write/extend (the policy, and calibrate/ with the curve CSV/JSON/PNG).") = None,
    as_json: opt.Json = False,
) -> None:
    config = opt.config_from(job.CalibrateConfig, locals())
    config.validate()
    check_out_dir(out)
    with progress_reporter() as progress:
        report = job.run(config, progress=progress, existing=str(out) if out else None)
    if out is not None:
        target_dir = job.save(report, out, waiting(out))
        stderr.print(f"wrote {target_dir} (policy in dyninfer.json) and {target_dir / job.REPORT_DIR}/")
    if as_json:
        print_json(report.summary())
    else:
        render(report)

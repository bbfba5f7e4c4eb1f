"""`dyninfer calibrate`: early-exit thresholds with a Learn-then-Test guarantee."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.table import Table

from dyninfer.artifacts import write_report_dir
from dyninfer.cli.output import (artifact_dir_option, handle_errors, number_list, print_json, progress_reporter, stderr,
                                 stdout)
from dyninfer.cli.plots import calibration_curve_png
from dyninfer.compressors.calibration_job import CalibrateConfig, CalibrateReport, run_calibrate_job
from dyninfer.data import DEFAULT_DATA
from dyninfer.models import DEFAULT_MODEL

HELP = """Calibrate early-exit thresholds with a statistical guarantee (CALM, Learn-then-Test).

Chooses the exit points with the per-layer cost model (FLOPs, or the decode latency `dyninfer profile` measured, when the artifact has a profile), then certifies the loosest confidence threshold whose risk (1 - token consistency with the full model, or the accuracy drop) is at most 1 - TARGET with probability at least 1 - EPSILON, on data exchangeable with the calibration data. Reports the held-out consistency, accuracy and predicted speedup, next to the naive baseline without a guarantee.

Examples:

    dyninfer calibrate --out audit/    (bundled model, tuned lens, classifier confidence, target 0.95)

    dyninfer calibrate --target 0.99 --epsilon 0.1 --measure softmax --out audit/

    dyninfer calibrate ./my-model --data code.jsonl --lens logit --vocab-top-k 64 --json

    dyninfer profile --out audit/ && dyninfer calibrate --out audit/    (exit points chosen by measured latency)
"""


def render(report: CalibrateReport) -> None:
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
    for note in r.notes:
        stdout.print(f"[yellow]note:[/] {note}")


def _curve_csv(report: CalibrateReport) -> bytes:
    import pandas as pd

    buffer = io.StringIO()
    pd.DataFrame([vars(c) for c in report.result.curve]).to_csv(buffer, index=False)
    return buffer.getvalue().encode()


def report_files(report: CalibrateReport) -> dict[str, bytes]:
    """The calibrate/ report folder: the threshold curve (CSV, PNG) and the summary."""
    return {
        "curve.csv": _curve_csv(report),
        "summary.json": json.dumps(report.summary(), indent=2, default=str).encode(),
        "curve.png": calibration_curve_png(report.result, f"{report.base_model['spec']} on {report.data['spec']}",
                                           report.others, report.cost_unit),
    }


@handle_errors
def calibrate(
    model: str = typer.Argument(DEFAULT_MODEL, help="`default`, a model dir, a .gguf file or a hub id."),
    data: str = typer.Option(DEFAULT_DATA, "--data", "-d", help="Data spec (see `dyninfer probe --help`)."),
    field: Optional[str] = typer.Option(None, "--field", help="Text field/column for file or hf data."),
    target: float = typer.Option(0.95, "--target", "-t", help="Required token consistency (or 1 - accuracy drop)."),
    epsilon: float = typer.Option(0.05, "--epsilon", "-e", help="Allowed probability that the guarantee fails."),
    risk: str = typer.Option("consistency", "--risk", help="consistency (vs the full model) or accuracy-drop (vs the true token)."),
    lens: str = typer.Option("tuned", "--lens", "-l", help="Exit head: tuned (reused from --out/--lens-from, else trained) or logit."),
    measure: str = typer.Option("classifier", "--measure", "-m", help="classifier (CALM meta classifier on the hidden state: cheap), softmax, margin, entropy (need the LM head at each check) or saturation."),
    vocab_top_k: int = typer.Option(0, "--vocab-top-k", help="Dynamic vocabulary pruning: later checks score only the first check's top-K (0 = off)."),
    kv_mode: str = typer.Option("propagate", "--kv-mode", help="KV of skipped layers at run time: propagate (CALM) or recompute."),
    min_layer: Optional[int] = typer.Option(None, "--min-layer", help="Earliest exit point (default: a quarter of the depth)."),
    max_points: int = typer.Option(8, "--max-points", help="Most exit points to place."),
    block: int = typer.Option(16, "--block", help="Tokens per calibration example (LTT's unit)."),
    fit_tokens: int = typer.Option(2048, "--fit-tokens", help="Train-split tokens to choose exit points and fit the classifier."),
    calibration_tokens: int = typer.Option(8192, "--calibration-tokens", help="Train-split tokens for the LTT test."),
    heldout_tokens: int = typer.Option(4096, "--heldout-tokens", help="Held-out tokens to report achieved quality."),
    cost: str = typer.Option("auto", "--cost", help="Cost model for choosing exit points: auto (the artifact's measured profile if any, else FLOPs), flops or measured."),
    targets: Optional[str] = typer.Option(None, "--targets", help="More targets to calibrate on the same traces, comma-separated (reported; the artifact keeps --target's policy)."),
    seq_len: int = typer.Option(256, "--seq-len"),
    seed: int = typer.Option(0, "--seed"),
    lens_from: Optional[Path] = typer.Option(None, "--lens-from", help="Take the tuned lens from this artifact."),
    lens_train_tokens: int = typer.Option(16384, "--lens-train-tokens", help="Train-split tokens if a tuned lens must be trained."),
    lens_steps: int = typer.Option(60, "--lens-steps", help="KL steps if a tuned lens must be trained."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Artifact dir to write/extend (policy, curve CSV/JSON/PNG)."),
    as_json: bool = typer.Option(False, "--json", help="Print the machine-readable summary on stdout and nothing else."),
) -> None:
    config = CalibrateConfig(
        model=model, data=data, field=field, seq_len=seq_len, seed=seed, lens=lens, measure=measure, target=target,
        epsilon=epsilon, risk=risk, block=block, fit_tokens=fit_tokens, calibration_tokens=calibration_tokens,
        heldout_tokens=heldout_tokens, vocab_top_k=vocab_top_k, min_layer=min_layer, max_points=max_points,
        kv_mode=kv_mode, lens_from=str(lens_from) if lens_from else None,
        lens_train_tokens=lens_train_tokens, lens_steps=lens_steps, cost=cost,
        extra_targets=tuple(number_list(targets, "--targets")),
    )
    config.validate()
    existing = artifact_dir_option(out)
    with progress_reporter() as progress:
        report = run_calibrate_job(config, progress=progress, existing=existing)
    if out is not None:
        target_dir = report.artifact.save(out)
        write_report_dir(target_dir / "calibrate", report_files(report))
        stderr.print(f"wrote {target_dir} (policy in dyninfer.json) and {target_dir / 'calibrate'}/")
    if as_json:
        print_json(report.summary())
    else:
        render(report)

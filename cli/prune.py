"""`dyninfer prune`: per-token MLP pruning masks (TEAL/CATS thresholds or Deja Vu/FTWT predictors)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.table import Table

from dyninfer.artifacts import write_report_dir
from dyninfer.cli.output import (artifact_dir_option, handle_errors, number_list, print_json, progress_reporter, stderr,
                                 stdout)
from dyninfer.cli.plots import pruning_sweep_png, sparkline
from dyninfer.compressors.prune_job import PruneConfig, PruneReport, run_prune_job
from dyninfer.data import DEFAULT_DATA
from dyninfer.models import DEFAULT_MODEL

HELP = """Learn per-token MLP pruning masks and measure what they cost and save.

Each token keeps only the MLP neurons whose score passes a per-layer threshold, calibrated so every layer reaches the target sparsity. --method threshold (TEAL/CATS, no training) scores neurons by |h|, the MLP activation; --method predictor (Deja Vu/FTWT) trains a low-rank predictor per layer that scores neurons from the MLP input, so gate, up and down all skip them. Reports held-out perplexity and next-token agreement vs the dense model, the achieved sparsity per layer, FLOPs and weight bytes per token, and the measured speed of the MLP block and of end-to-end decoding, dense vs sparse kernels side by side (batch 1). The masks are saved in the artifact; run, bench, calibrate and export use them.

Examples:

    dyninfer prune --sparsity 0.5 --out pruned/        (bundled model, threshold method)

    dyninfer prune --method predictor --sparsity 0.4 --rank 128 --out pruned/

    dyninfer prune --sweep 0.25,0.4,0.5 --json         (quality and speed at each sparsity)

    dyninfer prune ./my-model --data code.jsonl --allocation greedy --no-speed
"""


def report_files(report: PruneReport) -> dict[str, bytes]:
    """The prune/ report folder: summary and the quality/speed sweep plot."""
    summary = report.summary()
    return {
        "summary.json": json.dumps(summary, indent=2, default=str).encode(),
        "sweep.png": pruning_sweep_png(summary["points"], report.dense_perplexity,
                                       f"{report.base_model['spec']}: {report.config.method} pruning"),
    }


def render(report: PruneReport) -> None:
    cfg = report.config
    stdout.print(f"[bold]Dynamic MLP pruning[/]: {report.base_model['spec']} on {report.data['spec']} "
                 f"({cfg.method}, {cfg.allocation} allocation); dense held-out perplexity {report.dense_perplexity:.3f}")
    table = Table(box=box.SIMPLE_HEAD)
    columns = ("target", "achieved", "perplexity", "Δ ppl", "agreement", "MLP FLOPs saved", "recall",
               "MLP block", "decode", "decode tok/s (dense → sparse)")
    for name in columns:
        table.add_column(name, justify="right")
    for point in report.points:
        d = point.to_dict()
        speed = d["speed"]
        table.add_row(
            f"{point.sparsity:.0%}", f"{d['achieved_sparsity']:.1%}", f"{point.perplexity:.3f}",
            f"{point.perplexity_change:+.2%}", f"{point.agreement:.2%}", f"{d['flops_saved']:.1%}",
            f"{d['mean_recall']:.3f}" if "mean_recall" in d else "-",
            f"{speed['mlp_speedup']:.2f}x" if speed else "-", f"{speed['decode_speedup']:.2f}x" if speed else "-",
            f"{speed['decode_dense_tok_s']:.1f} → {speed['decode_sparse_tok_s']:.1f}" if speed else "-",
        )
    stdout.print(table)
    main = report.main
    stdout.print(f"achieved sparsity per layer at {main.sparsity:.0%} (0 → 1): "
                 f"{sparkline(main.layer_sparsity)}  min {min(main.layer_sparsity):.1%}, max {max(main.layer_sparsity):.1%}")
    if main.speed:
        stdout.print(f"speed measured side by side in one run with the {main.speed.backend} sparse kernels; "
                     "masked-dense is used for quality only and never timed")
    for note in report.notes:
        stdout.print(f"[yellow]note:[/] {note}")


@handle_errors
def prune(
    model: str = typer.Argument(DEFAULT_MODEL, help="`default`, a model dir, a .gguf file or a hub id."),
    method: str = typer.Option("threshold", "--method", "-m", help="threshold (TEAL/CATS, training-free) or predictor (Deja Vu/FTWT)."),
    sparsity: float = typer.Option(0.5, "--sparsity", "-s", help="Target fraction of inactive MLP neurons (mean over layers)."),
    sweep: Optional[str] = typer.Option(None, "--sweep", help="Also evaluate these sparsities, e.g. 0.25,0.4,0.5 (plot + table)."),
    allocation: str = typer.Option("uniform", "--allocation", help="uniform, or greedy (TEAL: per-layer sparsity minimising output error)."),
    input_sparsity: float = typer.Option(0.0, "--input-sparsity", help="threshold method: also sparsify the gate/up input x (TEAL)."),
    rank: int = typer.Option(64, "--rank", help="predictor: rank of the low-rank predictor."),
    label: str = typer.Option("topk", "--label", help="predictor: train on the top-k neurons of |h| or on the top --mass of it (FTWT)."),
    mass: float = typer.Option(0.9, "--mass", help="predictor with --label mass: fraction of activation mass to cover."),
    steps: int = typer.Option(300, "--steps", help="predictor: training steps per layer."),
    data: str = typer.Option(DEFAULT_DATA, "--data", "-d", help="Data spec (see `dyninfer probe --help`)."),
    field: Optional[str] = typer.Option(None, "--field", help="Text field/column for file or hf data."),
    calibration_tokens: int = typer.Option(4096, "--calibration-tokens", help="Train-split tokens for thresholds/predictors."),
    heldout_tokens: int = typer.Option(4096, "--heldout-tokens", help="Held-out tokens for perplexity, agreement and sparsity."),
    speed: bool = typer.Option(True, "--speed/--no-speed", help="Time the MLP block and decoding, dense vs sparse."),
    prompts: int = typer.Option(4, "--prompts", help="Held-out prompts for the decode timing."),
    prompt_tokens: int = typer.Option(64, "--prompt-tokens"),
    new_tokens: int = typer.Option(32, "--new-tokens", help="Tokens generated per prompt in the decode timing."),
    backend: str = typer.Option("auto", "--sparse-backend", help="auto (numba on CPU, Triton on CUDA), cpu, triton, reference, masked."),
    seq_len: int = typer.Option(256, "--seq-len"),
    seed: int = typer.Option(0, "--seed"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Artifact dir to write/extend (masks + prune/ report)."),
    as_json: bool = typer.Option(False, "--json", help="Print the machine-readable summary on stdout and nothing else."),
) -> None:
    config = PruneConfig(
        model=model, data=data, field=field, seq_len=seq_len, seed=seed, method=method, sparsity=sparsity,
        sweep=number_list(sweep, "--sweep"), allocation=allocation, input_sparsity=input_sparsity, rank=rank, label=label,
        mass=mass, steps=steps, calibration_tokens=calibration_tokens, heldout_tokens=heldout_tokens, speed=speed,
        prompts=prompts, prompt_tokens=prompt_tokens, new_tokens=new_tokens, backend=backend,
    )
    config.validate()
    existing = artifact_dir_option(out)
    with progress_reporter() as progress:
        report = run_prune_job(config, progress=progress, existing=existing)
    summary = report.summary()
    if out is not None:
        target_dir = report.artifact.save(out)
        write_report_dir(target_dir / "prune", report_files(report))
        stderr.print(f"wrote {target_dir} (masks in masks.safetensors) and {target_dir / 'prune'}/")
    if as_json:
        print_json(summary)
    else:
        render(report)

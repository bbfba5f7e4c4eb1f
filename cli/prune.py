"""`dyninfer prune`: per-token MLP pruning masks (TEAL/CATS thresholds or Deja Vu/FTWT predictors)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from dyninfer.cli import options as opt
from dyninfer.cli.output import (
    handle_errors,
    notes,
    run_and_save,
    sparkline,
    stdout,
)
from dyninfer.jobs.configs import PruneConfig

if TYPE_CHECKING:  # the jobs load torch: a command imports its job when it runs (fast --help)
    from dyninfer.jobs import prune as job

DEFAULTS = PruneConfig()

HELP = """Learn per-token MLP pruning masks and measure what they cost and save.

Each token keeps only the MLP neurons whose score passes a per-layer threshold, calibrated so every layer reaches the target sparsity. --method threshold (TEAL/CATS, no training) scores neurons by |h|, the MLP activation; --method predictor (Deja Vu/FTWT) trains a low-rank predictor per layer that scores neurons from the MLP input, so gate, up and down all skip them. Reports held-out perplexity and next-token agreement vs the dense model, the achieved sparsity per layer, FLOPs and weight bytes per token, and the measured speed of the MLP block and of end-to-end decoding, dense vs sparse kernels side by side (batch 1). The masks are saved in the artifact; run, bench, calibrate and export use them.

Examples:

    dyninfer prune --sparsity 0.5 --out pruned/        (bundled model, threshold method)

    dyninfer prune --method predictor --sparsity 0.4 --rank 128 --out pruned/

    dyninfer prune --sweep 0.25,0.4,0.5 --json         (quality and speed at each sparsity)

    dyninfer prune ./my-model --data code.jsonl --allocation greedy --no-speed
"""  # noqa: E501 (help paragraphs are one line each: Typer keeps line breaks)


def render(report: job.PruneReport) -> None:
    cfg = report.config
    stdout.print(
        f"[bold]Dynamic MLP pruning[/]: {escape(report.base_model['spec'])} on {escape(report.data['spec'])} "
        f"({cfg.method}, {cfg.allocation} allocation); dense held-out perplexity {report.dense_perplexity:.3f}"
    )
    table = Table(box=box.SIMPLE_HEAD)
    columns = (
        "target",
        "achieved",
        "perplexity",
        "Δ ppl",
        "agreement",
        "MLP FLOPs saved",
        "recall",
        "MLP block",
        "decode",
        "decode tok/s (dense → sparse)",
    )
    for name in columns:
        table.add_column(name, justify="right")
    for point in report.points:
        d = point.to_dict()
        speed = d["speed"]
        table.add_row(
            f"{point.sparsity:.0%}",
            f"{d['achieved_sparsity']:.1%}",
            f"{point.perplexity:.3f}",
            f"{point.perplexity_change:+.2%}",
            f"{point.agreement:.2%}",
            f"{d['flops_saved']:.1%}",
            f"{d['mean_recall']:.3f}" if "mean_recall" in d else "-",
            f"{speed['mlp_speedup']:.2f}x" if speed else "-",
            f"{speed['decode_speedup']:.2f}x" if speed else "-",
            f"{speed['decode_dense_tok_s']:.1f} → {speed['decode_sparse_tok_s']:.1f}" if speed else "-",
        )
    stdout.print(table)
    main = report.main
    stdout.print(
        f"achieved sparsity per layer at {main.sparsity:.0%} (0 → 1): "
        f"{sparkline(main.layer_sparsity)}  min {min(main.layer_sparsity):.1%}, max {max(main.layer_sparsity):.1%}"
    )
    if main.speed:
        stdout.print(
            f"speed measured side by side in one run with the {main.speed.backend} sparse kernels; "
            "masked-dense is used for quality only and never timed"
        )
    notes(report.notes)


@handle_errors
def prune(
    model: opt.Model = DEFAULTS.model,
    method: Annotated[
        str, typer.Option("--method", "-m", help="threshold (TEAL/CATS, training-free) or predictor (Deja Vu/FTWT).")
    ] = DEFAULTS.method,
    sparsity: Annotated[
        float, typer.Option("--sparsity", "-s", help="Target fraction of inactive MLP neurons (mean over layers).")
    ] = DEFAULTS.sparsity,
    sweep: Annotated[
        opt.Numbers,
        typer.Option("--sweep", parser=opt.floats, metavar="X,Y", help="Also evaluate these sparsities, e.g. 0.25,0.4,0.5 (plot + table)."),
    ] = DEFAULTS.sweep,
    allocation: Annotated[
        str, typer.Option("--allocation", help="uniform, or greedy (TEAL: per-layer sparsity minimising output error).")
    ] = DEFAULTS.allocation,
    input_sparsity: Annotated[
        float, typer.Option("--input-sparsity", help="threshold method: also sparsify the gate/up input x (TEAL).")
    ] = DEFAULTS.input_sparsity,
    rank: Annotated[int, typer.Option("--rank", help="predictor: rank of the low-rank predictor.")] = DEFAULTS.rank,
    label: Annotated[
        str, typer.Option("--label", help="predictor: train on the top-k neurons of |h| or on the top --mass of it (FTWT).")
    ] = DEFAULTS.label,
    mass: Annotated[
        float, typer.Option("--mass", help="predictor with --label mass: fraction of activation mass to cover.")
    ] = DEFAULTS.mass,
    steps: Annotated[int, typer.Option("--steps", help="predictor: training steps per layer.")] = DEFAULTS.steps,
    data: opt.Data = DEFAULTS.data,
    field: opt.TextField = DEFAULTS.field,
    calibration_tokens: opt.CalibrationTokens = DEFAULTS.calibration_tokens,
    heldout_tokens: opt.HeldoutTokens = DEFAULTS.heldout_tokens,
    speed: Annotated[bool, typer.Option("--speed/--no-speed", help="Time the MLP block and decoding, dense vs sparse.")] = DEFAULTS.speed,
    prompts: opt.Prompts = DEFAULTS.prompts,
    prompt_tokens: opt.PromptTokens = DEFAULTS.prompt_tokens,
    new_tokens: opt.NewTokens = DEFAULTS.new_tokens,
    backend: Annotated[
        str, typer.Option("--sparse-backend", help="auto (numba on CPU, Triton on CUDA), cpu, triton, reference, masked.")
    ] = DEFAULTS.backend,
    seq_len: opt.SeqLen = DEFAULTS.seq_len,
    seed: opt.Seed = DEFAULTS.seed,
    out: opt.out_dir("Artifact dir to write/extend (masks + prune/ report).") = None,
    device: opt.Device = DEFAULTS.device,
    dtype: opt.Dtype = DEFAULTS.dtype,
    device_map: opt.DeviceMap = DEFAULTS.device_map,
    max_memory: opt.MaxMemory = DEFAULTS.max_memory,
    as_json: opt.Json = False,
) -> None:
    from dyninfer.jobs import prune as job

    config = opt.config_from(PruneConfig, locals())
    run_and_save(
        config,
        job.run,
        job.save,
        render,
        out=out,
        as_json=as_json,
        wrote=lambda target, _: f"wrote {target} (masks in masks.safetensors) and {target / 'prune'}/",
    )

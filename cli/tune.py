"""`dyninfer tune-exits`: a LoRA fine-tune that teaches the model's intermediate layers to be read as exits."""

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
from dyninfer.jobs.configs import TuneConfig

if TYPE_CHECKING:  # the jobs load torch: a command imports its job when it runs (fast --help)
    from dyninfer.jobs import tune as job

DEFAULTS = TuneConfig()

HELP = """Teach the model to exit early: a short LoRA fine-tune (LayerSkip, CALM); the full model stays the original.

The LoRA makes the intermediate layers predictive through the model's own final norm and head.

Each step trains the exits at some depths (--curriculum rotational: every --rotation-th one, shifting each step; gradual: deepest first; all) with a loss weighted by depth (--depth-weighting), to the original model's final distribution (--exit-target teacher) or to the next token (labels), plus --kl-weight x KL(original final || tuned final), which keeps the tuned full model close to the original. --layer-dropout skips layers with a rate rising with depth. Trains on the train split of --data; measures the original and the tuned model on held-out windows it never saw: per-layer agreement with the final layer, the oracle saving, perplexity and the full model's greedy agreement with the original. The LoRA is saved in the artifact (--out, a new one): probe, calibrate, prune, steer, run, bench and export on that artifact use the tuned model. --merge-out writes a merged Hugging Face checkpoint.

Examples:

    dyninfer tune-exits --out tuned/                  (bundled model, pydocs, 60 steps)

    dyninfer tune-exits --steps 400 --exit-layers 8,12,16 --out tuned/ && dyninfer probe --out tuned/

    dyninfer tune-exits ./my-model --data code.jsonl --layer-dropout 0.2 --merge-out my-model-exits/ --out tuned/

    dyninfer calibrate --out tuned/ && dyninfer bench tuned/    (speculation vs the tuned and the original model)
"""  # noqa: E501 (help paragraphs are one line each: Typer keeps line breaks)


def render(report: job.TuneReport) -> None:
    cfg, training = report.config, report.training.summary()
    stdout.print(
        f"[bold]tune-exits[/]: {escape(report.base_model['spec'])} on {escape(report.data['spec'])}, {cfg.steps} steps x "
        f"{cfg.batch_size} windows of {cfg.seq_len} ({training['tokens']:,} tokens), rank {cfg.rank}, "
        f"{training['trainable_parameters']:,} trained parameters, {training['seconds']:.0f} s"
    )
    table = Table(box=box.SIMPLE_HEAD)
    for name in ("", "perplexity", "oracle saving", "agreement with final (0 → L)"):
        table.add_column(name, justify="right")
    for name, m in (("original", report.original), ("tuned", report.tuned)):
        table.add_row(name, f"{m.perplexity:.3f}", f"{m.oracle_saving:.1%}", sparkline(m.agreement))
    stdout.print(table)
    depths = list(range(len(report.original.agreement)))
    step = max(1, len(depths) // 8)
    shown = depths[step::step]
    stdout.print(
        "agreement at depth " + ", ".join(f"{d}: {report.original.agreement[d]:.2f} → {report.tuned.agreement[d]:.2f}" for d in shown)
    )
    if report.draft_vocabulary:
        v = report.draft_vocabulary
        stdout.print(f"draft vocabulary: {v['size']:,} most frequent train tokens, holding {v['heldout_coverage']:.1%} of held-out tokens")
    stdout.print(
        f"tuned full model: perplexity {report.perplexity_change:+.2%} vs the original, greedy token equal to "
        f"the original's at {report.final_agreement:.2%} of held-out positions"
    )
    losses = training["first_losses"], training["final_losses"]
    stdout.print(
        "loss (first 10 steps → last 10): "
        + ", ".join(
            f"{k.replace('_', ' ')} {losses[0][k]:.3f} → {losses[1][k]:.3f}"
            for k in losses[0]
            if losses[0][k] is not None and losses[1][k] is not None
        )
    )
    notes(report.notes)


@handle_errors
def tune_exits(
    model: opt.Model = DEFAULTS.model,
    out: Annotated[str, typer.Option("--out", "-o", help="Artifact dir to write (new, or one with no stages).")] = ...,
    exit_layers: Annotated[
        opt.Numbers | None,
        typer.Option(
            "--exit-layers",
            parser=opt.ints,
            metavar="I,J",
            help="Exit depths to train (1 .. layers-1), e.g. 8,12,16; default: every layer.",
        ),
    ] = None,
    rank: Annotated[int, typer.Option("--rank", help="LoRA rank.")] = DEFAULTS.rank,
    targets: Annotated[
        opt.Numbers | None,
        typer.Option(
            "--targets",
            parser=opt.names,
            metavar="NAME,NAME",
            help="Module names to adapt (default: the architecture's attention and MLP projections).",
        ),
    ] = None,
    steps: Annotated[int, typer.Option("--steps", help="Training steps.")] = DEFAULTS.steps,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (linear warm-up and decay).")] = DEFAULTS.lr,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per step.")] = DEFAULTS.batch_size,
    curriculum: Annotated[str, typer.Option("--curriculum", help="rotational, gradual or all (LayerSkip).")] = DEFAULTS.curriculum,
    rotation: Annotated[int, typer.Option("--rotation", help="rotational: train every this-many-th exit per step.")] = DEFAULTS.rotation,
    depth_weighting: Annotated[
        str, typer.Option("--depth-weighting", help="Exit loss weight by depth d: quadratic (LayerSkip), linear or uniform.")
    ] = DEFAULTS.depth_weighting,
    layer_dropout: Annotated[
        float, typer.Option("--layer-dropout", help="Skip rate of the last layer (0 off); earlier layers less, rising with depth.")
    ] = DEFAULTS.layer_dropout,
    exit_weight: Annotated[float, typer.Option("--exit-weight", help="Total weight of the exit losses.")] = DEFAULTS.exit_weight,
    kl_weight: Annotated[float, typer.Option("--kl-weight", help="Weight of KL(original final || tuned final).")] = DEFAULTS.kl_weight,
    exit_target: Annotated[
        str, typer.Option("--exit-target", help="teacher (the original's final distribution) or labels (the next token).")
    ] = DEFAULTS.exit_target,
    exit_token_fraction: Annotated[
        float,
        typer.Option("--exit-token-fraction", help="Share of positions the exit losses score each step (the head is costly per exit)."),
    ] = DEFAULTS.exit_token_fraction,
    checkpointing: Annotated[
        bool, typer.Option("--checkpointing/--no-checkpointing", help="Recompute layers in the backward pass (less memory).")
    ] = DEFAULTS.checkpointing,
    heldout_tokens: opt.HeldoutTokens = DEFAULTS.heldout_tokens,
    draft_vocab: Annotated[
        int,
        typer.Option(
            "--draft-vocab", help="The speculative draft head's candidates: this many most frequent train tokens (0: the full head)."
        ),
    ] = DEFAULTS.draft_vocab,
    merge_out: Annotated[
        str | None, typer.Option("--merge-out", help="Also write the tuned weights as a Hugging Face checkpoint here.")
    ] = None,
    data: opt.Data = DEFAULTS.data,
    field: opt.TextField = DEFAULTS.field,
    seq_len: opt.SeqLen = DEFAULTS.seq_len,
    seed: opt.Seed = DEFAULTS.seed,
    device: opt.Device = DEFAULTS.device,
    dtype: opt.Dtype = DEFAULTS.dtype,
    device_map: opt.DeviceMap = DEFAULTS.device_map,
    max_memory: opt.MaxMemory = DEFAULTS.max_memory,
    as_json: opt.Json = False,
) -> None:
    from dyninfer.jobs import tune as job

    config = opt.config_from(TuneConfig, locals(), exit_layers=tuple(exit_layers or ()), targets=tuple(targets or ()))
    config.check_outputs(out)
    run_and_save(config, job.run, job.save, render, out=out, as_json=as_json, wrote=_wrote)


def _wrote(target, report) -> str:
    merged = f" and the merged checkpoint {report.merged_to}" if report.merged_to else ""
    return f"wrote {target} (the LoRA in tuning.safetensors, report in {target / 'tune'}/){merged}"

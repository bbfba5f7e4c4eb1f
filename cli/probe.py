"""`dyninfer probe`: per-layer early-exit audit."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from dyninfer.cli import options as opt
from dyninfer.cli.output import handle_errors, memory_line, run_and_save, sparkline, stdout
from dyninfer.core.choices import LENS_KINDS
from dyninfer.jobs.configs import ProbeConfig

if TYPE_CHECKING:  # the jobs load torch: a command imports its job when it runs (fast --help)
    from dyninfer.jobs import probe as job

DEFAULTS = ProbeConfig()

HELP = """Per-layer exit accuracy: how early could each token leave the model?

For every layer (0 = embedding output): top-1 agreement with the final layer, next-token accuracy, KL(final || layer), entropy, max-probability and its calibration error (ECE); the prediction-depth distribution; and the oracle FLOP saving of exiting each token at its prediction depth (LM head counted at the exit).

Examples:

    dyninfer probe    (bundled model, Python docs, logit lens)

    dyninfer probe --lens both --out audit/    (train a tuned lens, keep it in the artifact)

    dyninfer probe ./my-model --data code.jsonl --field content --tokens 8192 --json

    dyninfer probe ./Llama-3.1-8B --device cuda --dtype bfloat16 --lens both --out audit/    (on a GPU, in the checkpoint's precision)
"""  # noqa: E501 (help paragraphs are one line each: Typer keeps line breaks)


def _lens_list(values: list[str]) -> tuple[str, ...]:
    kinds: list[str] = []
    for value in values:
        for part in value.split(","):
            part = part.strip().lower()
            expanded = list(LENS_KINDS) if part == "both" else [part]
            kinds += [k for k in expanded if k not in kinds]
    return tuple(kinds)


def render(report: job.ProbeReport) -> None:
    result = report.result
    lenses = result.lenses()
    table = Table(
        title=f"Exit probe: {escape(report.base_model['spec'])} on {escape(report.data['spec'])} ({result.n_tokens} held-out tokens)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
    )
    table.add_column("layer", justify="right")
    for lens in lenses:
        for metric in ("agree", "acc", "KL", "ECE", "exit"):
            table.add_column(f"{lens[:5]} {metric}", justify="right", no_wrap=True)
    by_lens = {lens: result.layers[result.layers["lens"] == lens].reset_index(drop=True) for lens in lenses}
    for index in range(len(by_lens[lenses[0]])):
        cells = ["embed" if index == 0 else str(index)]
        for lens in lenses:
            row = by_lens[lens].loc[index]
            cells += [f"{row.agreement:.1%}", f"{row.accuracy:.1%}", f"{row.kl:.3g}", f"{row.ece:.3f}", f"{row.exit_fraction:.1%}"]
        table.add_row(*cells)
    stdout.print(table)
    stdout.print("agreement with the final top-1, per layer (embed → last):")
    for lens in lenses:
        stdout.print(f"  {lens:>5} │{sparkline(by_lens[lens]['agreement'])}│")
    for lens in lenses:
        o = result.oracle[lens]
        stdout.print(
            f"[bold]{lens}[/] lens: mean prediction depth {o.mean_depth:.1f}/{result.costs.num_layers} layers; "
            f"oracle exit saving {o.saving:.1%} of FLOPs (head = {result.costs.head_in_layers():.1f} layers)"
        )
    if report.lens_training is not None:
        t = report.lens_training
        stdout.print(f"tuned lens trained on {t.train_tokens} tokens in {t.seconds:.0f}s ({t.steps} KL steps after {t.init} init)")
    stdout.print(f"throughput: probe {result.tokens_per_s:.1f} tokens/s, plain forward {result.forward_tokens_per_s:.1f} tokens/s")
    stdout.print(memory_line(report.placement, report.memory))


@handle_errors
def probe(
    model: opt.Model = DEFAULTS.model,
    data: opt.Data = DEFAULTS.data,
    field: opt.TextField = DEFAULTS.field,
    lenses: Annotated[
        list[str],
        typer.Option(
            "--lens",
            "-l",
            help="logit (training-free, always reported) and/or tuned (trains a tuned lens, or reuses "
            "--lens-from; reported beside logit), or both. A tuned lens already in --out is reported "
            "too.",
        ),
    ] = list(DEFAULTS.lenses),  # noqa: B006 - Typer copies a default, never mutates it
    tokens: Annotated[int, typer.Option("--tokens", "-n", help="Held-out next-token predictions to probe.")] = DEFAULTS.tokens,
    seq_len: opt.SeqLen = DEFAULTS.seq_len,
    seed: opt.Seed = DEFAULTS.seed,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per forward pass.")] = DEFAULTS.batch_size,
    lens_train_tokens: opt.LensTrainTokens = DEFAULTS.lens_train_tokens,
    lens_steps: opt.LensSteps = DEFAULTS.lens_steps,
    lens_from: opt.LensFrom = None,
    retrain_lens: Annotated[
        bool, typer.Option("--retrain-lens", help="Train a new tuned lens even if --out already has one.")
    ] = DEFAULTS.retrain_lens,
    memory_budget_mib: Annotated[
        int,
        typer.Option(
            "--memory-budget",
            help="MiB for the full-vocabulary tensors of one token chunk: tokens are scored in "
            "chunks that fit it, so memory does not grow with vocabulary x layers.",
        ),
    ] = DEFAULTS.memory_budget_mib,
    out: opt.out_dir("Artifact dir: writes/extends it, plus probe/ tables (CSV, Parquet, JSON) and probe.png.") = None,
    device: opt.Device = DEFAULTS.device,
    dtype: opt.Dtype = DEFAULTS.dtype,
    device_map: opt.DeviceMap = DEFAULTS.device_map,
    max_memory: opt.MaxMemory = DEFAULTS.max_memory,
    as_json: opt.Json = False,
) -> None:
    from dyninfer.jobs import probe as job

    config = opt.config_from(ProbeConfig, locals(), lenses=_lens_list(lenses))
    run_and_save(
        config,
        job.run,
        job.save,
        render,
        out=out,
        as_json=as_json,
        wrote=lambda target, _: (
            f"wrote {target} (artifact) and {target / job.REPORT_DIR}/ (layers.csv, layers.parquet, depth.csv, summary.json, probe.png)"
        ),
    )

"""`dyninfer probe`: per-layer early-exit audit."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.table import Table

from dyninfer.cli.output import artifact_dir_option, handle_errors, print_json, progress_reporter, stderr, stdout
from dyninfer.cli.plots import probe_figure_png, sparkline
from dyninfer.data import DEFAULT_DATA
from dyninfer.models import DEFAULT_MODEL
from dyninfer.profilers.lenses import LENS_KINDS
from dyninfer.profilers.probe import REPORT_DIR, ProbeConfig, ProbeReport, run_probe_job, save_probe

HELP = """Per-layer exit accuracy: how early could each token leave the model?

For every layer (0 = embedding output): top-1 agreement with the final layer, next-token accuracy, KL(final || layer), entropy, max-probability and its calibration error (ECE); the prediction-depth distribution; and the oracle FLOP saving of exiting each token at its prediction depth (LM head counted at the exit).

Examples:

    dyninfer probe    (bundled model, Python docs, logit lens)

    dyninfer probe --lens both --out audit/    (train a tuned lens, keep it in the artifact)

    dyninfer probe ./my-model --data code.jsonl --field content --tokens 8192 --json
"""


def _lens_list(values: list[str]) -> tuple[str, ...]:
    kinds: list[str] = []
    for value in values:
        for part in value.split(","):
            part = part.strip().lower()
            expanded = list(LENS_KINDS) if part == "both" else [part]
            kinds += [k for k in expanded if k not in kinds]
    return tuple(kinds)


def render(report: ProbeReport) -> None:
    result = report.result
    lenses = result.lenses()
    table = Table(title=f"Exit probe: {report.base_model['spec']} on {report.data['spec']} "
                        f"({result.n_tokens} held-out tokens)", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("layer", justify="right")
    for lens in lenses:
        for metric in ("agree", "acc", "KL", "ECE", "exit"):
            table.add_column(f"{lens[:5]} {metric}", justify="right", no_wrap=True)
    by_lens = {lens: result.layers[result.layers["lens"] == lens].reset_index(drop=True) for lens in lenses}
    for index in range(len(by_lens[lenses[0]])):
        cells = ["embed" if index == 0 else str(index)]
        for lens in lenses:
            row = by_lens[lens].loc[index]
            cells += [f"{row.agreement:.1%}", f"{row.accuracy:.1%}", f"{row.kl:.3g}", f"{row.ece:.3f}",
                      f"{row.exit_fraction:.1%}"]
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
        stdout.print(f"tuned lens trained on {t.train_tokens} tokens in {t.seconds:.0f}s "
                     f"({t.steps} KL steps after {t.init} init)")
    stdout.print(f"throughput: probe {result.tokens_per_s:.1f} tokens/s, plain forward "
                 f"{result.forward_tokens_per_s:.1f} tokens/s")


@handle_errors
def probe(
    model: str = typer.Argument(DEFAULT_MODEL, help="`default` (bundled SmolLM2-135M), a model dir, a .gguf file or a hub id."),
    data: str = typer.Option(DEFAULT_DATA, "--data", "-d", help="builtin:pydocs, builtin:stdlib-code, a .txt/.jsonl/.parquet/.csv file, or hf:NAME[:CONFIG][:SPLIT]."),
    field: Optional[str] = typer.Option(None, "--field", help="Text field/column of .jsonl/.parquet/.csv/hf data (default: text)."),
    lens: list[str] = typer.Option(["logit"], "--lens", "-l", help="logit (training-free, always reported) and/or tuned (trains a tuned lens, or reuses --lens-from; reported beside logit). A tuned lens already in --out is reported too."),
    tokens: int = typer.Option(2048, "--tokens", "-n", help="Held-out next-token predictions to probe."),
    seq_len: int = typer.Option(256, "--seq-len", help="Tokens of context per window."),
    seed: int = typer.Option(0, "--seed", help="Seed for the data split and lens training."),
    batch_size: int = typer.Option(2, "--batch-size", help="Windows per forward pass."),
    lens_train_tokens: int = typer.Option(16384, "--lens-train-tokens", help="Training-split tokens for the tuned lens."),
    lens_steps: int = typer.Option(60, "--lens-steps", help="KL refinement steps of the tuned lens."),
    lens_from: Optional[Path] = typer.Option(None, "--lens-from", help="Reuse the tuned lens of this artifact instead of training."),
    retrain_lens: bool = typer.Option(False, "--retrain-lens", help="Train a new tuned lens even if --out already has one."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Artifact dir: writes/extends it, plus probe/ tables (CSV, Parquet, JSON) and probe.png."),
    as_json: bool = typer.Option(False, "--json", help="Print the machine-readable summary on stdout and nothing else."),
) -> None:
    config = ProbeConfig(
        model=model, data=data, field=field, lenses=_lens_list(lens), tokens=tokens, seq_len=seq_len, seed=seed,
        batch_size=batch_size, lens_train_tokens=lens_train_tokens, lens_steps=lens_steps,
        lens_from=str(lens_from) if lens_from else None, retrain_lens=retrain_lens,
    )
    config.validate()
    existing = artifact_dir_option(out)
    with progress_reporter() as progress:
        report = run_probe_job(config, progress=progress, existing=existing)
    if out is not None:
        title = f"{report.base_model['spec']} on {report.data['spec']}"
        png = probe_figure_png(report.result.layers, title)
        target = save_probe(report, out, extra_files={"probe.png": png})
        stderr.print(f"wrote {target} (artifact) and {target / REPORT_DIR}/ (layers.csv, layers.parquet, "
                     "depth.csv, summary.json, probe.png)")
    if as_json:
        print_json(report.summary())
    else:
        render(report)

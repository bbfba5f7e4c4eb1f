"""`dyninfer steer extract|sweep|apply`: CoT-Valve and activation steering of chain-of-thought length."""

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
from dyninfer.cli.plots import steer_sweep_png
from dyninfer.compressors.steer_extract import BUILTIN_COT
from dyninfer.compressors.steer_job import ExtractConfig, run_apply, run_extract, run_sweep_job
from dyninfer.errors import DyninferError
from dyninfer.models import DEFAULT_MODEL

HELP = """Find one direction that makes chains of thought shorter or longer, sweep its strength α, bake one α in.

Two methods. activation (Efficiency Steering / repeng): the difference of the mean hidden states of short and long solutions of the same questions, per layer, added to those layers' outputs; no training. valve (CoT-Valve): a LoRA trained on the short solutions, or the difference of two checkpoints/adapters; the model becomes θ + α·Δθ. In both, α = 0 is the base model exactly and positive α shortens. Paired data: the built-in arithmetic word problems (builtin:arithmetic with 2-4 operations per problem, or builtin:arithmetic:K with K; seeded, answers known) or a JSONL file with question, long, short and answer on every line.

Examples:

    dyninfer steer extract --method activation --out steer/      (bundled model, built-in problems)

    dyninfer steer extract --method valve --out steer/         (150 LoRA steps: ~9 min on 2 CPU cores)

    dyninfer steer sweep steer/ --method valve --alphas -0.5,0,0.25,0.5,0.75,1 --json

    dyninfer steer apply steer/ --method activation --alpha 0.5   (also writes control_vector.gguf)

    dyninfer run steer/ "Ada has 3 apples..." --mode full          (run, bench, calibrate and export use the steered model)
"""

EXTRACT_HELP = """Extract a steering direction from the base model and store it in the artifact (steering.safetensors + the steer stage).

Examples:

    dyninfer steer extract --method activation --layers 12,15 --kind pca --out steer/

    dyninfer steer extract ./my-model --method valve --data chains.jsonl --rank 16 --steps 300 --out steer/

    dyninfer steer extract --method valve --delta-from base --delta-to ./short-adapter --out steer/
"""

SWEEP_HELP = """For each α, answer held-out questions greedily and measure reasoning length (tokens), accuracy, agreement with the unsteered answers, and perplexity under the base model. Writes steer/sweep-METHOD/ (sweep.json, sweep.png) into the artifact.

Examples:

    dyninfer steer sweep steer/ --alphas -1,-0.5,0,0.5,1

    dyninfer steer sweep steer/ --method valve --questions 64 --max-new-tokens 192 --json
"""

APPLY_HELP = """Record α in the manifest: every loader (run, bench, calibrate, prune, export) bakes it into the weights, a merged θ + α·Δθ or the α-scaled direction folded into a bias, so the model needs no hooks. An activation direction is also written as a llama.cpp control vector, control_vector.gguf (`direction.{layer}` tensors, α folded in: load it at strength 1).

Examples:

    dyninfer steer apply steer/ --alpha 0.5

    dyninfer steer apply steer/ --method valve --alpha 0.75 && dyninfer calibrate --out steer/
"""

app = typer.Typer(help=HELP, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]}, rich_markup_mode=None)


def _numbers(text: str | None, option: str, kind=float) -> list:
    return number_list(text, option, kind, "12,15" if kind is int else "-1,-0.5,0,0.5,1")


def _existing_artifact(path: Path) -> str:
    if not path.is_dir():
        raise DyninferError(f"artifact '{path}' does not exist; make one with `dyninfer steer extract --out {path}`")
    return str(path)


def sweep_report_files(job) -> dict[str, bytes]:
    """The steer/sweep-METHOD/ report folder: sweep.json and sweep.png."""
    summary = {**job.result.to_dict(), "notes": job.notes}
    return {
        "sweep.json": json.dumps(summary, indent=2, default=str).encode(),
        "sweep.png": steer_sweep_png(summary["points"], f"{job.artifact.base_model.spec}: {job.result.method} steering"),
    }


def write_sweep_report(job, target: Path, files: dict[str, bytes] | None = None) -> None:
    """Write ARTIFACT/steer/sweep-METHOD/ (`files`: already rendered ones)."""
    (target / "steer").mkdir(exist_ok=True)
    write_report_dir(target / "steer" / f"sweep-{job.result.method}", files or sweep_report_files(job))


@app.command("extract", help=EXTRACT_HELP)
@handle_errors
def extract(
    model: str = typer.Argument(DEFAULT_MODEL, help="`default`, a model dir, a .gguf file or a hub id."),
    out: Path = typer.Option(..., "--out", "-o", help="Artifact dir to write or extend."),
    method: str = typer.Option("activation", "--method", "-m", help="activation (difference of means / PCA) or valve (LoRA / delta)."),
    data: str = typer.Option(BUILTIN_COT, "--data", "-d", help=f"{BUILTIN_COT} or a JSONL file (question, long, short, answer)."),
    examples: int = typer.Option(128, "--examples", help="Training examples (the first --shots become the prompt's worked examples)."),
    heldout: int = typer.Option(32, "--heldout", help="Held-out questions kept for sweep (a file holds out at most a fifth)."),
    shots: int = typer.Option(0, "--shots", help="Worked long examples shown before each question (default none: the model's own chain of thought is steered)."),
    layers: Optional[str] = typer.Option(None, "--layers", help="activation: decoder layers (0-based), e.g. 12,15; default: the middle one."),
    kind: str = typer.Option("mean", "--kind", help="activation: mean (difference of means) or pca (first principal direction)."),
    rank: int = typer.Option(8, "--rank", help="valve: LoRA rank."),
    steps: int = typer.Option(150, "--steps", help="valve: training steps."),
    lr: float = typer.Option(2e-3, "--lr", help="valve: learning rate."),
    batch_size: int = typer.Option(4, "--batch-size", help="Sequences per forward/training step."),
    targets: Optional[str] = typer.Option(None, "--targets", help="valve: comma-separated module names to adapt (default: all attention and MLP projections)."),
    delta_from: Optional[str] = typer.Option(None, "--delta-from", help="valve: Δθ = θ(--delta-to) − θ(this); `base`, a peft adapter dir or a checkpoint."),
    delta_to: Optional[str] = typer.Option(None, "--delta-to", help="valve: see --delta-from."),
    seed: int = typer.Option(0, "--seed"),
    as_json: bool = typer.Option(False, "--json", help="Print the machine-readable summary on stdout and nothing else."),
) -> None:
    config = ExtractConfig(model=model, method=method, data=data, examples=examples, heldout=heldout, seed=seed,
                           shots=shots, layers=_numbers(layers, "--layers", int) or None, kind=kind, rank=rank,
                           steps=steps, lr=lr, batch_size=batch_size,
                           targets=[t.strip() for t in targets.split(",") if t.strip()] if targets else None,
                           delta_from=delta_from, delta_to=delta_to)
    config.validate()
    existing = artifact_dir_option(out)
    with progress_reporter() as progress:
        report = run_extract(config, existing=existing, progress=progress)
    target = report.artifact.save(out)
    stderr.print(f"wrote {target} ({method} direction in steering.safetensors)")
    summary = report.summary()
    if as_json:
        print_json(summary)
        return
    record = report.record
    if method == "activation":
        for layer in record["layers"]:
            stdout.print(f"layer {layer}: |direction| {record['norms'][str(layer)]:.3f} "
                         f"(mean |hidden| {record['hidden_norms'][str(layer)]:.3f}), {record['kind']}")
    elif record.get("source") == "lora":
        stdout.print(f"LoRA rank {record['rank']} on {', '.join(record['targets'])}: {record['steps']} steps, "
                     f"loss {record['first_loss']:.3f} → {record['final_loss']:.3f}; "
                     f"{record['parameters']} weights adapted")
    else:
        stdout.print(f"Δθ = θ({record['delta_to']}) − θ({record['delta_from']}): {record['parameters']} weights")
    stdout.print(f"next: dyninfer steer sweep {out} --method {method}")


def render_sweep(result, notes: list[str]) -> None:
    stdout.print(f"[bold]{result.method} steering[/] on {result.questions} held-out questions "
                 f"(greedy, ≤ {result.max_new_tokens} new tokens)")
    table = Table(box=box.SIMPLE_HEAD)
    for name in ("α", "mean length", "Δ length", "hit limit", "accuracy", "same answer as α=0",
                 "right at α=0, still right", "perplexity"):
        table.add_column(name, justify="right")
    for p in result.points:
        table.add_row(f"{p.alpha:g}", f"{p.mean_length:.1f}", f"{p.length_change:+.1%}", f"{p.truncated:.0%}",
                      f"{p.accuracy:.1%}", f"{p.agreement:.1%}", "-" if p.retained is None else f"{p.retained:.1%}",
                      f"{p.perplexity:.2f}")
    stdout.print(table)
    stdout.print(f"Spearman ρ(α, mean length) = {result.spearman:+.3f}")
    if result.best:
        stdout.print(f"shortest setting keeping ≥ {result.keep:.0%} of the unsteered answers: α = {result.best.alpha:g} "
                     f"({result.best.length_change:+.1%} length, accuracy {result.best.accuracy:.1%})")
    else:
        stdout.print(f"no α ≠ 0 keeps ≥ {result.keep:.0%} of the unsteered answers")
    stdout.print(f"goal (|ρ| ≥ 0.9 and ≥ 30% shorter keeping the answers): {'met' if result.goal_met else 'not met'}")
    for note in notes:
        stdout.print(f"[yellow]note:[/] {note}")


@app.command("sweep", help=SWEEP_HELP)
@handle_errors
def sweep(
    artifact: Path = typer.Argument(..., help="Artifact dir holding a direction (from `steer extract`)."),
    method: Optional[str] = typer.Option(None, "--method", "-m", help="activation or valve (default: the only one held)."),
    alphas: str = typer.Option("-1,-0.5,0,0.5,1", "--alphas", help="Comma-separated α values (0 is always included)."),
    questions: Optional[int] = typer.Option(None, "--questions", help="Held-out questions (default: the extraction's --heldout)."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="Token limit per answer."),
    batch_size: int = typer.Option(16, "--batch-size", help="Questions generated together."),
    keep: float = typer.Option(0.9, "--keep", help="Fraction of unsteered answers a setting must keep to count as best."),
    model: Optional[str] = typer.Option(None, "--model", help="Load these weights instead of the artifact's base model spec."),
    as_json: bool = typer.Option(False, "--json", help="Print the machine-readable summary on stdout and nothing else."),
) -> None:
    path = _existing_artifact(artifact)
    values = _numbers(alphas, "--alphas")
    with progress_reporter() as progress:
        job = run_sweep_job(path, method, values, questions=questions, max_new_tokens=max_new_tokens,
                            batch_size=batch_size, keep=keep, model=model, progress=progress)
    result = job.result
    summary = {**result.to_dict(), "notes": job.notes}
    target = job.artifact.save(path)
    write_sweep_report(job, target)
    stderr.print(f"wrote {target / 'steer' / f'sweep-{result.method}'}/ and the sweep summary in the manifest")
    if as_json:
        print_json(summary)
    else:
        render_sweep(result, job.notes)


@app.command("apply", help=APPLY_HELP)
@handle_errors
def apply(
    artifact: Path = typer.Argument(..., help="Artifact dir holding a direction."),
    alpha: float = typer.Option(..., "--alpha", "-a", help="Strength: 0 is the base model, positive shortens."),
    method: Optional[str] = typer.Option(None, "--method", "-m", help="activation or valve (default: the only one held)."),
    as_json: bool = typer.Option(False, "--json", help="Print the machine-readable summary on stdout and nothing else."),
) -> None:
    result = run_apply(_existing_artifact(artifact), method, alpha)
    summary = {"artifact": str(artifact), "method": result.method, "alpha": result.alpha,
               "control_vector": str(result.gguf) if result.gguf else None, "notes": result.notes}
    if as_json:
        print_json(summary)
        return
    stdout.print(f"applied {result.method} steering at α = {result.alpha:g} to {artifact}; run, bench, calibrate, "
                 "prune and export now use the steered model")
    if result.gguf:
        stdout.print(f"llama.cpp control vector: {result.gguf} (load it with --control-vector {result.gguf.name})")
    for note in result.notes:
        stdout.print(f"[yellow]note:[/] {note}")

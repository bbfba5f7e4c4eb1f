"""`dyninfer steer extract|sweep|apply`: CoT-Valve and activation steering of chain-of-thought length."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from dyninfer.cli import options as opt
from dyninfer.cli.output import check_out_dir, handle_errors, notes, print_json, progress_reporter, stderr, stdout, waiting, writing
from dyninfer.core.choices import BUILTIN_COT
from dyninfer.core.errors import DyninferError
from dyninfer.jobs.configs import ApplyConfig, ExtractConfig, SweepConfig

EXTRACT = ExtractConfig()
SWEEP = SweepConfig()

HELP = """Find one direction that makes chains of thought shorter or longer, sweep its strength α, bake one α in.

Two methods. activation (Efficiency Steering / repeng): the difference of the mean hidden states of short and long solutions of the same questions, per layer, added to those layers' outputs; no training. valve (CoT-Valve): a LoRA trained on the short solutions, or the difference of two checkpoints/adapters; the model becomes θ + α·Δθ. In both, α = 0 is the base model exactly and positive α shortens. Paired data: the built-in arithmetic word problems (builtin:arithmetic with 2-4 operations per problem, or builtin:arithmetic:K with K; seeded, answers known) or a JSONL file with question, long, short and answer on every line.

Examples:

    dyninfer steer extract --method activation --out steer/      (bundled model, built-in problems)

    dyninfer steer extract --method valve --out steer/         (150 LoRA steps: ~9 min on 2 CPU cores)

    dyninfer steer sweep steer/ --method valve --alphas -0.5,0,0.25,0.5,0.75,1 --json

    dyninfer steer apply steer/ --method activation --alpha 0.5   (also writes control_vector.gguf)

    dyninfer run steer/ "Ada has 3 apples..." --mode full          (run, bench, calibrate and export use the steered model)
"""  # noqa: E501 (help paragraphs are one line each: Typer keeps line breaks)

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
"""  # noqa: E501 (help paragraphs are one line each: Typer keeps line breaks)

APPLY_HELP = """Record α in the manifest: every loader (run, bench, calibrate, prune, export) bakes it into the weights, a merged θ + α·Δθ or the α-scaled direction folded into a bias, so the model needs no hooks. An activation direction is also written as a llama.cpp control vector, control_vector.gguf (`direction.{layer}` tensors, α folded in: load it at strength 1).

Examples:

    dyninfer steer apply steer/ --alpha 0.5

    dyninfer steer apply steer/ --method valve --alpha 0.75 && dyninfer calibrate --out steer/
"""  # noqa: E501 (help paragraphs are one line each: Typer keeps line breaks)

app = typer.Typer(
    help=HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

Method = Annotated[str | None, typer.Option("--method", "-m", help="activation or valve (default: the only one the artifact holds).")]
SteerArtifact = Annotated[Path, typer.Argument(help="Artifact dir holding a direction (from `steer extract`).")]


def _existing_artifact(path: Path) -> str:
    if not path.is_dir():
        raise DyninferError(f"artifact '{path}' does not exist; make one with `dyninfer steer extract --out {path}`")
    return str(path)


@app.command("extract", help=EXTRACT_HELP)
@handle_errors
def extract(
    model: opt.Model = EXTRACT.model,
    out: Annotated[Path, typer.Option("--out", "-o", help="Artifact dir to write or extend.")] = ...,
    method: Annotated[
        str, typer.Option("--method", "-m", help="activation (difference of means / PCA) or valve (LoRA / delta).")
    ] = EXTRACT.method,
    data: Annotated[
        str, typer.Option("--data", "-d", help=f"{BUILTIN_COT} or a JSONL file (question, long, short, answer).")
    ] = EXTRACT.data,
    examples: Annotated[
        int, typer.Option("--examples", help="Training examples (the first --shots become the prompt's worked examples).")
    ] = EXTRACT.examples,
    heldout: Annotated[
        int, typer.Option("--heldout", help="Held-out questions kept for sweep (a file holds out at most a fifth).")
    ] = EXTRACT.heldout,
    shots: Annotated[
        int,
        typer.Option(
            "--shots", help="Worked long examples shown before each question (default none: the model's own chain of thought is steered)."
        ),
    ] = EXTRACT.shots,
    layers: Annotated[
        opt.Numbers | None,
        typer.Option(
            "--layers", parser=opt.ints, metavar="I,J", help="activation: decoder layers (0-based), e.g. 12,15; default: the middle one."
        ),
    ] = EXTRACT.layers,
    kind: Annotated[
        str, typer.Option("--kind", help="activation: mean (difference of means) or pca (first principal direction).")
    ] = EXTRACT.kind,
    rank: Annotated[int, typer.Option("--rank", help="valve: LoRA rank.")] = EXTRACT.rank,
    steps: Annotated[int, typer.Option("--steps", help="valve: training steps.")] = EXTRACT.steps,
    lr: Annotated[float, typer.Option("--lr", help="valve: learning rate.")] = EXTRACT.lr,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences per forward/training step.")] = EXTRACT.batch_size,
    targets: Annotated[
        opt.Numbers | None,
        typer.Option(
            "--targets",
            parser=opt.names,
            metavar="NAME,NAME",
            help="valve: comma-separated module names to adapt (default: all attention and MLP projections).",
        ),
    ] = EXTRACT.targets,
    delta_from: Annotated[
        str | None, typer.Option("--delta-from", help="valve: Δθ = θ(--delta-to) − θ(this); `base`, a peft adapter dir or a checkpoint.")
    ] = EXTRACT.delta_from,
    delta_to: Annotated[str | None, typer.Option("--delta-to", help="valve: see --delta-from.")] = EXTRACT.delta_to,
    seed: opt.Seed = EXTRACT.seed,
    device: opt.Device = EXTRACT.device,
    dtype: opt.Dtype = EXTRACT.dtype,
    device_map: opt.DeviceMap = EXTRACT.device_map,
    max_memory: opt.MaxMemory = EXTRACT.max_memory,
    as_json: opt.Json = False,
) -> None:
    from dyninfer.jobs import steer as job

    config = opt.config_from(ExtractConfig, locals())
    config.validate()
    check_out_dir(out)
    with writing(out), progress_reporter() as progress:
        report = job.extract(config, existing=str(out), progress=progress)
        target = job.save_extract(report, out, waiting(out))
    stderr.print(f"wrote {target} ({method} direction in steering.safetensors)", markup=False)
    if as_json:
        print_json(report.summary())
        return
    render_extract(report.record, method, out)


def render_extract(record: dict, method: str, out: Path) -> None:
    """What the extraction found (per layer, or the LoRA's training, or the delta) and the next command."""
    if method == "activation":
        for layer in record["layers"]:
            stdout.print(
                f"layer {layer}: |direction| {record['norms'][str(layer)]:.3f} "
                f"(mean |hidden| {record['hidden_norms'][str(layer)]:.3f}), {record['kind']}"
            )
    elif record.get("source") == "lora":
        stdout.print(
            f"LoRA rank {record['rank']} on {', '.join(record['targets'])}: {record['steps']} steps, "
            f"loss {record['first_loss']:.3f} → {record['final_loss']:.3f}; "
            f"{record['parameters']} weights adapted"
        )
    else:
        stdout.print(f"Δθ = θ({record['delta_to']}) − θ({record['delta_from']}): {record['parameters']} weights", markup=False)
    stdout.print(f"next: dyninfer steer sweep {out} --method {method}", markup=False)


def render_sweep(result, lines: list[str]) -> None:
    stdout.print(
        f"[bold]{result.method} steering[/] on {result.questions} held-out questions (greedy, ≤ {result.max_new_tokens} new tokens)"
    )
    table = Table(box=box.SIMPLE_HEAD)
    for name in ("α", "mean length", "Δ length", "hit limit", "accuracy", "same answer as α=0", "right at α=0, still right", "perplexity"):
        table.add_column(name, justify="right")
    for p in result.points:
        table.add_row(
            f"{p.alpha:g}",
            f"{p.mean_length:.1f}",
            f"{p.length_change:+.1%}",
            f"{p.truncated:.0%}",
            f"{p.accuracy:.1%}",
            f"{p.agreement:.1%}",
            "-" if p.retained is None else f"{p.retained:.1%}",
            f"{p.perplexity:.2f}",
        )
    stdout.print(table)
    stdout.print(f"Spearman ρ(α, mean length) = {result.spearman:+.3f}")
    if result.best:
        stdout.print(
            f"shortest setting keeping ≥ {result.keep:.0%} of the unsteered answers: α = {result.best.alpha:g} "
            f"({result.best.length_change:+.1%} length, accuracy {result.best.accuracy:.1%})"
        )
    else:
        stdout.print(f"no α ≠ 0 keeps ≥ {result.keep:.0%} of the unsteered answers")
    stdout.print(f"goal (|ρ| ≥ 0.9 and ≥ 30% shorter keeping the answers): {'met' if result.goal_met else 'not met'}")
    notes(lines)


@app.command("sweep", help=SWEEP_HELP)
@handle_errors
def sweep(
    artifact: SteerArtifact,
    method: Method = SWEEP.method,
    alphas: Annotated[
        opt.Numbers, typer.Option("--alphas", parser=opt.floats, metavar="A,B", help="Comma-separated α values (0 is always included).")
    ] = SWEEP.alphas,
    questions: Annotated[
        int | None, typer.Option("--questions", help="Held-out questions (default: the extraction's --heldout).")
    ] = SWEEP.questions,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Token limit per answer.")] = SWEEP.max_new_tokens,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Questions generated together.")] = SWEEP.batch_size,
    keep: Annotated[float, typer.Option("--keep", help="Fraction of unsteered answers a setting must keep to count as best.")] = SWEEP.keep,
    model: opt.ModelOverride = SWEEP.model,
    device: opt.Device = SWEEP.device,
    dtype: opt.Dtype = SWEEP.dtype,
    device_map: opt.DeviceMap = SWEEP.device_map,
    max_memory: opt.MaxMemory = SWEEP.max_memory,
    as_json: opt.Json = False,
) -> None:
    from dyninfer.jobs import steer as job

    config = opt.config_from(SweepConfig, locals())
    config.validate()
    path = _existing_artifact(artifact)
    with writing(path), progress_reporter() as progress:
        report = job.sweep(config, path, progress=progress)
        target = job.save_sweep(report, path, waiting(path))
    stderr.print(f"wrote {target / report.folder}/ and the sweep summary in the manifest", markup=False)
    if as_json:
        print_json(report.summary())
    else:
        render_sweep(report.result, report.notes)


@app.command("apply", help=APPLY_HELP)
@handle_errors
def apply(
    artifact: SteerArtifact,
    alpha: Annotated[float, typer.Option("--alpha", "-a", help="Strength: 0 is the base model, positive shortens.")],
    method: Method = None,
    as_json: opt.Json = False,
) -> None:
    path = _existing_artifact(artifact)
    from dyninfer.jobs import steer as job

    with writing(path):
        result = job.apply(ApplyConfig(alpha=alpha, method=method), path, waiting(path))
    if as_json:
        print_json(result.summary() | {"artifact": str(artifact)})
        return
    stdout.print(
        f"applied {result.method} steering at α = {result.alpha:g} to {artifact}; run, bench, calibrate, "
        "prune and export now use the steered model",
        markup=False,
    )
    if result.gguf:
        stdout.print(f"llama.cpp control vector: {result.gguf} (load it with --control-vector {result.gguf.name})", markup=False)
    notes(result.notes)

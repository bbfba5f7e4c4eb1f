"""`dyninfer run`: generate with the dynamic model, each token coloured by its exit layer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from dyninfer.cli import options as opt
from dyninfer.cli.output import handle_errors, notes, print_json, progress_reporter, stderr, stdout
from dyninfer.jobs.configs import RunConfig

DEFAULTS = RunConfig()
_PALETTE = ["bright_green", "green", "yellow", "dark_orange", "red"]


def _colour(depth: int, num_layers: int) -> str:
    if depth >= num_layers:
        return "white"
    return _PALETTE[min(len(_PALETTE) - 1, int(len(_PALETTE) * depth / num_layers))]


HELP = """Generate text with the dynamic model of an artifact; each token is coloured by the layer it left at.

Examples:

    dyninfer run audit/ "Explain Python's GIL in one sentence."

    dyninfer run audit/ "def fibonacci(n):" --raw --max-new-tokens 48

    dyninfer run audit/ "Hello" --mode speculative --json    (lossless: identical to the full model)

    dyninfer run audit/ "Hello" --backend onnx --provider cuda    (the package from `dyninfer export`)

    dyninfer run audit/ "import os" --raw --mode full --stop completion    (stops where the completion stops being worth it)

    dyninfer run audit/ "Ada has 3 apples and gets 4 more. How many?" --mode full --stop reasoning --max-new-tokens 160
"""


@handle_errors
def run(
    artifact: Annotated[
        Path, typer.Argument(help="Artifact dir made by `dyninfer calibrate --out` (or, with --backend onnx, an exported package).")
    ],
    prompt: Annotated[str, typer.Argument(help="The prompt text.")],
    mode: Annotated[str, typer.Option("--mode", help="early-exit, speculative (lossless; torch backend) or full.")] = DEFAULTS.mode,
    backend: Annotated[str, typer.Option("--backend", help="torch, or onnx (the package made by `dyninfer export`).")] = DEFAULTS.backend,
    provider: opt.Provider = DEFAULTS.provider,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Tokens to generate at most.")] = DEFAULTS.max_new_tokens,
    sample: Annotated[bool, typer.Option("--sample", help="Sample instead of greedy decoding.")] = DEFAULTS.sample,
    temperature: Annotated[float, typer.Option("--temperature", help="Sampling temperature.")] = DEFAULTS.temperature,
    seed: opt.Seed = DEFAULTS.seed,
    raw: Annotated[bool, typer.Option("--raw", help="Do not wrap the prompt in the model's chat template.")] = DEFAULTS.raw,
    model: opt.ModelOverride = DEFAULTS.model,
    kv_mode: opt.KvMode = DEFAULTS.kv_mode,
    draft_layer: opt.DraftLayer = DEFAULTS.draft_layer,
    draft_threshold: opt.DraftThreshold = DEFAULTS.draft_threshold,
    stop: Annotated[
        str | None,
        typer.Option("--stop", help="Obey the artifact's certified stop rule: completion, or reasoning (made by `dyninfer stop`)."),
    ] = DEFAULTS.stop,
    device: opt.Device = DEFAULTS.device,
    dtype: opt.Dtype = DEFAULTS.dtype,
    device_map: opt.DeviceMap = DEFAULTS.device_map,
    max_memory: opt.MaxMemory = DEFAULTS.max_memory,
    as_json: opt.Json = False,
) -> None:
    from dyninfer.jobs import run as job

    config = opt.config_from(RunConfig, locals())
    with progress_reporter() as progress:
        report = job.run(config, artifact, prompt, progress=progress)
    result, layers = report.result, report.num_layers
    if as_json:
        print_json(report.summary())
        return
    text = Text()
    for piece, depth in zip(report.token_texts, result.exit_layers):
        text.append(piece, style=_colour(depth, layers))
    stdout.print(text)
    legend = Text("exit layer: ")
    bounds = sorted({max(1, int(layers * (i + 1) / len(_PALETTE))) for i in range(len(_PALETTE))} - {layers})
    for bound in bounds:
        legend.append(f"≤{bound} ", style=_colour(bound - 1, layers))
    legend.append(f"full ({layers})", style="white")
    stdout.print(legend)
    extra = f", draft acceptance {result.acceptance:.0%}" if result.acceptance is not None else ""
    if result.stop is not None:
        probes = f", {result.stop['probes']} probes ({result.stop['probe_tokens']} tokens)" if "probes" in result.stop else ""
        extra += f"; ended by: {result.stop['reason']}{probes}"
    notes(report.notes, stderr)
    stdout.print(
        f"{result.new_tokens} tokens, mean exit layer {result.mean_exit_layer:.1f}/{layers}, "
        f"{result.tokens_per_s:.1f} tokens/s ({config.mode}{extra})"
    )

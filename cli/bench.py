"""`dyninfer bench`: the dynamic model against the full model, side by side, with CI gates."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.table import Table

from dyninfer.cli.output import EXIT_GATE_FAILED, handle_errors, print_json, progress_reporter, stderr, stdout
from dyninfer.cli.run import BACKENDS
from dyninfer.compressors.from_artifact import load_dynamic
from dyninfer.data import DEFAULT_DATA, load_windows
from dyninfer.errors import DyninferError
from dyninfer.profilers.bench import BenchResult, run_bench, run_onnx_bench

HELP = """Benchmark the artifact's dynamic model against the full model in one run (batch 1, greedy).

Same prompts (the start of held-out windows of --data) for every mode: the full model through transformers with its KV cache (the baseline), the calibrated early exit, lossless self-speculation, and the dynamic code path with exits disabled. With --backend onnx: optimum's ORTModelForCausalLM on the plain model (the baseline), the exported dynamic package with its exits and with exits disabled, and the torch dynamic model. Reports tokens/s, speedup, token consistency with the baseline, perplexity of the output under the full model, and realized vs predicted speedup.

Exit codes: 0 pass, 1 a gate (--min-speedup, --min-consistency) failed, 2 bad input.

Examples:

    dyninfer bench audit/

    dyninfer bench audit/ --prompts 16 --new-tokens 128 --json

    dyninfer bench audit/ --min-speedup 1.1 --min-consistency 0.9    (CI gate)

    dyninfer bench audit/ --backend onnx    (after `dyninfer export audit/`: vs optimum's ORTModelForCausalLM)
"""


def render(result: BenchResult) -> None:
    table = Table(box=box.SIMPLE_HEAD, title=f"{result.prompts} prompts × {result.new_tokens} new tokens, batch 1, KV of skipped layers: {result.kv_mode}",
                  title_justify="left")
    for name in ("mode", "tokens/s", "speedup", "consistency", "shared prefix", "perplexity", "mean exit layer",
                 "draft acceptance"):
        table.add_column(name, justify="left" if name == "mode" else "right")
    for m in result.modes:
        table.add_row(m.mode, f"{m.tokens_per_s:.1f}", f"{m.speedup:.3f}x", f"{m.consistency:.1%}",
                      f"{m.prefix_agreement:.1%}", f"{m.perplexity:.3g}", f"{m.mean_exit_layer:.1f}",
                      "-" if m.acceptance is None else f"{m.acceptance:.1%}")
    stdout.print(table)
    if result.predicted_speedup:
        early = result.gated
        stdout.print(f"{early.mode}: realized {early.speedup:.3f}x vs predicted {result.predicted_speedup:.3f}x "
                     f"({result.predicted_unit} model) = {early.speedup / result.predicted_speedup:.2f}")
    for note in result.notes:
        stdout.print(f"[yellow]note:[/] {note}")


@handle_errors
def bench(
    artifact: Path = typer.Argument(..., help="Artifact dir made by `dyninfer calibrate --out`."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Prompt source (default: the calibration's data)."),
    field: Optional[str] = typer.Option(None, "--field"),
    prompts: int = typer.Option(8, "--prompts", help="Number of prompts."),
    prompt_tokens: int = typer.Option(64, "--prompt-tokens", help="Tokens per prompt."),
    new_tokens: int = typer.Option(64, "--new-tokens", help="Tokens generated per prompt."),
    seed: int = typer.Option(0, "--seed"),
    model: Optional[str] = typer.Option(None, "--model", help="Load the base model from here instead (same weights)."),
    kv_mode: Optional[str] = typer.Option(None, "--kv-mode", help="Override the policy's KV mode: propagate or recompute."),
    draft_layer: Optional[int] = typer.Option(None, "--draft-layer", help="Speculative mode: draft with the exit after this layer (default: 70% of the depth)."),
    draft_threshold: float = typer.Option(0.5, "--draft-threshold", help="Speculative mode: keep drafting while the draft's max probability is at least this."),
    min_speedup: Optional[float] = typer.Option(None, "--min-speedup", help="Gate: early-exit speedup at least this."),
    min_consistency: Optional[float] = typer.Option(None, "--min-consistency", help="Gate: early-exit token consistency at least this."),
    backend: str = typer.Option("torch", "--backend", help="torch, or onnx: the exported package vs optimum's ORT model."),
    package: Optional[Path] = typer.Option(None, "--package", help="ONNX backend: the exported package (default: ARTIFACT/onnx)."),
    provider: Optional[str] = typer.Option(None, "--provider", help="ONNX backend: cuda or cpu (default: the package's)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output only."),
) -> None:
    for name, value in (("--prompts", prompts), ("--prompt-tokens", prompt_tokens), ("--new-tokens", new_tokens)):
        if value < 1:
            raise DyninferError(f"{name} must be at least 1, got {value}")
    if backend not in BACKENDS:
        raise DyninferError(f"--backend must be one of {', '.join(BACKENDS)}, got '{backend}'")
    with progress_reporter() as progress:
        dyn = load_dynamic(str(artifact), model, kv_mode=kv_mode, full_depth_is_enough=backend == "torch")
        spec = data or dyn.calibration.get("data", {}).get("spec") or DEFAULT_DATA
        windows = load_windows(spec, dyn.loaded.tokenizer, field=field, seq_len=prompt_tokens, seed=seed)
        prompt_ids = windows.take("heldout", prompts * prompt_tokens, option="--prompts")[:, :prompt_tokens]
        if backend == "onnx":
            result = run_onnx_bench(dyn, package or artifact / "onnx", prompt_ids, new_tokens, provider=provider,
                                    progress=progress)
        else:
            result = run_bench(dyn, prompt_ids, new_tokens, draft_layer=draft_layer,
                               draft_threshold=draft_threshold, progress=progress)
    early = result.gated
    failures = []
    if min_speedup is not None and not early.speedup >= min_speedup:
        failures.append(f"speedup {early.speedup:.3f}x < --min-speedup {min_speedup}")
    if min_consistency is not None and not early.consistency >= min_consistency:
        failures.append(f"consistency {early.consistency:.3f} < --min-consistency {min_consistency}")
    if as_json:
        print_json({"command": "bench", "data": spec, **result.to_dict(), "gates_failed": failures})
    else:
        render(result)
    for failure in failures:
        stderr.print(f"[bold red]gate failed:[/] {failure}")
    if failures:
        raise typer.Exit(EXIT_GATE_FAILED)

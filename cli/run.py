"""`dyninfer run`: generate with the dynamic model, each token coloured by its exit layer."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import typer
from rich.text import Text

from dyninfer.cli.output import handle_errors, print_json, progress_reporter, stderr, stdout
from dyninfer.compressors.dynamic import MODES
from dyninfer.compressors.from_artifact import load_dynamic
from dyninfer.errors import DyninferError

HELP = """Generate text with the dynamic model of an artifact; each token is coloured by the layer it left at.

Examples:

    dyninfer run audit/ "Explain Python's GIL in one sentence."

    dyninfer run audit/ "def fibonacci(n):" --raw --max-new-tokens 48

    dyninfer run audit/ "Hello" --mode speculative --json    (lossless: identical to the full model)

    dyninfer run audit/ "Hello" --backend onnx --provider cuda    (the package from `dyninfer export`)
"""

BACKENDS = ("torch", "onnx")
_PALETTE = ["bright_green", "green", "yellow", "dark_orange", "red"]


def _colour(depth: int, num_layers: int) -> str:
    if depth >= num_layers:
        return "white"
    return _PALETTE[min(len(_PALETTE) - 1, int(len(_PALETTE) * depth / num_layers))]


def _run_onnx(path: Path, prompt: str, mode: str, provider, max_new_tokens, sample, temperature, seed, raw):
    from transformers import AutoTokenizer

    from dyninfer.exporters.runtime import OnnxDynamicModel, find_package

    if mode == "speculative":
        raise DyninferError("the ONNX backend runs --mode early-exit or full; speculative runs with --backend torch")
    package = find_package(path)
    runtime = OnnxDynamicModel(package, provider=provider)
    tokenizer = AutoTokenizer.from_pretrained(str(package))
    ids = encode_prompt(tokenizer, prompt, raw)
    result = runtime.generate(ids.numpy(), max_new_tokens, mode=mode, sample=sample, temperature=temperature,
                              seed=seed, eos_token_id=tokenizer.eos_token_id)
    return result, tokenizer, runtime.num_layers


def encode_prompt(tokenizer, prompt: str, raw: bool) -> torch.Tensor:
    if not prompt.strip():
        raise DyninferError("the prompt is empty; pass some text")
    if not raw and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt")
        return ids if isinstance(ids, torch.Tensor) else torch.tensor([ids])
    return tokenizer(prompt, return_tensors="pt").input_ids


@handle_errors
def run(
    artifact: Path = typer.Argument(..., help="Artifact dir made by `dyninfer calibrate --out` (or, with --backend onnx, an exported package)."),
    prompt: str = typer.Argument(..., help="The prompt text."),
    mode: str = typer.Option("early-exit", "--mode", help="early-exit, speculative (lossless; torch backend) or full."),
    backend: str = typer.Option("torch", "--backend", help="torch, or onnx (the package made by `dyninfer export`)."),
    provider: Optional[str] = typer.Option(None, "--provider", help="ONNX backend: cuda or cpu (default: the package's; CUDA falls back to CPU)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n"),
    sample: bool = typer.Option(False, "--sample", help="Sample instead of greedy decoding."),
    temperature: float = typer.Option(0.8, "--temperature"),
    seed: int = typer.Option(0, "--seed"),
    raw: bool = typer.Option(False, "--raw", help="Do not wrap the prompt in the model's chat template."),
    model: Optional[str] = typer.Option(None, "--model", help="Load the base model from here instead (same weights)."),
    kv_mode: Optional[str] = typer.Option(None, "--kv-mode", help="Override the policy's KV mode: propagate or recompute."),
    draft_layer: Optional[int] = typer.Option(None, "--draft-layer", help="Speculative mode: draft with the exit after this layer (default: 70% of the depth)."),
    draft_threshold: float = typer.Option(0.5, "--draft-threshold", help="Speculative mode: keep drafting while the draft's max probability is at least this."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output only."),
) -> None:
    if mode not in MODES:
        raise DyninferError(f"--mode must be one of {', '.join(MODES)}, got '{mode}'")
    if backend not in BACKENDS:
        raise DyninferError(f"--backend must be one of {', '.join(BACKENDS)}, got '{backend}'")
    if backend == "onnx":
        result, tokenizer, layers = _run_onnx(artifact, prompt, mode, provider, max_new_tokens, sample, temperature,
                                              seed, raw)
    else:
        with progress_reporter() as progress:
            progress("loading model", 0, 1)
            dyn = load_dynamic(str(artifact), model, require_policy=mode == "early-exit", kv_mode=kv_mode)
            progress("loading model", 1, 1)
        tokenizer = dyn.loaded.tokenizer
        ids = encode_prompt(tokenizer, prompt, raw)
        result = dyn.dynamic.generate(ids, max_new_tokens, mode=mode, sample=sample, temperature=temperature,
                                      seed=seed, eos_token_id=tokenizer.eos_token_id, draft_layer=draft_layer,
                                      draft_threshold=draft_threshold)
        layers = dyn.loaded.layered.num_layers
    tokens = [int(t) for t in result.tokens[0]]
    if as_json:
        print_json({
            "command": "run", "mode": mode, "text": tokenizer.decode(tokens, skip_special_tokens=True),
            "tokens": [{"id": t, "text": tokenizer.decode([t]), "exit_layer": e, "confidence": c}
                       for t, e, c in zip(tokens, result.exit_layers, result.confidences)],
            "mean_exit_layer": result.mean_exit_layer, "num_layers": layers, "tokens_per_s": result.tokens_per_s,
            "acceptance": result.acceptance, "backend": backend, "notes": result.notes,
        })
        return
    text = Text()
    for token, depth in zip(tokens, result.exit_layers):
        text.append(tokenizer.decode([token]), style=_colour(depth, layers))
    stdout.print(text)
    legend = Text("exit layer: ")
    bounds = sorted({max(1, int(layers * (i + 1) / len(_PALETTE))) for i in range(len(_PALETTE))} - {layers})
    for bound in bounds:
        legend.append(f"≤{bound} ", style=_colour(bound - 1, layers))
    legend.append(f"full ({layers})", style="white")
    stdout.print(legend)
    extra = f", draft acceptance {result.acceptance:.0%}" if result.acceptance is not None else ""
    for note in result.notes:
        stderr.print(f"[yellow]note:[/] {note}")
    stdout.print(f"{result.new_tokens} tokens, mean exit layer {result.mean_exit_layer:.1f}/{layers}, "
                 f"{result.tokens_per_s:.1f} tokens/s ({mode}{extra})")

"""Exported packages side by side with what a user would ship instead, in one run.

Rows: transformers on the original model (the reference for consistency, perplexity and fidelity), optimum's
ORTModelForCausalLM in float and at the package's precision (its baseline/ exports), each package with exits on and
disabled, and any other row a caller adds (onnxruntime-genai's export: profilers/genai_row.py). Every row decodes the
same prompts, interleaved prompt by prompt, batch 1, greedy; each reports tokens/s, the prefill's time and the
decode's tokens/s apart, its free-running consistency with the original model, and its fidelity fed the original
model's continuations (same top-1, mean and 99th-percentile KL, perplexity ratio: certification/fidelity.py's
measures). Package rows also report the share of their decoding time spent outside ONNX Runtime (Python, binding,
stop checks). Peak memory is measured per row in a process of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from dyninfer.certification.fidelity import ForcedLogits, decoder_logits, measure_fidelity
from dyninfer.compressors.pruning import dense_inside
from dyninfer.core.layered import LayeredModel
from dyninfer.core.progress import ProgressFn, silent
from dyninfer.exporters.baseline import OptimumBaseline, load_optimum_baseline
from dyninfer.profilers.bench import (
    ORIGINAL_MODEL,
    BenchResult,
    ModeResult,
    check_sizes,
    compare_side_by_side,
    dense_greedy,
    kv_mode_of,
    plain_result,
    predicted_speedup_of,
    predicted_unit_of,
)
from dyninfer.profilers.row_memory import row_peak_memory
from dyninfer.runtime.decoding import GenerationResult, generate
from dyninfer.runtime.loader import LoadedDynamic
from dyninfer.runtime.onnx_decoder import OnnxDecoder

PACKAGE_EXITS, PACKAGE_DISABLED = "package early-exit", "package exits disabled"
MemoryProbe = Callable[[list[int], int], dict]  # (prompt ids, new tokens) -> {peak_rss_mib, imports_rss_mib, model_rss_mib}


@dataclass
class Row:
    """One way of running the model: how it decodes a prompt, its logits fed a continuation, its memory probe."""

    name: str
    generate: Callable[[torch.Tensor], GenerationResult]
    forced: ForcedLogits | None = None
    threshold: float | None = None  # the exit threshold `forced` runs at (None: exits disabled)
    memory: MemoryProbe | None = None
    host: list | None = None  # package rows: [seconds decoding, of them inside ONNX Runtime]
    warm: Callable[[torch.Tensor], object] | None = None  # one short run before timing (default: generate)


def package_rows(runtime: OnnxDecoder, new_tokens: int, label: str = "package", with_exits: bool | None = None) -> list[Row]:
    """A package with its exits and with exits disabled (`with_exits` None: the exits row only when the package has a
    threshold)."""
    rows = []
    exits = runtime.exit_threshold("early-exit") is not None if with_exits is None else with_exits
    modes = [("early-exit", f"{label} early-exit")] if exits else []
    for mode, name in [*modes, ("full", f"{label} exits disabled")]:
        host = [0.0, 0.0]
        rows.append(
            Row(
                name,
                _package_runner(runtime, mode, new_tokens, host),
                decoder_logits(runtime),
                runtime.exit_threshold(mode),
                _package_memory(runtime, mode),
                host,
                lambda prompt, _mode=mode: generate(runtime, prompt.numpy(), 2, mode=_mode),
            )
        )
    return rows


def optimum_rows(runtime: OnnxDecoder, new_tokens: int) -> list[Row]:
    """optimum's exports in the package's baseline/: the plain model at the package's precision and, for a quantized
    package, in float."""
    manifest, package = runtime.manifest, runtime.path
    found = {f"optimum {manifest.precision}": load_optimum_baseline(package, runtime.provider)}
    if manifest.baseline_full:  # a quantized package: the plain model's float export beside the quantized one
        found = {f"optimum {manifest.dtype}": load_optimum_baseline(package, runtime.provider, full=True)} | found
    depth, provider = runtime.num_layers, runtime.device
    return [
        Row(
            name,
            _optimum_runner(optimum, name, new_tokens, depth),
            _optimum_logits(optimum),
            memory=lambda prompt, new, folder=str(optimum.folder): row_peak_memory("optimum", folder, prompt, new, provider, "full"),
            warm=lambda prompt, _optimum=optimum: _optimum.greedy(prompt, 2),
        )
        for name, optimum in found.items()
    ]


def compare_rows(
    lm: LayeredModel,
    rows: list[Row],
    prompts: torch.Tensor,
    new_tokens: int,
    *,
    original_memory: MemoryProbe | None = None,
    progress: ProgressFn | None = None,
) -> list[ModeResult]:
    """Every row and the original model (first, the reference) on each prompt in turn, then each row's fidelity on the
    original model's continuations and, with probes, its peak memory."""
    check_sizes(prompts, new_tokens)
    warm = prompts[:1, : min(8, prompts.shape[1])]
    dense_greedy(lm, 2)(warm)
    for row in rows:
        (row.warm or row.generate)(warm)
    runs: dict[str, list] = {}
    runners = {row.name: row.generate for row in rows}
    results = compare_side_by_side(lm, ORIGINAL_MODEL, dense_greedy(lm, new_tokens), runners, prompts, progress, keep=runs)
    by_name = {m.mode: m for m in results}
    for row in rows:
        if row.host is not None and row.host[0] > 0:
            by_name[row.name].host_overhead = 1.0 - row.host[1] / row.host[0]
    _measure_fidelity(by_name, lm, rows, prompts, runs[ORIGINAL_MODEL], progress)
    probes = {ORIGINAL_MODEL: original_memory} | {row.name: row.memory for row in rows}
    probes = {name: probe for name, probe in probes.items() if probe is not None}
    report = progress or silent
    for i, (name, probe) in enumerate(probes.items()):
        report("peak memory per row", i, len(probes))
        by_name[name].memory = probe(prompts[0].tolist(), new_tokens)
    if probes:
        report("peak memory per row", len(probes), len(probes))
    return results


def run_onnx_bench(
    dyn: LoadedDynamic,
    runtime: OnnxDecoder,
    prompts: torch.Tensor,
    new_tokens: int = 64,
    *,
    memory: bool = True,
    extra_rows: list[Row] | None = None,
    progress: ProgressFn | None = None,
) -> BenchResult:
    """The exported package against what a user would ship instead, in one run: transformers on the original model
    (the reference for consistency and perplexity), optimum's ORTModelForCausalLM in fp32 and at the package's
    precision (its baseline/ exports), the package with exits on and disabled, and `extra_rows`. Speedups are against
    optimum at the package's precision; `ratios` holds each row against every optimum row. `memory`: each row's
    peak RSS, measured in a process of its own (`row_memory`)."""
    baselines = optimum_rows(runtime, new_tokens)
    rows = baselines + package_rows(runtime, new_tokens, with_exits=True) + list(extra_rows or [])
    if not memory:
        for row in rows:
            row.memory = None
    original = dyn.loaded.pretrained_path
    probe = (lambda prompt, new: row_peak_memory("transformers", original, prompt, new, runtime.device, "full")) if memory else None
    results = compare_rows(dyn.loaded.layered, rows, prompts, new_tokens, original_memory=probe, progress=progress)
    reference = next(m for m in results if m.mode == baselines[-1].name)
    optimum_speeds = {m.mode: m.tokens_per_s for m in results if m.mode in {row.name for row in baselines}}
    for m in results:
        m.speedup = m.tokens_per_s / reference.tokens_per_s
        m.ratios = {f"vs {name}": m.tokens_per_s / speed for name, speed in optimum_speeds.items()}
        m.perplexity_change = m.perplexity / results[0].perplexity - 1.0
    notes = list(runtime.notes) + [f"ONNX Runtime provider: {runtime.provider}"]
    if memory:
        notes.append("peak RSS: one process per row that imports only its runtime, loads the model and decodes one prompt")
    return BenchResult(
        prompts.shape[0],
        prompts.shape[1],
        new_tokens,
        results,
        predicted_speedup_of(dyn),
        kv_mode_of(dyn),
        None,
        notes,
        gated_mode=PACKAGE_EXITS,
        predicted_unit=predicted_unit_of(dyn),
        speedup_reference=reference.mode,
    )


def _package_runner(runtime: OnnxDecoder, mode: str, new_tokens: int, host: list) -> Callable:
    """The package in `mode`, adding to `host` [seconds decoding, of them inside ONNX Runtime]."""

    def run(prompt: torch.Tensor) -> GenerationResult:
        inside = runtime.ort_seconds
        result = generate(runtime, prompt.numpy(), new_tokens, mode=mode)
        host[0] += result.seconds
        host[1] += runtime.ort_seconds - inside
        result.tokens = torch.from_numpy(result.tokens)
        return result

    return run


def _package_memory(runtime: OnnxDecoder, mode: str) -> MemoryProbe:
    return lambda prompt, new: row_peak_memory("package", str(runtime.path), prompt, new, runtime.device, mode)


def _optimum_runner(optimum: OptimumBaseline, name: str, new_tokens: int, depth: int) -> Callable:
    def run(prompt: torch.Tensor) -> GenerationResult:
        timing: dict = {}
        return plain_result(optimum.greedy(prompt, new_tokens, timing=timing), name, depth, timing)

    return run


def _optimum_logits(optimum: OptimumBaseline) -> ForcedLogits:
    """optimum's model fed prompt and continuation in one forward (its logits at each continuation position)."""

    def run(prompts: np.ndarray, continuations: np.ndarray, threshold):
        ids = torch.from_numpy(np.concatenate([prompts, continuations], axis=1))
        with torch.no_grad():
            logits = optimum.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        return logits[:, prompts.shape[1] - 1 : -1].float().numpy(), np.full(continuations.shape, -1)

    return run


def _measure_fidelity(by_name: dict[str, ModeResult], lm, rows: list[Row], prompts, original: list, progress) -> None:
    """Each row fed the original model's continuations of the prompts (the transformers row's tokens), against the
    original model's distributions on the same prefixes."""
    prompt_set = (prompts.numpy(), np.concatenate([o.tokens.numpy() for o in original]))
    by_name[ORIGINAL_MODEL].fidelity = {"same_top1": 1.0, "mean_kl": 0.0, "kl_p99": 0.0, "perplexity_ratio": 1.0}
    with dense_inside(lm):
        for row in rows:
            if row.forced is None:
                continue
            run = measure_fidelity(row.forced, lm, prompt_set, row.threshold, progress=progress, what=f"fidelity: {row.name}")
            keep = ("same_top1", "mean_kl", "kl_p99", "perplexity_ratio")
            by_name[row.name].fidelity = {k: v for k, v in run.measures().items() if k in keep}

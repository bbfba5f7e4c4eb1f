"""The exported package side by side with what a user would ship instead, in one run.

Rows: transformers on the original model (the reference for consistency, perplexity and fidelity), optimum's
ORTModelForCausalLM in float and at the package's precision (its baseline/ exports), and the package with exits on
and disabled. Every row decodes the same prompts, interleaved, batch 1, greedy; each reports tokens/s, the
prefill's time and the decode's tokens/s apart, its free-running consistency with the original model, and its
fidelity fed the original model's continuations (same top-1, mean and 99th-percentile KL, perplexity ratio:
certification/fidelity.py's measures). Package rows also report the share of their decoding time spent outside
ONNX Runtime (Python, binding, stop checks). onnxruntime-genai's export is a row of
benchmarks/genai_baseline.py, which runs it in a virtualenv of its own (it installs the plain onnxruntime wheel).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from dyninfer.certification.fidelity import decoder_logits, measure_fidelity
from dyninfer.compressors.pruning import dense_inside
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


def run_onnx_bench(
    dyn: LoadedDynamic,
    runtime: OnnxDecoder,
    prompts: torch.Tensor,
    new_tokens: int = 64,
    *,
    memory: bool = True,
    progress: ProgressFn | None = None,
) -> BenchResult:
    """The exported package against what a user would ship instead, in one run: transformers on the original model
    (the reference for consistency and perplexity), optimum's ORTModelForCausalLM in fp32 and at the package's
    precision (its baseline/ exports), and the package with exits on and disabled. Speedups are against optimum
    at the package's precision; `ratios` holds each row against every optimum row. `memory`: each row's peak RSS,
    measured in a process of its own (`row_memory`)."""
    check_sizes(prompts, new_tokens)
    manifest, package = runtime.manifest, runtime.path
    precision = manifest.precision
    optimum_rows = {f"optimum {precision}": load_optimum_baseline(package, runtime.provider)}
    if manifest.baseline_full:  # a quantized package: the plain model's float export beside the quantized one
        optimum_rows = {f"optimum {manifest.dtype}": load_optimum_baseline(package, runtime.provider, full=True)} | optimum_rows
    warm = prompts[:1, : min(8, prompts.shape[1])]
    for optimum in optimum_rows.values():
        optimum.greedy(warm, 2)
    generate(runtime, warm.numpy(), 2, mode="full")
    lm = dyn.loaded.layered
    dense_greedy(lm, 2)(warm)  # the transformers row is warmed like the others
    depth = runtime.num_layers
    runners = {name: _optimum_runner(optimum, name, new_tokens, depth) for name, optimum in optimum_rows.items()}
    host = {PACKAGE_EXITS: [0.0, 0.0], PACKAGE_DISABLED: [0.0, 0.0]}  # row -> [seconds decoding, of them in ONNX Runtime]
    runners |= {
        PACKAGE_EXITS: _package_runner(runtime, "early-exit", new_tokens, host[PACKAGE_EXITS]),
        PACKAGE_DISABLED: _package_runner(runtime, "full", new_tokens, host[PACKAGE_DISABLED]),
    }
    runs: dict[str, list] = {}
    results = compare_side_by_side(lm, ORIGINAL_MODEL, dense_greedy(lm, new_tokens), runners, prompts, progress, keep=runs)
    for m in results:
        if m.mode in host:
            m.host_overhead = 1.0 - host[m.mode][1] / host[m.mode][0]
    _measure_fidelity(results, lm, runtime, optimum_rows, prompts, runs[ORIGINAL_MODEL], progress)
    reference = next(m for m in results if m.mode == f"optimum {precision}")
    optimum_speeds = {m.mode: m.tokens_per_s for m in results if m.mode in optimum_rows}
    for m in results:
        m.speedup = m.tokens_per_s / reference.tokens_per_s
        m.ratios = {f"vs {name}": m.tokens_per_s / speed for name, speed in optimum_speeds.items()}
        m.perplexity_change = m.perplexity / results[0].perplexity - 1.0
    notes = list(runtime.notes) + [f"ONNX Runtime provider: {runtime.provider}", GENAI_NOTE]
    if memory:
        _measure_memory(results, dyn, runtime, optimum_rows, prompts[0].tolist(), new_tokens, progress)
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


GENAI_NOTE = (
    "onnxruntime-genai's int4 export of this model (its builder's defaults) is measured beside these rows by "
    "`python benchmarks/genai_baseline.py ARTIFACT`, in a virtualenv of its own: it installs the plain onnxruntime "
    "wheel, which must not sit beside onnxruntime-gpu"
)


def _package_runner(runtime: OnnxDecoder, mode: str, new_tokens: int, host: list) -> Callable:
    """The package in `mode`, adding to `host` [seconds decoding, of them inside ONNX Runtime] (the prefill apart)."""

    def run(prompt: torch.Tensor) -> GenerationResult:
        inside = runtime.ort_seconds
        result = generate(runtime, prompt.numpy(), new_tokens, mode=mode)
        host[0] += result.seconds
        host[1] += runtime.ort_seconds - inside
        result.tokens = torch.from_numpy(result.tokens)
        return result

    return run


def _optimum_runner(optimum: OptimumBaseline, name: str, new_tokens: int, depth: int) -> Callable:
    def run(prompt: torch.Tensor) -> GenerationResult:
        timing: dict = {}
        return plain_result(optimum.greedy(prompt, new_tokens, timing=timing), name, depth, timing)

    return run


def _optimum_logits(optimum: OptimumBaseline):
    """optimum's model fed prompt and continuation in one forward (its logits at each continuation position)."""

    def run(prompts: np.ndarray, continuations: np.ndarray, threshold):
        ids = torch.from_numpy(np.concatenate([prompts, continuations], axis=1))
        with torch.no_grad():
            logits = optimum.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        return logits[:, prompts.shape[1] - 1 : -1].float().numpy(), np.full(continuations.shape, -1)

    return run


def _measure_fidelity(results: list[ModeResult], lm, runtime: OnnxDecoder, optimum_rows: dict, prompts, original: list, progress) -> None:
    """Each row fed the original model's continuations of the prompts (the transformers row's tokens), against the
    original model's distributions on the same prefixes."""
    prompt_set = (prompts.numpy(), np.concatenate([o.tokens.numpy() for o in original]))
    forced = {name: _optimum_logits(optimum) for name, optimum in optimum_rows.items()}
    forced |= {PACKAGE_EXITS: decoder_logits(runtime), PACKAGE_DISABLED: decoder_logits(runtime)}
    threshold = {PACKAGE_EXITS: runtime.exit_threshold("early-exit")}
    with dense_inside(lm):
        for m in results:
            if m.mode == ORIGINAL_MODEL:
                m.fidelity = {"same_top1": 1.0, "mean_kl": 0.0, "kl_p99": 0.0, "perplexity_ratio": 1.0}
            elif m.mode in forced:
                run = measure_fidelity(forced[m.mode], lm, prompt_set, threshold.get(m.mode), progress=progress, what=f"fidelity: {m.mode}")
                m.fidelity = {k: v for k, v in run.measures().items() if k in ("same_top1", "mean_kl", "kl_p99", "perplexity_ratio")}


def _measure_memory(
    results: list[ModeResult], dyn: LoadedDynamic, runtime, optimum_rows: dict, prompt: list[int], new_tokens: int, progress
) -> None:
    """Each row's peak RSS in a process of its own (see `row_memory`)."""
    report = progress or silent
    provider = runtime.device
    rows = {ORIGINAL_MODEL: ("transformers", dyn.loaded.pretrained_path, "full")}
    rows |= {name: ("optimum", str(optimum.folder), "full") for name, optimum in optimum_rows.items()}
    rows |= {PACKAGE_EXITS: ("package", str(runtime.path), "early-exit"), PACKAGE_DISABLED: ("package", str(runtime.path), "full")}
    by_name = {m.mode: m for m in results}
    for i, (name, (kind, path, mode)) in enumerate(rows.items()):
        report("peak memory per row", i, len(rows))
        by_name[name].memory = row_peak_memory(kind, path, prompt, new_tokens, provider, mode)
    report("peak memory per row", len(rows), len(rows))

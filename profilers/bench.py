"""Side-by-side benchmark: the dynamic model against the full model, same prompts, batch 1.

The baseline is what users otherwise run: transformers' own forward with its KV cache,
greedy. Each mode of the dynamic model (early exit, lossless speculation, and the same
code path with exits disabled, to show its overhead) decodes the same prompts. Speed is
tokens/s over all prompts; quality is the token consistency with the baseline
(position by position, and the shared prefix), and the perplexity of each output under
the full model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from dyninfer.compressors.pruning import dense_inside
from dyninfer.compressors.steering import steered
from dyninfer.core.consistency import rouge_l
from dyninfer.core.errors import DyninferError
from dyninfer.core.layered import LayeredModel
from dyninfer.core.progress import ProgressFn, silent
from dyninfer.exporters.baseline import load_optimum_baseline
from dyninfer.profilers.row_memory import row_peak_memory
from dyninfer.runtime.decoding import GenerationResult, generate
from dyninfer.runtime.loader import LoadedDynamic
from dyninfer.runtime.onnx_decoder import OnnxDecoder
from dyninfer.runtime.self_speculation import default_draft_layer


@dataclass
class ModeResult:
    mode: str
    tokens_per_s: float
    speedup: float  # vs the full-model baseline, measured in this run
    consistency: float  # generated tokens equal to the baseline's at the same position
    prefix_agreement: float  # mean fraction of the output before the first difference
    perplexity: float  # of the generated tokens under the full model
    mean_exit_layer: float
    acceptance: float | None = None  # speculative: accepted / drafted
    draft_fallbacks: float | None = None  # speculative with a draft vocabulary: share of drafts re-scored in full
    rouge_l: float = 1.0  # ROUGE-L F1 of the output against the baseline's (CALM's textual consistency)
    ratios: dict = field(default_factory=dict)  # ONNX bench: tokens/s against each optimum row ("vs optimum fp32": x)
    perplexity_change: float | None = None  # ONNX bench: perplexity over the original model's, minus 1
    memory: dict | None = None  # ONNX bench: {peak_rss_mib, imports_rss_mib, model_rss_mib} of this row alone

    def consistency_by(self, measure: str) -> float:
        """This mode's consistency under a calibration measure (tokens, prefix or rougeL)."""
        return {"tokens": self.consistency, "prefix": self.prefix_agreement, "rougeL": self.rouge_l}[measure]


@dataclass
class BenchResult:
    prompts: int
    prompt_tokens: int
    new_tokens: int
    modes: list[ModeResult]
    predicted_speedup: float | None  # from calibration's cost model
    kv_mode: str | None = None
    draft_layer: int | None = None
    notes: list[str] = field(default_factory=list)
    gated_mode: str = "early-exit"  # the mode the CI gates and realized/predicted speak about
    predicted_unit: str = "FLOPs"  # or "latency" when calibration used a measured profile (cost.speedup_basis)
    # What calibration certified ({risk, measure, bound, epsilon}) and the gated mode's value under that measure here.
    certified: dict | None = None
    speculation_plan: dict | None = None  # the planned draft layer and length (runtime.speculation), when planned
    speedup_reference: str | None = None  # the row speedups are against (None: the first, the baseline)

    def mode(self, name: str) -> ModeResult:
        return next(m for m in self.modes if m.mode == name)

    @property
    def gated(self) -> ModeResult:
        return self.mode(self.gated_mode)

    def to_dict(self) -> dict:
        out = asdict(self)
        dyn = next((m for m in self.modes if m.mode == self.gated_mode), None)
        if dyn is not None and self.predicted_speedup:
            out["realized_over_predicted"] = dyn.speedup / self.predicted_speedup
        return out


@torch.no_grad()
def greedy_generate(model, prompt: torch.Tensor, new_tokens: int, eos_token_id: int | None = None) -> torch.Tensor:
    """transformers' forward with its KV cache in a plain greedy loop (batch 1 when it stops at `eos_token_id`)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    logits = model(prompt, past_key_values=cache, use_cache=True).logits[:, -1]
    out = [logits.argmax(-1, keepdim=True)]
    while len(out) < new_tokens and not (eos_token_id is not None and int(out[-1][0, 0]) == eos_token_id):
        logits = model(out[-1], past_key_values=cache, use_cache=True).logits[:, -1]
        out.append(logits.argmax(-1, keepdim=True))
    return torch.cat(out, dim=1)


def dense_greedy(lm: LayeredModel, new_tokens: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The full model's greedy decoding of a prompt, as bench's baseline: dense even when pruning masks are installed."""

    def run(prompt: torch.Tensor) -> torch.Tensor:
        with dense_inside(lm):
            return greedy_generate(lm.model, prompt, new_tokens)

    return run


@torch.no_grad()
def _perplexity(model, prompt: torch.Tensor, generated: torch.Tensor) -> float:
    sequence = torch.cat([prompt, generated], dim=1)
    logits = model(sequence, use_cache=False).logits[:, prompt.shape[1] - 1 : -1].float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), generated.reshape(-1))
    return float(math.exp(nll))


def _prefix_fraction(a: torch.Tensor, b: torch.Tensor) -> float:
    differ = (a != b).flatten().tolist()
    return (differ.index(True) if True in differ else len(differ)) / len(differ)


def run_bench(
    dyn: LoadedDynamic,
    prompts: torch.Tensor,
    new_tokens: int = 64,
    *,
    modes: tuple[str, ...] = ("early-exit", "speculative", "full"),
    draft_layer: int | None = None,
    max_draft: int = 8,
    draft_threshold: float = 0.5,
    progress: ProgressFn | None = None,
) -> BenchResult:
    """`prompts`: [n, prompt_tokens] token ids, decoded one at a time (batch 1)."""
    _check_sizes(prompts, new_tokens)
    dynamic = dyn.dynamic
    notes = []
    if dyn.loaded.layered.adapter.recurrent and "speculative" in modes:
        modes = tuple(m for m in modes if m != "speculative")
        notes.append("speculative mode skipped: Mamba's recurrent state cannot be rolled back")
    gated_mode = "early-exit"
    if dyn.policy is None:  # a pruned or steered artifact without exits: that model at full depth
        modes, gated_mode = ("full",), "full"
        notes.append("no early-exit policy: benchmarking the model at full depth against the baseline")
    if dyn.steering:
        notes.append(
            f"steered ({dyn.steering['method']}, α = {dyn.steering['alpha']:g}): the steering is baked "
            "into the weights, so the baseline is the steered model too"
        )
    lm = dyn.loaded.layered
    baseline = dense_greedy(lm, new_tokens)
    # Warm-up (allocator, kernels) so the first timed prompt is not penalised.
    warm = prompts[:1, : min(8, prompts.shape[1])]
    dense_greedy(lm, 2)(warm)
    dynamic.generate(warm, 2, mode="full")
    runners = {
        mode: (
            lambda prompt, mode=mode: dynamic.generate(
                prompt, new_tokens, mode=mode, draft_layer=draft_layer, max_draft=max_draft, draft_threshold=draft_threshold
            )
        )
        for mode in modes
    }
    baseline_name = "baseline (transformers)"
    if dyn.tuning is not None:  # tune-exits: the baseline is the tuned model; the original decodes beside it
        baseline_name = "baseline (transformers, tuned model)"
        runners = {ORIGINAL_MODEL: _untuned_runner(lm, dyn.tuning, new_tokens), **runners}
        notes.append(
            "tuned with tune-exits: the baseline is the tuned model, which the speculative mode must equal; "
            f"'{ORIGINAL_MODEL}' is transformers on the original weights, the speed to beat"
        )
    results = compare_side_by_side(lm, baseline_name, baseline, runners, prompts, progress)
    layer = draft_layer or default_draft_layer(lm.num_layers)
    return BenchResult(
        prompts.shape[0],
        prompts.shape[1],
        new_tokens,
        results,
        _predicted(dyn),
        _kv_mode(dyn),
        layer,
        notes,
        gated_mode,
        _predicted_unit(dyn),
    )


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
    _check_sizes(prompts, new_tokens)
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
    runners = {name: (lambda p, o=optimum, n=name: _as_result(o.greedy(p, new_tokens), n, depth)) for name, optimum in optimum_rows.items()}
    runners |= {
        PACKAGE_EXITS: lambda p: _as_torch(generate(runtime, p.numpy(), new_tokens, mode="early-exit")),
        PACKAGE_DISABLED: lambda p: _as_torch(generate(runtime, p.numpy(), new_tokens, mode="full")),
    }
    results = compare_side_by_side(lm, ORIGINAL_MODEL, dense_greedy(lm, new_tokens), runners, prompts, progress)
    reference = next(m for m in results if m.mode == f"optimum {precision}")
    optimum_speeds = {m.mode: m.tokens_per_s for m in results if m.mode in optimum_rows}
    for m in results:
        m.speedup = m.tokens_per_s / reference.tokens_per_s
        m.ratios = {f"vs {name}": m.tokens_per_s / speed for name, speed in optimum_speeds.items()}
        m.perplexity_change = m.perplexity / results[0].perplexity - 1.0
    notes = list(runtime.notes) + [f"ONNX Runtime provider: {runtime.provider}"]
    if memory:
        _measure_memory(results, dyn, runtime, optimum_rows, prompts[0].tolist(), new_tokens, progress)
        notes.append("peak RSS: one process per row that imports only its runtime, loads the model and decodes one prompt")
    return BenchResult(
        prompts.shape[0],
        prompts.shape[1],
        new_tokens,
        results,
        _predicted(dyn),
        _kv_mode(dyn),
        None,
        notes,
        gated_mode=PACKAGE_EXITS,
        predicted_unit=_predicted_unit(dyn),
        speedup_reference=reference.mode,
    )


PACKAGE_EXITS, PACKAGE_DISABLED = "package early-exit", "package exits disabled"


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


def _as_result(tokens: torch.Tensor, name: str, num_layers: int) -> GenerationResult:
    """A plain runner's tokens as a generation result (every token at full depth)."""
    steps = tokens.shape[1]
    return GenerationResult(tokens, [num_layers] * steps, [None] * steps, 0.0, name, num_layers)


ORIGINAL_MODEL = "transformers (original model)"


def _untuned_runner(lm: LayeredModel, tuning, new_tokens: int) -> Callable:
    """transformers' greedy decoding on the weights before tune-exits (its LoRA taken out for the call; the
    swap is not timed)."""

    def run(prompt: torch.Tensor) -> GenerationResult:
        swapping = time.perf_counter()
        with dense_inside(lm), steered(lm, tuning, -1.0):
            swapped = time.perf_counter()
            tokens = greedy_generate(lm.model, prompt, new_tokens)
            seconds = time.perf_counter() - swapped
        result = GenerationResult(tokens, [lm.num_layers] * new_tokens, [None] * new_tokens, seconds, ORIGINAL_MODEL, lm.num_layers)
        result.untimed_seconds = time.perf_counter() - swapping - seconds
        return result

    return run


def _as_torch(result):
    result.tokens = torch.from_numpy(result.tokens)
    return result


def _check_sizes(prompts: torch.Tensor, new_tokens: int) -> None:
    if prompts.shape[0] < 1 or prompts.shape[1] < 1:
        raise DyninferError("no prompts to benchmark; use more data or a shorter `prompt_tokens`")
    if new_tokens < 1:
        raise DyninferError(f"`new_tokens` must be at least 1, got {new_tokens}")


def _predicted(dyn: LoadedDynamic) -> float | None:
    record = dyn.calibration
    return None if record is None else record.predicted_speedup


def _predicted_unit(dyn: LoadedDynamic) -> str:
    record = dyn.calibration
    return (record.cost_unit if record is not None else None) or "FLOPs"


def _kv_mode(dyn: LoadedDynamic) -> str | None:
    return dyn.policy.kv_mode if dyn.policy is not None else None


def compare_side_by_side(
    lm: LayeredModel,
    baseline_name: str,
    baseline: Callable,
    runners: dict[str, Callable],
    prompts: torch.Tensor,
    progress: ProgressFn | None = None,
) -> list[ModeResult]:
    """Run the baseline and every runner on each prompt in turn (so load changes hit all alike).

    `baseline(prompt) -> tokens [1, n]`; `runner(prompt) -> GenerationResult`. Speed is
    tokens/s over all prompts; quality is measured against the baseline's tokens and, for
    perplexity, under the full dense torch model (pruning masks taken out).
    """
    report = progress or silent
    baseline_outputs, baseline_seconds = [], 0.0
    runs: dict[str, list] = {name: [] for name in runners}
    seconds = {name: 0.0 for name in runners}
    total = prompts.shape[0]
    for i in range(total):
        prompt = prompts[i : i + 1]
        started = time.perf_counter()
        baseline_outputs.append(baseline(prompt))
        baseline_seconds += time.perf_counter() - started
        for name, runner in runners.items():
            started = time.perf_counter()
            runs[name].append(runner(prompt))
            # minus what a runner did outside its decoding (swapping weights in and out)
            seconds[name] += time.perf_counter() - started - getattr(runs[name][-1], "untimed_seconds", 0.0)
        report("benchmarking prompts", i + 1, total)
    with dense_inside(lm):
        return _score(lm.model, baseline_name, baseline_outputs, baseline_seconds, runs, seconds, prompts, lm.num_layers)


def _score(model, baseline_name, baseline_outputs, baseline_seconds, runs, seconds, prompts, num_layers):
    n_tokens = sum(o.numel() for o in baseline_outputs)
    baseline_tps = n_tokens / baseline_seconds
    results = [
        ModeResult(
            baseline_name,
            baseline_tps,
            1.0,
            1.0,
            1.0,
            _mean([_perplexity(model, prompts[i : i + 1], o) for i, o in enumerate(baseline_outputs)]),
            float(num_layers),
        )
    ]
    for name, outs in runs.items():
        drafted = sum(o.drafted for o in outs)
        tokens_per_s = sum(o.tokens.numel() for o in outs) / seconds[name]
        results.append(
            ModeResult(
                mode=name,
                tokens_per_s=tokens_per_s,
                speedup=tokens_per_s / baseline_tps,
                consistency=_mean([float((o.tokens == b).double().mean()) for o, b in zip(outs, baseline_outputs)]),
                prefix_agreement=_mean([_prefix_fraction(o.tokens, b) for o, b in zip(outs, baseline_outputs)]),
                rouge_l=_mean([float(rouge_l(o.tokens, b)[0]) for o, b in zip(outs, baseline_outputs)]),
                perplexity=_mean([_perplexity(model, prompts[i : i + 1], o.tokens) for i, o in enumerate(outs)]),
                mean_exit_layer=_mean([o.mean_exit_layer for o in outs]),
                acceptance=(sum(o.accepted for o in outs) / drafted) if drafted else None,
                draft_fallbacks=(sum(o.draft_fallbacks for o in outs) / drafted) if drafted else None,
            )
        )
    return results


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)

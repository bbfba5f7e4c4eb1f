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
from dyninfer.core.choices import TOP1
from dyninfer.core.consistency import rouge_l
from dyninfer.core.errors import DyninferError
from dyninfer.core.layered import LayeredModel
from dyninfer.core.progress import ProgressFn, silent
from dyninfer.runtime.decoding import GenerationResult
from dyninfer.runtime.loader import LoadedDynamic
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
    fidelity: dict | None = None  # ONNX bench: fed the original model's continuations, same top-1, mean and 99% KL, perplexity ratio
    host_overhead: float | None = None  # ONNX bench, package rows: the share of decoding time spent outside ONNX Runtime
    perplexity_change: float | None = None  # ONNX bench: perplexity over the original model's, minus 1
    memory: dict | None = None  # ONNX bench: {peak_rss_mib, imports_rss_mib, model_rss_mib} of this row alone
    prefill_ms: float | None = None  # the mean prompt's prefill (and first token), milliseconds
    decode_tokens_per_s: float | None = None  # the tokens after the first, over the time after the prefill

    def consistency_by(self, measure: str) -> float:
        """This mode's consistency under a certificate's measure (tokens, prefix, rougeL; top1: its fidelity's same
        top-1, NaN where it was not measured)."""
        if measure == TOP1:
            return (self.fidelity or {}).get("same_top1", float("nan"))
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
def greedy_generate(
    model, prompt: torch.Tensor, new_tokens: int, eos_token_id: int | None = None, timing: dict | None = None
) -> torch.Tensor:
    """transformers' forward with its KV cache in a plain greedy loop (batch 1 when it stops at `eos_token_id`);
    `timing` receives the prefill's seconds."""
    from transformers import DynamicCache

    started = time.perf_counter()
    cache = DynamicCache(config=model.config)
    logits = model(prompt, past_key_values=cache, use_cache=True).logits[:, -1]
    out = [logits.argmax(-1, keepdim=True)]
    if timing is not None:
        timing["prefill_seconds"] = time.perf_counter() - started
    while len(out) < new_tokens and not (eos_token_id is not None and int(out[-1][0, 0]) == eos_token_id):
        logits = model(out[-1], past_key_values=cache, use_cache=True).logits[:, -1]
        out.append(logits.argmax(-1, keepdim=True))
    return torch.cat(out, dim=1)


def dense_greedy(lm: LayeredModel, new_tokens: int) -> Callable[[torch.Tensor], GenerationResult]:
    """The full model's greedy decoding of a prompt, as bench's baseline: dense even when pruning masks are installed."""

    def run(prompt: torch.Tensor) -> GenerationResult:
        timing: dict = {}
        with dense_inside(lm):
            return plain_result(greedy_generate(lm.model, prompt, new_tokens, timing=timing), "transformers", lm.num_layers, timing)

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
    check_sizes(prompts, new_tokens)
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
        predicted_speedup_of(dyn),
        kv_mode_of(dyn),
        layer,
        notes,
        gated_mode,
        predicted_unit_of(dyn),
    )


def plain_result(tokens: torch.Tensor, name: str, num_layers: int, timing: dict | None = None) -> GenerationResult:
    """A plain runner's tokens as a generation result (every token at full depth), with its prefill's time."""
    steps = tokens.shape[1]
    result = GenerationResult(tokens, [num_layers] * steps, [None] * steps, 0.0, name, num_layers)
    result.prefill_seconds = (timing or {}).get("prefill_seconds", 0.0)
    return result


ORIGINAL_MODEL = "transformers (original model)"


def _untuned_runner(lm: LayeredModel, tuning, new_tokens: int) -> Callable:
    """transformers' greedy decoding on the weights before tune-exits (its LoRA taken out for the call; the
    swap is not timed)."""

    def run(prompt: torch.Tensor) -> GenerationResult:
        swapping = time.perf_counter()
        with dense_inside(lm), steered(lm, tuning, -1.0):
            swapped = time.perf_counter()
            timing: dict = {}
            tokens = greedy_generate(lm.model, prompt, new_tokens, timing=timing)
            seconds = time.perf_counter() - swapped
        result = plain_result(tokens, ORIGINAL_MODEL, lm.num_layers, timing)
        result.seconds = seconds
        result.untimed_seconds = time.perf_counter() - swapping - seconds
        return result

    return run


def check_sizes(prompts: torch.Tensor, new_tokens: int) -> None:
    if prompts.shape[0] < 1 or prompts.shape[1] < 1:
        raise DyninferError("no prompts to benchmark; use more data or a shorter `prompt_tokens`")
    if new_tokens < 1:
        raise DyninferError(f"`new_tokens` must be at least 1, got {new_tokens}")


def predicted_speedup_of(dyn: LoadedDynamic) -> float | None:
    record = dyn.calibration
    return None if record is None else record.predicted_speedup


def predicted_unit_of(dyn: LoadedDynamic) -> str:
    record = dyn.calibration
    return (record.cost_unit if record is not None else None) or "FLOPs"


def kv_mode_of(dyn: LoadedDynamic) -> str | None:
    return dyn.policy.kv_mode if dyn.policy is not None else None


def compare_side_by_side(
    lm: LayeredModel,
    baseline_name: str,
    baseline: Callable,
    runners: dict[str, Callable],
    prompts: torch.Tensor,
    progress: ProgressFn | None = None,
    keep: dict | None = None,
) -> list[ModeResult]:
    """Run the baseline and every runner on each prompt in turn (so load changes hit all alike).

    `baseline(prompt)` and `runner(prompt)` return GenerationResults (with their prefill's time). Speed is
    tokens/s over all prompts, and apart the prefill's time and the decode's tokens/s after it; quality is
    measured against the baseline's tokens and, for perplexity, under the full dense torch model (pruning masks
    taken out). `keep` receives every row's results (name -> one per prompt).
    """
    report = progress or silent
    runners = {baseline_name: baseline, **runners}
    runs: dict[str, list] = {name: [] for name in runners}
    seconds = {name: 0.0 for name in runners}
    total = prompts.shape[0]
    for i in range(total):
        prompt = prompts[i : i + 1]
        for name, runner in runners.items():
            started = time.perf_counter()
            runs[name].append(runner(prompt))
            # minus what a runner did outside its decoding (swapping weights in and out)
            seconds[name] += time.perf_counter() - started - getattr(runs[name][-1], "untimed_seconds", 0.0)
        report("benchmarking prompts", i + 1, total)
    if keep is not None:
        keep.update(runs)
    with dense_inside(lm):
        return _score(lm.model, runs, seconds, prompts)


def _score(model, runs: dict[str, list], seconds: dict[str, float], prompts) -> list[ModeResult]:
    """Each runner's row, the first (the baseline) the reference for consistency and speedup."""
    baseline_outputs = [o.tokens for o in next(iter(runs.values()))]
    results = []
    for name, outs in runs.items():
        drafted = sum(o.drafted for o in outs)
        tokens = sum(o.tokens.numel() for o in outs)
        tokens_per_s = tokens / seconds[name]
        prefill = sum(o.prefill_seconds for o in outs)
        baseline_tps = tokens_per_s if not results else results[0].tokens_per_s
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
                prefill_ms=1000 * prefill / len(outs) if prefill > 0 else None,
                decode_tokens_per_s=(tokens - len(outs)) / (seconds[name] - prefill) if prefill > 0 else None,
            )
        )
    return results


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)

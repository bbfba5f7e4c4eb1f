"""A stop rule side by side with plain generation: wall-clock time per request, tokens, and what is kept.

Every request runs, in turn, through the baseline (transformers' greedy decoding with its KV cache, the
whole budget, or until the end-of-sequence token for chains of thought) and through each runner (the
dynamic model with and without the stop rule), so a change in the machine's load hits all alike. A
stop rule saves whole decode steps, so the speed that matters is seconds per request, not tokens/s.

What is kept is measured against the truth, not against the baseline: for completions the value of the
shown text (its prefix matching the document's real continuation), for reasoning the right answers.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from dyninfer.compressors.cot_data import extract_answer
from dyninfer.compressors.pruning import dense_inside
from dyninfer.compressors.stop_simulate import token_values
from dyninfer.core.choices import COMPLETION
from dyninfer.core.policies import StopPolicy
from dyninfer.core.progress import ProgressFn, silent
from dyninfer.profilers.bench import greedy_generate
from dyninfer.runtime.loader import LoadedDynamic, stored_stopper


@dataclass
class StopRunResult:
    name: str
    seconds_per_request: float
    request_speedup: float  # the baseline's seconds per request over this runner's, measured in this run
    tokens_per_request: float  # tokens generated (probes' tokens included)
    tokens_saved: float  # 1 - tokens per request / the baseline's
    quality: dict  # completion: value_kept, mean_share_kept, precision_shown; reasoning: accuracy, right_kept
    ended: dict = field(default_factory=dict)  # why generations ended: rule, answered, budget, end of sequence


@dataclass
class StopBenchResult:
    workload: str
    prompts: int
    new_tokens: int
    policy: dict
    baseline: StopRunResult
    runners: list[StopRunResult]
    notes: list[str] = field(default_factory=list)
    gated: str = ""  # the runner the CI gate speaks about

    def runner(self, name: str) -> StopRunResult:
        return next(r for r in self.runners if r.name == name)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class StopRequests:
    """What to send: prompts (each [1, n]) and what counts as right (real continuations, or answers)."""

    prompts: list[torch.Tensor]
    references: torch.Tensor | None = None  # completion: [n, new tokens]
    answers: list[float] | None = None  # reasoning
    decode: Callable | None = None  # reasoning: ids -> text


def _completion_quality(outputs: list[torch.Tensor], baseline: list[torch.Tensor], references: torch.Tensor) -> dict:
    reference = references.numpy()
    length = reference.shape[1]
    full = np.array([token_values(b[:, :length].numpy(), reference[i : i + 1])[0, -1] for i, b in enumerate(baseline)])
    kept, right, shown = [], 0, 0
    for i, out in enumerate(outputs):
        ids = out[0, :length].numpy()
        padded = np.full(length, -1)
        padded[: ids.size] = ids
        kept.append(token_values(padded[None], reference[i : i + 1])[0, ids.size])
        right += int((ids == reference[i, : ids.size]).sum())
        shown += ids.size
    kept = np.array(kept)
    valued = full > 0
    return {
        "value_kept": float(kept.sum() / full.sum()) if full.sum() > 0 else 1.0,
        "mean_share_kept": float(np.minimum(kept[valued] / full[valued], 1.0).mean()) if valued.any() else 1.0,
        "precision_shown": right / shown if shown else 1.0,
        "mean_value": float(kept.mean()),
    }


def _reasoning_quality(outputs: list[torch.Tensor], baseline: list[torch.Tensor], answers: list[float], decode: Callable) -> dict:
    def right(out: torch.Tensor, answer: float) -> bool:
        value = extract_answer(decode(out[0].tolist()))
        return value is not None and abs(value - answer) < 1e-6

    before = [right(b, a) for b, a in zip(baseline, answers)]
    now = [right(o, a) for o, a in zip(outputs, answers)]
    return {
        "accuracy": sum(now) / len(now),
        "accuracy_without": sum(before) / len(before),
        "right_kept": sum(b and n for b, n in zip(before, now)) / sum(before) if any(before) else 1.0,
    }


def run_stop_bench(
    dyn: LoadedDynamic, policy: StopPolicy, requests: StopRequests, new_tokens: int, progress: ProgressFn | None = None
) -> StopBenchResult:
    report = progress or silent
    lm, dynamic = dyn.loaded.layered, dyn.dynamic
    eos = dyn.loaded.tokenizer.eos_token_id if policy.workload != COMPLETION else None
    modes = ["full"] + (["early-exit"] if dyn.policy is not None else [])

    def baseline(prompt: torch.Tensor) -> torch.Tensor:
        with dense_inside(lm):
            return greedy_generate(lm.model, prompt, new_tokens, eos_token_id=eos)

    runners: dict[str, Callable] = {}
    for mode in modes:
        runners[f"{mode} (no stop)"] = lambda p, mode=mode: dynamic.generate(p, new_tokens, mode=mode, eos_token_id=eos)
        runners[f"{mode} + stop"] = lambda p, mode=mode: dynamic.generate(
            p, new_tokens, mode=mode, eos_token_id=eos, stop=stored_stopper(dyn, policy)
        )
    warm = requests.prompts[0][:, :8]
    baseline(warm)
    dynamic.generate(warm, 2, mode="full")
    outputs: dict[str, list] = {name: [] for name in ["baseline", *runners]}
    seconds = Counter()
    for i, prompt in enumerate(requests.prompts):
        started = time.perf_counter()
        outputs["baseline"].append(baseline(prompt))
        seconds["baseline"] += time.perf_counter() - started
        for name, runner in runners.items():
            started = time.perf_counter()
            outputs[name].append(runner(prompt))
            seconds[name] += time.perf_counter() - started
        report("benchmarking requests", i + 1, len(requests.prompts))
    n = len(requests.prompts)
    base_tokens = sum(o.shape[1] for o in outputs["baseline"]) / n

    def quality(tokens: list[torch.Tensor]) -> dict:
        if policy.workload == COMPLETION:
            return _completion_quality(tokens, outputs["baseline"], requests.references)
        return _reasoning_quality(tokens, outputs["baseline"], requests.answers, requests.decode)

    def result(name: str, tokens: list[torch.Tensor], spent: float, ended: dict) -> StopRunResult:
        per_request = seconds[name] / n
        return StopRunResult(
            name, per_request, (seconds["baseline"] / n) / per_request, spent, 1.0 - spent / base_tokens, quality(tokens), ended
        )

    base = result("baseline", outputs["baseline"], base_tokens, {})
    runs = []
    for name in runners:
        outs = outputs[name]
        spent = sum(o.stop["spent"] if o.stop else o.tokens.shape[1] for o in outs) / n
        ended = dict(Counter((o.stop or {}).get("reason", "budget") for o in outs))
        runs.append(result(name, [o.tokens for o in outs], spent, ended))
    base.name = "baseline (transformers)"
    return StopBenchResult(policy.workload, n, new_tokens, policy.to_dict(), base, runs, gated="full + stop")

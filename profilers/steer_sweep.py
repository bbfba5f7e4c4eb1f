"""What a steering direction does at each α: reasoning length, answers and fluency on held-out questions.

For each α the model is baked with α·direction (restored exactly afterwards) and answers
every held-out question greedily, batched with left padding (one at a time for recurrent
models, which cannot pad). Per α: mean generated length in tokens (up to the end-of-sequence
token), how many hit the token limit, answer accuracy (the final number), agreement with
the unsteered (α = 0) answer, and the perplexity of the generated chains under the base
model. Across α: Spearman ρ between α and mean length, and the strongest cut in length
that keeps at least `keep` of the unsteered answers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from dyninfer.compressors.cot_data import CotExample, extract_answer
from dyninfer.compressors.steer_extract import CotPrompter, batches, pad_id, right_padded
from dyninfer.compressors.steering import ActivationSteering, ValveDelta, steered
from dyninfer.core.errors import DyninferError
from dyninfer.core.models import LoadedModel
from dyninfer.core.progress import ProgressFn, silent


@dataclass
class Generation:
    tokens: list[int]  # generated ids, without the end-of-sequence token
    text: str
    finished: bool  # ended with end-of-sequence (not cut by the token limit)


@torch.no_grad()
def generate_greedy(
    loaded: LoadedModel,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 16,
    chat: bool = False,
    progress: ProgressFn | None = None,
) -> list[Generation]:
    tokenizer, model = loaded.tokenizer, loaded.model
    eos = tokenizer.eos_token_id
    pad = pad_id(tokenizer)
    size = 1 if loaded.layered.adapter.recurrent else batch_size
    results = []
    report = progress or silent
    for batch in batches(prompts, size):
        report("generating", len(results), len(prompts))
        encoded = [tokenizer(p, add_special_tokens=not chat)["input_ids"] for p in batch]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(encoded):  # left padding: every prompt ends where generation starts
            ids[row, width - len(seq) :] = torch.tensor(seq)
            mask[row, width - len(seq) :] = 1
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=eos
        )
        for row in out[:, width:].tolist():
            finished = eos is not None and eos in row
            tokens = row[: row.index(eos)] if finished else row
            results.append(Generation(tokens, tokenizer.decode(tokens, skip_special_tokens=True), finished))
    report("generating", len(prompts), len(prompts))
    return results


@torch.no_grad()
def chain_perplexity(loaded: LoadedModel, prompts: list[str], generations: list[Generation], chat: bool, batch_size: int = 8) -> float:
    """Perplexity of the generated tokens (with the end-of-sequence token where generated) given their prompts."""
    tokenizer = loaded.tokenizer
    items = []
    for prompt, gen in zip(prompts, generations):
        prefix = tokenizer(prompt, add_special_tokens=not chat)["input_ids"]
        chain = gen.tokens + ([tokenizer.eos_token_id] if gen.finished else [])
        if chain:
            items.append((list(prefix) + chain, len(prefix)))
    if not items:
        return float("nan")
    total, count = 0.0, 0
    for batch in batches(items, batch_size):
        ids, mask = right_padded([seq for seq, _ in batch], pad_id(tokenizer))
        logits = loaded.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        for row, (seq, start) in enumerate(batch):
            total += float(nll[row, start - 1 : len(seq) - 1].sum())
            count += len(seq) - start
    return math.exp(total / count)


@dataclass
class SweepPoint:
    alpha: float
    mean_length: float
    length_change: float  # relative to α = 0
    truncated: float  # fraction that hit the token limit
    accuracy: float
    agreement: float  # same final answer as at α = 0
    retained: float | None  # of the questions right at α = 0, the share still right (None: none was right)
    perplexity: float  # of the generated chains under the base model
    samples: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SweepResult:
    method: str
    questions: int
    max_new_tokens: int
    points: list[SweepPoint]
    spearman: float  # between α and mean length (negative: +α shortens)
    keep: float
    best: SweepPoint | None  # shortest setting that keeps `keep` of the unsteered answers
    goal_met: bool  # |ρ| >= 0.9 and best cuts length by >= 30%

    def to_dict(self) -> dict:
        d = asdict(self)
        d["best"] = self.best.alpha if self.best else None
        return d

    def summary(self) -> dict:
        """`to_dict` without the sample generations (for manifests and reports)."""
        d = self.to_dict()
        for point in d["points"]:
            point.pop("samples", None)
        return d


def answer_scores(questions: list[CotExample], answers: list, base_answers: list) -> dict:
    """accuracy, agreement with the α = 0 answers, and the share of α = 0's right answers kept right."""

    def right(values: list) -> list[bool]:
        return [a is not None and abs(a - q.answer) < 1e-6 for a, q in zip(values, questions)]

    now, before = right(answers), right(base_answers)
    return {
        "accuracy": sum(now) / len(questions),
        "agreement": sum(a == b for a, b in zip(answers, base_answers)) / len(questions),
        "retained": sum(n and b for n, b in zip(now, before)) / sum(before) if any(before) else None,
    }


def run_sweep(
    loaded: LoadedModel,
    direction: ActivationSteering | ValveDelta,
    method: str,
    prompter: CotPrompter,
    questions: list[CotExample],
    alphas: list[float],
    max_new_tokens: int = 128,
    batch_size: int = 16,
    keep: float = 0.9,
    samples: int = 2,
    progress: ProgressFn | None = None,
) -> SweepResult:
    if len(set(alphas)) < 2:
        raise DyninferError("`alphas` needs at least two different values, e.g. -1,-0.5,0,0.5,1")
    if not questions:
        raise DyninferError("no held-out questions to sweep on; use more data")
    lm = loaded.layered
    prompts = [prompter.prompt(q.question) for q in questions]
    ordered = sorted(set(alphas) | {0.0})
    report = progress or silent
    generated: dict[float, list[Generation]] = {}
    for k, alpha in enumerate(ordered):
        report(f"α = {alpha:g} ({k + 1}/{len(ordered)})", k, len(ordered))
        with steered(lm, direction, alpha):
            generated[alpha] = generate_greedy(loaded, prompts, max_new_tokens, batch_size, prompter.chat)
    report("scoring under the base model", len(ordered), len(ordered))
    base_answers = [extract_answer(g.text) for g in generated[0.0]]
    base_length = sum(len(g.tokens) for g in generated[0.0]) / len(prompts)
    points = []
    for alpha in ordered:
        gens = generated[alpha]
        answers = [extract_answer(g.text) for g in gens]
        length = sum(len(g.tokens) for g in gens) / len(gens)
        points.append(
            SweepPoint(
                alpha=alpha,
                mean_length=length,
                length_change=(length - base_length) / base_length if base_length else 0.0,
                truncated=sum(not g.finished for g in gens) / len(gens),
                **answer_scores(questions, answers, base_answers),
                perplexity=chain_perplexity(loaded, prompts, gens, prompter.chat),
                samples=[g.text for g in gens[:samples]],
            )
        )
    lengths = [p.mean_length for p in points]
    rho = float(spearmanr(ordered, lengths).statistic) if len(set(lengths)) > 1 else 0.0
    keeping = [p for p in points if p.agreement >= keep and p.alpha != 0.0]
    best = min(keeping, key=lambda p: p.mean_length, default=None)
    goal = abs(rho) >= 0.9 and best is not None and best.length_change <= -0.30
    return SweepResult(method, len(questions), max_new_tokens, points, rho, keep, best, goal)

"""The audit's expected duration, said before it starts: each stage's planned work in FLOPs over rates timed here.

Two rates are timed on the loaded model, in a second or two: a batched forward (many tokens per weight read,
as in the probe, the traces and the prefills) and a decode step at the calibration's batch (one token per row,
as in generation). The work is counted from the configuration and the model's per-token costs
(`core.cost.count_costs`): forwards, the exit heads the probe and the traces score at every layer, the
full model's continuations and the candidates' runs. What cannot be known ahead is assumed:
- the candidates' runs beyond the first, never-exit, one cost about a quarter of a generation of the
  calibration prompts (on the bundled model they decoded 62 positions again where generating each anew
  would have decoded 12,288, and took 22 s beside the 46 s of the first run: checking and scoring cost
  too; a model whose tokens exit more often decodes more again);
- every target chooses the same exit points (one set of runs);
- a stage already in the artifact (a tuned lens) is still counted unless the audit knows it is there.
So the estimate is a planning number, reported beside the measured times (docs/audit.md compares them).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from dyninfer.core.choices import COMPLETION, GENERATION_RISK, TUNED
from dyninfer.core.cost import CostModel
from dyninfer.core.layered import LayeredModel
from dyninfer.jobs.configs import AuditConfig

SOFTMAX_OVERHEAD = 1.5  # a scored exit head: the head's FLOPs plus log-softmax, KL and top-1 over the vocabulary
LENS_STEP_TOKENS, LENS_TOP_K, LENS_VALIDATION = 128, 64, 512  # core.lenses.train_tuned_lens's defaults


@dataclass
class Rates:
    """FLOP/s this model reaches here: batched forwards, and decode steps at the calibration's batch."""

    batched: float
    decode: float


@torch.no_grad()
def time_rates(lm: LayeredModel, costs: CostModel, batch: int, tokens: int = 128) -> Rates:
    """Time one batched forward of `tokens` tokens and two decode steps of `batch` rows (after a warm-up)."""
    device = lm.device
    ids = torch.zeros(1, tokens, dtype=torch.long, device=device)
    lm.forward_logits(ids[:, :8])  # warm-up: first calls allocate
    started = time.perf_counter()
    lm.forward_logits(ids)
    batched = tokens * costs.full_cost() / max(time.perf_counter() - started, 1e-9)
    cache = lm.new_decoding_cache(batch)
    lm.forward_logits(torch.zeros(batch, 16, dtype=torch.long, device=device), cache=cache)
    step = torch.zeros(batch, 1, dtype=torch.long, device=device)
    lm.forward_logits(step, cache=cache)  # warm-up step
    started = time.perf_counter()
    for _ in range(2):
        lm.forward_logits(step, cache=cache)
    decode = 2 * batch * costs.full_cost() / max(time.perf_counter() - started, 1e-9)
    return Rates(batched, decode)


def audit_plan(config: AuditConfig, lm: LayeredModel, costs: CostModel, rates: Rates, lens_stored: bool = False) -> dict[str, float]:
    """Expected seconds per audit stage (probe, profile, calibrate; prune and steer when asked)."""
    layers = sum(costs.layers) + costs.embed
    head = costs.head * SOFTMAX_OVERHEAD
    num_layers, d, vocab = lm.num_layers, lm.hidden_size, lm.vocab_size
    train_lens = config.lens == TUNED and not lens_stored

    def batched(flops: float) -> float:
        return flops / rates.batched

    def lens_training(tokens: int, steps: int) -> float:
        validation = min(LENS_VALIDATION, tokens // 4)
        candidates = min(vocab, LENS_STEP_TOKENS * LENS_TOP_K // 4)  # the union of the tokens' top-k, roughly
        step = LENS_STEP_TOKENS * num_layers * 3 * (costs.translator + 2 * d * candidates)  # forward and backward
        # The validation (before and after) scores the full head once per token, then the candidates per layer.
        check = validation * (head + num_layers * (costs.translator + 2 * d * candidates))
        return batched(tokens * layers + 2 * check + steps * step)

    probe = config.probe
    lenses = 2 if config.lens == TUNED else 1
    plan = {
        "probe": (lens_training(probe.lens_train_tokens, probe.lens_steps) if train_lens else 0.0)
        + batched(probe.tokens * (2 * layers + costs.head) + probe.tokens * (num_layers + 1) * lenses * head),
        "profile": batched((config.profile.warmup + config.profile.repeats) * config.seq_len * (layers + costs.head)),
        "calibrate": _calibration(config, lm, costs, rates, layers),
    }
    if config.prune is not None:  # roughly: forwards and backwards over its calibration tokens, held-out forwards, decoding
        prune = config.prune
        plan["prune"] = batched((3 * prune.calibration_tokens + prune.heldout_tokens) * (layers + costs.head)) + prune.prompts * (
            prune.new_tokens
        ) * (layers + costs.head) / (rates.decode / max(1, config.calibrate.batch_size))
    if config.steer is not None:
        sweep = config.sweep_config()
        generations = config.steer.examples + len(sweep.alphas) * sweep.questions + sweep.questions
        plan["steer"] = generations * sweep.max_new_tokens * (layers + costs.head) / (rates.decode / max(1, config.calibrate.batch_size))
    if config.stop is not None:  # one full generation per unit (completions batched; chains one at a time, probes ~1/3 more)
        stop = config.stop_config()
        units = stop.fit_prompts + stop.prompts + stop.heldout_prompts
        if stop.workload == COMPLETION:
            plan["stop"] = units * (stop.prompt_tokens * layers / rates.batched + stop.new_tokens * (layers + costs.head) / rates.decode)
        else:
            plan["stop"] = 1.33 * units * stop.chain_tokens * (layers + costs.head) / (rates.decode / max(1, config.calibrate.batch_size))
    return plan


def _calibration(config: AuditConfig, lm: LayeredModel, costs: CostModel, rates: Rates, layers: float) -> float:
    calibrate = config.calibrate_config()
    first = calibrate.min_layer if calibrate.min_layer is not None else 1
    points = max(1, lm.num_layers - first)  # candidate exit points the traces score (the head and its argmax)
    heads = points * costs.head + (points * costs.translator if calibrate.lens == TUNED else 0.0)
    fit_windows = math.ceil(calibrate.fit_tokens / config.seq_len)
    heldout_windows = math.ceil(calibrate.heldout_tokens / config.seq_len)
    if calibrate.risk != GENERATION_RISK:
        windows = fit_windows + math.ceil(calibrate.calibration_tokens / config.seq_len) + heldout_windows
        return windows * config.seq_len * (layers + heads) / rates.batched

    def generation(prompts: int) -> float:
        """Prefill, then one decode step per new token, for `prompts` prompts."""
        prefill = prompts * calibrate.prompt_tokens * layers / rates.batched
        steps = prompts * calibrate.new_tokens * (layers + costs.head) / rates.decode
        return prefill + steps

    fit_prompts = fit_windows * max(1, config.seq_len // calibrate.prompt_tokens)
    fit_tokens = fit_prompts * (calibrate.prompt_tokens + calibrate.new_tokens)
    # Continuations (the fit's, then calibration's and held-out's as the candidates' first runs), a quarter of a
    # generation more for the candidates and the certified policies' held-out runs; the traces of the fit
    # sequences (the classifier's labels, the exit points) and of the held-out windows at every candidate point.
    generations = generation(fit_prompts) + 1.25 * (generation(calibrate.prompts) + generation(calibrate.heldout_prompts))
    traces = (fit_tokens + heldout_windows * config.seq_len) * (layers + heads) / rates.batched
    return generations + traces

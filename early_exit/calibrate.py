"""`calibrate_exits`: early-exit calibration for every risk in one library call, without the job.

The job (`jobs/calibrate.py`) adds what a command needs around it: the workspace and its data split,
the tuned lens, the choice of cost model, cached continuations, the artifact. A library user with a
`LayeredModel`, an exit head and token windows calls this directly:

    results = calibrate_exits(lm, LogitLens(lm), count_costs(lm), fit, calibration, heldout,
                              targets=[0.95], risk="generation", prompt_tokens=64, new_tokens=32)
    result, classifier = results[0]  # the certified policy is result.policy

Every window is a random draw from the corpus, and fit, calibration and held-out windows never
overlap: that is what the guarantee assumes (the job draws them so).
"""

from __future__ import annotations

import torch

from dyninfer.core.choices import GENERATION_RISK, RISKS
from dyninfer.core.cost import CostModel
from dyninfer.core.errors import DyninferError
from dyninfer.core.layered import LayeredModel
from dyninfer.core.progress import ProgressFn
from dyninfer.early_exit.certify import CalibrationResult, run_calibrations
from dyninfer.early_exit.confidence import ExitClassifier
from dyninfer.early_exit.generation import PromptSet, certify_generation, fit_sequences, full_continuations
from dyninfer.early_exit.plan import check_calibration_options, plan_exits, trace_plan


def calibrate_exits(
    lm: LayeredModel,
    lens,
    costs: CostModel,
    fit: torch.Tensor,
    calibration: torch.Tensor | PromptSet,
    heldout: torch.Tensor,
    *,
    targets: list[float],
    risk: str = GENERATION_RISK,
    measure: str = "softmax",
    epsilon: float = 0.05,
    vocab_top_k: int = 0,
    min_layer: int | None = None,
    max_points: int = 8,
    kv_mode: str = "propagate",
    prompt_tokens: int = 64,
    new_tokens: int = 32,
    consistency: str = "tokens",
    heldout_prompts: torch.Tensor | PromptSet | None = None,
    batch_size: int = 32,
    progress: ProgressFn | None = None,
    reuse: bool = True,
) -> list[tuple[CalibrationResult, ExitClassifier | None]]:
    """One certified policy per target, each with its exit points, threshold and (classifier measure) classifier.

    `fit`, `heldout`: token windows [n, seq_len + 1]. `calibration`: the windows LTT's examples come from
    (teacher-forced risks: whole windows; generation risk: each window's first `prompt_tokens` tokens are
    one prompt), or for the generation risk a `PromptSet` whose full continuations are already known.
    `heldout_prompts` (generation risk): prompts for the held-out generation report; default: the held-out
    windows' starts. `reuse` (generation risk): each candidate's runs continue the previous candidate's, and
    targets that chose the same exit points share them (the same certified result for less work; False
    generates every candidate from its prompts, for comparison).
    """
    if risk not in RISKS:
        raise DyninferError(f"unknown risk '{risk}'; choose from: {', '.join(RISKS)}")
    if risk != GENERATION_RISK:
        if isinstance(calibration, PromptSet):
            raise DyninferError("a teacher-forced risk certifies on calibration windows, not on prompts")
        return run_calibrations(
            lm,
            lens,
            costs,
            fit,
            calibration,
            heldout,
            targets=targets,
            measure=measure,
            epsilon=epsilon,
            risk=risk,
            vocab_top_k=vocab_top_k,
            min_layer=min_layer,
            max_points=max_points,
            progress=progress,
        )
    check_calibration_options(targets, measure, risk)
    prompts = _prompt_set(lm, calibration, prompt_tokens, new_tokens, batch_size, progress, "calibration")
    held = _prompt_set(
        lm, heldout if heldout_prompts is None else heldout_prompts, prompt_tokens, new_tokens, batch_size, progress, "held-out"
    )
    sequences = fit_sequences(lm, fit, prompt_tokens, new_tokens, batch_size, progress)
    plans = plan_exits(
        lm,
        lens,
        costs,
        sequences,
        targets=targets,
        measure=measure,
        vocab_top_k=vocab_top_k,
        min_layer=min_layer,
        max_points=max_points,
        first=prompt_tokens - 1,
        progress=progress,
    )
    shared: dict | None = {} if len(targets) > 1 else None
    runs_cache: dict | None = {} if reuse else None
    results = []
    for plan in plans.plans:
        held_trace = trace_plan(lm, lens, plans, plan, heldout, measure, vocab_top_k, shared, progress)
        result = certify_generation(
            lm,
            lens,
            costs,
            plan,
            prompts,
            held,
            held_trace,
            measure=measure,
            consistency_measure=consistency,
            kv_mode=kv_mode,
            epsilon=epsilon,
            vocab_top_k=vocab_top_k,
            batch_size=batch_size,
            fit_tokens=int(fit.shape[0] * (fit.shape[1] - 1)),
            progress=progress,
            reuse=reuse,
            runs_cache=runs_cache,
        )
        results.append((result, plan.classifier))
    return results


def _prompt_set(
    lm: LayeredModel,
    source: torch.Tensor | PromptSet,
    prompt_tokens: int,
    new_tokens: int,
    batch_size: int,
    progress: ProgressFn | None,
    what: str,
) -> PromptSet:
    """Prompts (the windows' first `prompt_tokens` tokens) with the full model's continuations."""
    if isinstance(source, PromptSet):
        if source.continuations is None:
            source.continuations = full_continuations(
                lm, source.prompts, new_tokens, batch_size, progress, f"full-model continuations ({what})"
            )
        return source
    if source.shape[1] < prompt_tokens:
        raise DyninferError(
            f"the {what} windows hold {source.shape[1]} tokens, fewer than a prompt's {prompt_tokens}; lower `prompt_tokens`"
        )
    prompts = source[:, :prompt_tokens]
    return PromptSet(prompts, full_continuations(lm, prompts, new_tokens, batch_size, progress, f"full-model continuations ({what})"))

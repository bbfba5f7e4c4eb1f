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

from dataclasses import dataclass

import torch

from dyninfer.certification.exits import PromptSet, certify_generation, fit_sequences, full_continuations
from dyninfer.certification.fidelity import certify_fidelity_exits
from dyninfer.core.choices import FIDELITY_RISK, GENERATION_RISK, PROMPT_RISKS, RISKS
from dyninfer.core.cost import CostModel
from dyninfer.core.errors import DyninferError
from dyninfer.core.layered import LayeredModel
from dyninfer.core.progress import ProgressFn
from dyninfer.early_exit.certify import CalibrationResult, run_calibrations
from dyninfer.early_exit.confidence import ExitClassifier
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
    kl_tau: float | None = None,
) -> list[tuple[CalibrationResult, ExitClassifier | None]]:
    """One certified policy per target, each with its exit points, threshold and (classifier measure) classifier.

    `fit`, `heldout`: token windows [n, seq_len + 1]. `calibration`: the windows LTT's examples come from
    (teacher-forced risks: whole windows; the prompt risks, generation and fidelity: each window's first
    `prompt_tokens` tokens are one prompt), or for a prompt risk a `PromptSet` (its full continuations known, or
    None: generated here). `heldout_prompts` (prompt risks): prompts for the held-out report; default: the held-out
    windows' starts. `reuse` (generation risk): each candidate's runs continue the previous candidate's, and
    targets that chose the same exit points share them (the same certified result for less work; False
    generates every candidate from its prompts, for comparison). `kl_tau` (fidelity risk): also certify the share
    of positions with KL(full model || dynamic model) above it.
    """
    if risk not in RISKS:
        raise DyninferError(f"unknown risk '{risk}'; choose from: {', '.join(RISKS)}")
    options = CalibrationOptions(
        targets, measure, epsilon, vocab_top_k, min_layer, max_points, kv_mode, prompt_tokens, new_tokens, consistency, batch_size, progress
    )
    options.risk, options.kl_tau = risk, kl_tau
    if risk not in PROMPT_RISKS:
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
    return _on_prompts(lm, lens, costs, (fit, calibration, heldout, heldout_prompts), options, reuse)


@dataclass
class CalibrationOptions:
    """`calibrate_exits`' options, as its generation-risk steps read them."""

    targets: list[float]
    measure: str
    epsilon: float
    vocab_top_k: int
    min_layer: int | None
    max_points: int
    kv_mode: str
    prompt_tokens: int
    new_tokens: int
    consistency: str
    batch_size: int
    progress: ProgressFn | None
    risk: str = GENERATION_RISK
    kl_tau: float | None = None


def _on_prompts(lm: LayeredModel, lens, costs: CostModel, data: tuple, o: CalibrationOptions, reuse: bool) -> list:
    """The prompt risks: prompt sets, the plan from the fit windows' own continuations, then Learn-then-Test on the
    dynamic model's generations (generation) or its teacher-forced distributions (fidelity), per target."""
    fit, calibration, heldout, heldout_prompts = data
    # Unknown continuations are generated by the generation risk's first (never-exit) run when runs are reused.
    generate = not reuse or o.risk == FIDELITY_RISK
    prompts = _prompt_set(lm, calibration, o, "calibration", generate=generate)
    held = _prompt_set(lm, heldout if heldout_prompts is None else heldout_prompts, o, "held-out", generate=generate)
    sequences = fit_sequences(lm, fit, o.prompt_tokens, o.new_tokens, o.batch_size, o.progress)
    plans = plan_exits(
        lm,
        lens,
        costs,
        sequences,
        targets=o.targets,
        measure=o.measure,
        vocab_top_k=o.vocab_top_k,
        min_layer=o.min_layer,
        max_points=o.max_points,
        first=o.prompt_tokens - 1,
        progress=o.progress,
    )
    shared: dict | None = {} if len(o.targets) > 1 else None
    runs_cache: dict | None = {} if reuse else None
    results = []
    for plan in plans.plans:
        held_trace = trace_plan(lm, lens, plans, plan, heldout, o.measure, o.vocab_top_k, shared, o.progress)
        # what both risks read alike
        common = dict(
            measure=o.measure,
            kv_mode=o.kv_mode,
            epsilon=o.epsilon,
            vocab_top_k=o.vocab_top_k,
            batch_size=o.batch_size,
            fit_tokens=int(fit.shape[0] * (fit.shape[1] - 1)),
            progress=o.progress,
        )
        if o.risk == FIDELITY_RISK:
            result = certify_fidelity_exits(lm, lens, costs, plan, prompts, held, held_trace, kl_tau=o.kl_tau, **common)
            results.append((result, plan.classifier))
            continue
        result = certify_generation(
            lm,
            lens,
            costs,
            plan,
            prompts,
            held,
            held_trace,
            consistency_measure=o.consistency,
            reuse=reuse,
            runs_cache=runs_cache,
            **common,
        )
        results.append((result, plan.classifier))
    return results


def _prompt_set(lm: LayeredModel, source: torch.Tensor | PromptSet, o: CalibrationOptions, what: str, generate: bool) -> PromptSet:
    """Prompts (the windows' first `prompt_tokens` tokens) with the full model's continuations (generated here
    when `generate`, else left for certification to generate)."""
    if isinstance(source, PromptSet):
        prompt_set = source
        prompt_set.new_tokens = o.new_tokens
    else:
        if source.shape[1] < o.prompt_tokens:
            raise DyninferError(
                f"the {what} windows hold {source.shape[1]} tokens, fewer than a prompt's {o.prompt_tokens}; lower `prompt_tokens`"
            )
        prompt_set = PromptSet(source[:, : o.prompt_tokens], None, new_tokens=o.new_tokens)
    if generate and prompt_set.continuations is None:
        prompt_set.set_continuations(
            full_continuations(lm, prompt_set.prompts, o.new_tokens, o.batch_size, o.progress, f"full-model continuations ({what})")
        )
    return prompt_set

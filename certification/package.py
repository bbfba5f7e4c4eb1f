"""Certify what ships: the exported package's own greedy continuations, through ONNX Runtime, against the
original model's.

A quantized (or fp16) package changes tokens, so the bound calibration computed on the torch model is not a
bound on it. Here the package generates, one prompt at a time as it runs when deployed, and a prompt's loss is
1 - the consistency of its continuation with the original full model's (cached by calibration):

- the prompts are calibration's: one per window drawn at random from the train split, so exchangeable;
- the candidates are the thresholds calibration's fixed-sequence test visited, strict to loose. They were fixed
  from the fit split before any calibration prompt was generated; cutting the list where calibration's own test
  stopped only removes candidates, which cannot add a false rejection;
- the first candidate is the package with exits disabled: quantization error counts against the target too;
- Learn-then-Test with betting p-values (the losses are shares), generating only until the first candidate not rejected.

Guarantee: with probability >= 1 - epsilon over the draw of the calibration prompts, the mean consistency of this
package's continuations with the original model's is >= target, on prompts exchangeable with them (the same
corpus, prompt length and number of new tokens, greedy decoding, batch 1) and on the provider it was certified
on (another provider's kernels round differently).
"""

from __future__ import annotations

import math

import numpy as np

from dyninfer.certification.fidelity import FidelitySetting, certify_fidelity_path, decoder_logits
from dyninfer.compressors.ltt import SHARE_P_VALUE, fixed_sequence_test, min_examples
from dyninfer.core.choices import CONSISTENCY_MEASURES, FIDELITY_RISK, TOP1
from dyninfer.core.consistency import all_measures, consistency
from dyninfer.core.errors import DyninferError
from dyninfer.core.layered import LayeredModel
from dyninfer.core.progress import ProgressFn, silent
from dyninfer.core.records import CalibrateRecord
from dyninfer.runtime.decoding import Decoder, generate
from dyninfer.runtime.package_format import ON_PACKAGE, PackageCertificate


def package_continuations(runtime: Decoder, prompts, new_tokens: int, threshold: float | None, progress, what: str):
    """The decoder's greedy continuations of `prompts` ([n, prompt tokens]), batch 1: (tokens [n, T], mean exit layer).
    `threshold` None: exits disabled."""
    report = progress or silent
    prompts = np.asarray(prompts, dtype=np.int64)
    rows, layers = [], []
    mode = "full" if threshold is None else "early-exit"
    report(what, 0, len(prompts))
    for i, prompt in enumerate(prompts):
        run = generate(runtime, prompt[None], new_tokens, mode=mode, exit_threshold=threshold)
        rows.append(np.array(run.tokens[0].tolist(), dtype=np.int64))
        layers += run.exit_layers[1:]  # the first token comes from the prefill, at full depth
        report(what, i + 1, len(prompts))
    return np.stack(rows), float(np.mean(layers)) if layers else float(runtime.num_layers)


def certify_package(
    runtime: Decoder,
    calibration: tuple,
    heldout: tuple | None,
    thresholds: list[float],
    *,
    target: float,
    epsilon: float,
    measure: str,
    original_model: dict,
    provider: str | None = None,
    progress: ProgressFn | None = None,
) -> PackageCertificate:
    """Learn-then-Test on the package's continuations. `calibration`, `heldout`: (prompts [n, P], the original
    model's continuations [n, T]); `thresholds`: the candidates, strict to loose (calibration's; infinite or None
    ones mean never exit, which the package runs as exits disabled)."""
    if measure not in CONSISTENCY_MEASURES:
        raise DyninferError(f"unknown consistency '{measure}'; choose from: {', '.join(CONSISTENCY_MEASURES)}")
    prompts, reference = (np.asarray(a) for a in calibration)
    n, new_tokens = reference.shape
    if n != len(prompts) or n == 0:
        raise DyninferError("the calibration prompts and their continuations do not pair up; re-run `dyninfer calibrate`")
    delta = 1.0 - target
    if n < min_examples(delta, epsilon, SHARE_P_VALUE):
        raise DyninferError(
            f"{n} calibration prompts cannot certify target {target:g} at epsilon {epsilon:g} (at least "
            f"{min_examples(delta, epsilon, SHARE_P_VALUE)} "
            "are needed); calibrate with more prompts"
        )
    # Exits disabled first (quantization alone may already cost the target), then the candidates that exit.
    # (a stored record writes the never-exit candidate, +inf, as null)
    candidates = [None] + [float(t) for t in thresholds if t is not None and math.isfinite(t)]
    curve: list[dict] = []

    def losses_of(j: int) -> np.ndarray:
        label = "exits disabled" if candidates[j] is None else f"threshold {candidates[j]:.4g}"
        tokens, mean_layer = package_continuations(
            runtime, prompts, new_tokens, candidates[j], progress, f"certifying the package: {label} ({j + 1}/{len(candidates)})"
        )
        scores = consistency(measure, tokens, reference)
        curve.append({"threshold": candidates[j], "consistency": float(scores.mean()), "mean_exit_layer": mean_layer})
        return 1.0 - scores

    # fixed_sequence_test wants numbers: exits disabled is +inf (stricter than every threshold)
    ltt, _ = fixed_sequence_test([math.inf if c is None else c for c in candidates], losses_of, delta, epsilon, SHARE_P_VALUE)
    for point, p in zip(curve, ltt.p_values):
        point["p_value"] = float(p)
    chosen = ltt.chosen_index
    threshold = candidates[chosen] if chosen is not None else None
    notes = []
    if chosen is None:
        notes.append(
            f"with exits disabled the package keeps {curve[0]['consistency']:.3f} {measure} consistency with the original model on "
            f"{n} prompts: not enough to certify {target:g}; export with more precise weights or loosen the target"
        )
    held = None
    if heldout is not None and chosen is not None:
        held_prompts, held_reference = (np.asarray(a) for a in heldout)
        tokens, mean_layer = package_continuations(runtime, held_prompts, held_reference.shape[1], threshold, progress, "held-out prompts")
        held = {"prompts": len(held_prompts), "mean_exit_layer": mean_layer} | all_measures(tokens, held_reference)
    return PackageCertificate(
        computed_on=ON_PACKAGE,
        original_model=original_model,
        measure=measure,
        target=target,
        epsilon=epsilon,
        prompts=n,
        prompt_tokens=int(prompts.shape[1]),
        new_tokens=int(new_tokens),
        threshold=threshold,
        full_depth_certified=chosen is not None,
        provider=provider,
        curve=curve,
        heldout=held,
        notes=notes,
    )


def certify_package_fidelity(
    runtimes: list[tuple[Decoder, dict]],
    lm: LayeredModel,
    calibration: tuple,
    heldout: tuple | None,
    thresholds: list,
    *,
    target: float,
    epsilon: float,
    original_model: dict,
    kl_tau: float | None = None,
    provider: str | None = None,
    progress: ProgressFn | None = None,
) -> tuple[PackageCertificate, int | None]:
    """The fidelity risk on the package (certification/fidelity.py: its step teacher-forced along the original model's
    cached continuations, `lm` the original model giving the reference distributions), with its free-running
    consistency on the held-out prompts beside it as information. `runtimes`: the package's graph, or (weights
    auto) its weight candidates, each with the label its curve points carry, ordered from the slowest to the fastest;
    the fixed path tests each with exits disabled in that order, then the thresholds on the last one. Returns the
    certificate and the index of the runtime it certifies (None: none)."""
    path = [FidelitySetting(decoder_logits(runtime), None, label) for runtime, label in runtimes]
    last, label = runtimes[-1]
    path += [FidelitySetting(decoder_logits(last), float(t), label) for t in thresholds if t is not None and math.isfinite(t)]
    certified = certify_fidelity_path(path, lm, calibration, heldout, target=target, epsilon=epsilon, kl_tau=kl_tau, progress=progress)
    chosen = None if certified.chosen is None else min(certified.chosen, len(runtimes) - 1)
    runtime = runtimes[chosen or 0][0]
    prompts, continuations = (np.asarray(a) for a in calibration)
    free = None
    if heldout is not None and certified.full_depth_certified:
        held_prompts, held_reference = (np.asarray(a) for a in heldout)
        tokens, mean_layer = package_continuations(
            runtime, held_prompts, held_reference.shape[1], certified.threshold, progress, "held-out prompts (free-running)"
        )
        free = {"prompts": len(held_prompts), "mean_exit_layer": mean_layer} | all_measures(tokens, held_reference)
    notes = []
    if not certified.full_depth_certified:
        first = certified.curve[0]
        notes.append(
            f"with exits disabled the package keeps the original model's top-1 token at {first['same_top1']:.3f} of positions on "
            f"{len(prompts)} prompts: not enough to certify {target:g}; export with more precise weights or loosen the target"
        )
    return PackageCertificate(
        computed_on=ON_PACKAGE,
        original_model=original_model,
        measure=TOP1,
        target=target,
        epsilon=epsilon,
        prompts=len(prompts),
        prompt_tokens=int(prompts.shape[1]),
        new_tokens=int(continuations.shape[1]),
        threshold=certified.threshold,
        full_depth_certified=certified.full_depth_certified,
        provider=provider,
        curve=certified.curve,
        heldout=free,
        notes=notes,
        risk=FIDELITY_RISK,
        kl_tau=kl_tau,
        fidelity=certified.heldout,
        weights=runtimes[chosen or 0][1].get("weights"),
    ), chosen


def carried_over(
    calibration: CalibrateRecord | None, original_model: dict, computed_on: str, package_graph: str
) -> PackageCertificate | None:
    """The calibration's certified generation bound as the package's certificate, marked as computed on another graph
    (None when calibration certified no generation bound: a teacher-forced risk is about simulated exits)."""
    certificate = None if calibration is None else calibration.certificate
    if certificate is None or not certificate.on_prompts:
        return None
    return PackageCertificate(
        computed_on=computed_on,
        original_model=original_model,
        measure=certificate.measure,
        target=certificate.target,
        epsilon=certificate.epsilon,
        prompts=certificate.units,
        prompt_tokens=certificate.prompt_tokens or 0,
        new_tokens=certificate.new_tokens or 0,
        threshold=calibration.policy.threshold if calibration.policy is not None else None,
        full_depth_certified=True,  # the torch model at full depth is the original model
        package_graph=package_graph,
        risk=certificate.risk,
        kl_tau=certificate.kl_tau,
    )

"""Fidelity, certified on what runs: the deployed step teacher-forced along the original model's own continuations.

The field judges a quantized or early-exiting model position by position, on the same context as the original
(llama.cpp's `llama-perplexity --kl-divergence`: "same top p", mean and 99th-percentile KL, the perplexity
ratio), not by free-running token identity, which compounds: one early difference changes every later token.
Here, for each calibration prompt, a decoder (a package through ONNX Runtime, or the torch dynamic model) is fed
the original model's greedy continuation token by token, batch 1 as deployed, exits on at a candidate threshold,
and the distribution it gives at each position is compared with the original model's on the same prefix:

- a prompt's loss is the share of its positions whose argmax differs from the original's (the top-1 risk); with a
  stated τ, also the share whose KL(original ‖ decoder) exceeds τ, tested together with it (a candidate passes
  when both p-values do: the larger is a valid p-value for both holding);
- the prompts are calibration's, one per window drawn at random from the train split, so exchangeable;
  Learn-then-Test runs over the candidates strict to loose, exits disabled first (quantization error counts
  against the target too), with betting p-values (the losses are shares), computing each candidate only when
  the test reaches it.

Guarantee: with probability >= 1 - epsilon over the draw of the calibration prompts, on prompts exchangeable with
them (the same corpus, prompt and continuation lengths, batch 1, and for a package the provider it was certified
on), the expected share of positions at which the decoder's top-1 differs from the original model's, fed the
original model's continuation, is <= 1 - target (and, with τ, the share with KL > τ too).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from dyninfer.certification.exits import PromptSet, generate_and_score
from dyninfer.compressors.ltt import SHARE_P_VALUE, LTTResult, betting_decided, betting_prefix_p_value, min_examples
from dyninfer.core.choices import CONSISTENCY_MEASURES, FIDELITY_RISK, TOP1
from dyninfer.core.consistency import all_measures
from dyninfer.core.cost import CostModel
from dyninfer.core.errors import DyninferError
from dyninfer.core.layered import LayeredModel
from dyninfer.core.policies import ExitPolicy
from dyninfer.core.progress import ProgressFn, silent
from dyninfer.early_exit.certify import CalibrationResult, CurvePoint
from dyninfer.early_exit.plan import ExitPlan, generation_grid
from dyninfer.early_exit.trace import Trace, evaluate, exit_costs
from dyninfer.runtime.decoding import Decoder, teacher_forced
from dyninfer.runtime.dynamic import DynamicModel

# (prompts [b, P], continuations [b, T], threshold or None) -> (logits [b, T, V] as numpy, exit layer per position [b, T])
ForcedLogits = Callable[[np.ndarray, np.ndarray, float | None], tuple[np.ndarray, np.ndarray]]


@dataclass
class FidelityRun:
    """One setting's teacher-forced pass over a prompt set, against the original model, per prompt and position."""

    disagree: np.ndarray  # [n, T] the decoder's argmax differs from the original's
    kl: np.ndarray  # [n, T] KL(original || decoder), nats
    nll: np.ndarray  # [n, T] the decoder's negative log-likelihood of the continuation's token
    nll_original: np.ndarray  # [n, T] the original model's
    exit_layers: np.ndarray  # [n, T]

    def losses(self, kl_tau: float | None) -> list[np.ndarray]:
        """Per prompt, each certified risk's loss: the share of disagreeing positions (and with KL above `kl_tau`)."""
        out = [self.disagree.mean(axis=1)]
        return out if kl_tau is None else [*out, (self.kl > kl_tau).mean(axis=1)]

    def measures(self) -> dict:
        """What the field reads: same top-1, mean and 99th-percentile KL, the perplexity ratio, the mean exit layer."""
        return {
            "same_top1": float(1.0 - self.disagree.mean()),
            "mean_kl": float(self.kl.mean()),
            "kl_p99": float(np.quantile(self.kl, 0.99)),
            "perplexity_ratio": float(math.exp(self.nll.mean() - self.nll_original.mean())),
            "mean_exit_layer": float(self.exit_layers[:, 1:].mean()) if self.exit_layers.shape[1] > 1 else float("nan"),
            # where the positions after the prefill's left (the prefill runs every layer)
            "exit_histogram": {int(d): int(c) for d, c in zip(*np.unique(self.exit_layers[:, 1:], return_counts=True))},
            "prompts": int(self.disagree.shape[0]),
        }


def decoder_logits(decoder: Decoder) -> ForcedLogits:
    """A decoder's teacher-forced logits, one prompt at a time (batch 1, as deployed)."""

    def run(prompts: np.ndarray, continuations: np.ndarray, threshold: float | None):
        runs = [teacher_forced(decoder, prompt[None], continuation, threshold) for prompt, continuation in zip(prompts, continuations)]
        return np.stack([r.logits for r in runs]), np.array([r.exit_layers for r in runs])

    return run


@torch.no_grad()
def original_log_probs(lm: LayeredModel, prompts: np.ndarray, continuations: np.ndarray) -> np.ndarray:
    """The original model's log-probabilities [b, T, V] at each continuation position (the full model's forward over
    prompt and continuation, teacher-forced)."""
    ids = torch.from_numpy(np.concatenate([prompts, continuations], axis=1)).to(lm.device)
    logits = lm.forward_logits(ids)[:, prompts.shape[1] - 1 : -1].float()
    return torch.log_softmax(logits, dim=-1).cpu().numpy()


def _compare(reference: np.ndarray, logits: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, ...]:
    """(disagree, KL(reference || logits), the decoder's NLL of `tokens`, the reference's) per position."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    log_q = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    log_p = reference.astype(np.float64)
    p = np.exp(log_p)
    # -inf entries (a restricted exit vocabulary) carry no reference mass where they matter; keep the sum finite
    kl = np.where(p > 0, p * (log_p - np.maximum(log_q, -1e30)), 0.0).sum(axis=-1)
    picked = tokens[..., None]
    nll = -np.take_along_axis(log_q, picked, axis=-1)[..., 0]
    nll_original = -np.take_along_axis(log_p, picked, axis=-1)[..., 0]
    return reference.argmax(-1) != logits.argmax(-1), np.maximum(kl, 0.0), nll, nll_original


def measure_fidelity(
    forced: ForcedLogits,
    lm: LayeredModel,
    prompt_set: tuple,
    threshold: float | None,
    *,
    batch_size: int = 8,
    progress: ProgressFn | None = None,
    what: str = "fidelity",
    until: Callable[[FidelityRun], bool] | None = None,
) -> FidelityRun:
    """The decoder (`forced`) at `threshold` against the original model `lm` on `prompt_set` (prompts [n, P], the
    original model's continuations [n, T]), a batch of prompts at a time (the reference's vocabulary-wide
    log-probabilities for all prompts at once would not fit in memory for a big vocabulary). `until(run so far)`:
    stop after the batch where it says True (the run then covers the first prompts only)."""
    report = progress or silent
    prompts, continuations = (np.asarray(a, dtype=np.int64) for a in prompt_set)
    parts: list[tuple[np.ndarray, ...]] = []
    report(what, 0, len(prompts))
    for start in range(0, len(prompts), batch_size):
        rows = slice(start, start + batch_size)
        logits, exits = forced(prompts[rows], continuations[rows], threshold)
        reference = original_log_probs(lm, prompts[rows], continuations[rows])
        # a prompt at a time: float64 copies of a [T, V] distribution are 134 MB for a 262k vocabulary
        compared = [_compare(r, q, t) for r, q, t in zip(reference, logits, continuations[rows])]
        parts.append((*(np.stack(column) for column in zip(*compared)), exits))
        report(what, min(start + batch_size, len(prompts)), len(prompts))
        if until is not None and start + batch_size < len(prompts) and until(_joined(parts)):
            break
    return _joined(parts)


def _joined(parts: list[tuple[np.ndarray, ...]]) -> FidelityRun:
    return FidelityRun(*(np.concatenate(column) for column in zip(*parts)))


@dataclass
class FidelityCertificate:
    """Learn-then-Test's outcome on the fidelity risk: the certified setting's index in the path tested (None: none),
    its threshold (None: exits disabled, or nothing), the test, the curve of settings tested, the held-out measures at
    the certified setting."""

    chosen: int | None
    threshold: float | None
    full_depth_certified: bool
    ltt: LTTResult  # the test along the path (lambdas: the settings' thresholds, infinite for exits disabled)
    curve: list[dict]  # per setting tested: its label, threshold, measures, risks, p-values
    heldout: dict | None


@dataclass(frozen=True)
class FidelitySetting:
    """One setting on a fixed-sequence path: a decoder (`forced`), its exit threshold (None: exits disabled), and a
    label the curve keeps (the weights of an auto-chosen candidate, say)."""

    forced: ForcedLogits
    threshold: float | None
    label: dict = dataclasses.field(default_factory=dict)


def certify_fidelity(
    forced: ForcedLogits,
    lm: LayeredModel,
    calibration: tuple,
    heldout: tuple | None,
    thresholds: list,
    **options,
) -> FidelityCertificate:
    """Fixed-sequence testing of one decoder: exits disabled first, then the candidates in the given order (strict to
    loose; None or infinite ones dropped). `options`: those of `certify_fidelity_path`."""
    path = [FidelitySetting(forced, None)]
    path += [FidelitySetting(forced, float(t)) for t in thresholds if t is not None and math.isfinite(t)]
    return certify_fidelity_path(path, lm, calibration, heldout, **options)


def certify_fidelity_path(
    path: list[FidelitySetting],
    lm: LayeredModel,
    calibration: tuple,
    heldout: tuple | None,
    *,
    target: float,
    epsilon: float,
    kl_tau: float | None = None,
    batch_size: int = 8,
    progress: ProgressFn | None = None,
) -> FidelityCertificate:
    """Fixed-sequence testing of the top-1 risk (and the KL risk, with `kl_tau`) along `path`, a sequence of settings
    fixed before any calibration prompt is read and ordered from the most to the least likely to pass; each is computed
    only when the test reaches it, and the last one rejected before the first failure is certified. Choosing along a
    fixed path spends no more than epsilon however many settings it holds. Each setting's prompts are computed, a batch
    at a time in their drawn order, only until its betting test is decided either way (`betting_decided`): the same
    decisions as computing every prompt, in a fraction of the time when the risk is far from the target."""
    prompts, continuations = (np.asarray(a) for a in calibration)
    n = len(prompts)
    if n == 0 or continuations.shape[0] != n:
        raise DyninferError("the calibration prompts and their continuations do not pair up; re-run `dyninfer calibrate`")
    if not path:
        raise ValueError("the path holds no setting to test")
    delta = 1.0 - target
    needed = min_examples(delta, epsilon, SHARE_P_VALUE)
    if n < needed:
        raise DyninferError(
            f"{n} calibration prompts cannot certify fidelity {target:g} at epsilon {epsilon:g} (at least {needed} are needed even "
            "if every position agreed); calibrate with more prompts"
        )
    curve: list[dict] = []
    chosen = None
    for j, setting in enumerate(path):
        label = "exits disabled" if setting.threshold is None else f"threshold {setting.threshold:.4g}"
        label = " ".join([*(str(v) for v in setting.label.values()), label])

        def decided(run: FidelityRun) -> bool:  # every risk passed, or one can no longer pass: the same decision as all n
            verdicts = [betting_decided(loss, delta, epsilon, n) for loss in run.losses(kl_tau)]
            return False in verdicts or all(verdicts)

        run = measure_fidelity(
            setting.forced, lm, (prompts, continuations), setting.threshold, batch_size=batch_size, progress=progress,
            what=f"certifying fidelity: {label} ({j + 1}/{len(path)})", until=decided,
        )  # fmt: skip
        losses = run.losses(kl_tau)
        # the setting's p-value: its worst risk's (the larger is valid for both holding), over the prompts computed
        p_values = [betting_prefix_p_value(loss, delta, epsilon, n) for loss in losses]
        curve.append(
            {
                **setting.label,
                "threshold": setting.threshold,
                **run.measures(),
                "risks": [float(x.mean()) for x in losses],
                "p_values": p_values,
            }
        )
        if max(p_values) > epsilon:
            break  # fixed-sequence testing: the first setting not certified ends the path
        chosen = j
    threshold = path[chosen].threshold if chosen is not None else None
    held = None
    if heldout is not None and chosen is not None:
        held_run = measure_fidelity(
            path[chosen].forced, lm, heldout, threshold, batch_size=batch_size, progress=progress, what="held-out fidelity"
        )
        held = held_run.measures()
    tested = [max(point["p_values"]) for point in curve]
    ltt = LTTResult(
        lambdas=[math.inf if s.threshold is None else s.threshold for s in path[: len(curve)]],
        risks=[max(point["risks"]) for point in curve],
        p_values=tested,
        rejected=[p <= epsilon for p in tested],
        chosen_index=chosen,
        delta=delta,
        epsilon=epsilon,
        n=n,
        method=SHARE_P_VALUE,
        untested=len(path) - len(curve),
    )
    return FidelityCertificate(chosen, threshold, chosen is not None, ltt, curve, held)


def rows_logits(dynamic: DynamicModel) -> ForcedLogits:
    """The torch dynamic model's teacher-forced logits, a batch of prompts at a time, each row exiting as it would
    alone (`RowDecoding.teacher_forced_rows`): the same risk as a package's, at a fraction of batch 1's time."""

    def run(prompts: np.ndarray, continuations: np.ndarray, threshold: float | None):
        device = dynamic.lm.device
        logits, depths = dynamic.teacher_forced_rows(
            torch.from_numpy(prompts).to(device), torch.from_numpy(continuations).to(device), threshold
        )
        return logits.cpu().numpy(), depths.cpu().numpy()

    return run


def certify_fidelity_exits(
    lm: LayeredModel,
    lens,
    costs: CostModel,
    plan: ExitPlan,
    calibration: PromptSet,
    heldout: PromptSet,
    held_trace: Trace,
    *,
    measure: str,
    kv_mode: str = "propagate",
    epsilon: float = 0.05,
    vocab_top_k: int = 0,
    batch_size: int = 32,
    fit_tokens: int = 0,
    kl_tau: float | None = None,
    progress: ProgressFn | None = None,
) -> CalibrationResult:
    """Early exit certified on the fidelity risk: the dynamic model at `plan`'s points, teacher-forced along the full
    model's continuations of the calibration prompts (known: `calibration.continuations`), candidates from the fit
    trace (fixed before any calibration prompt is run). Beside the certificate, the held-out prompts' fidelity and,
    as information, their free-running consistency."""
    policy = ExitPolicy(lens.kind, measure, plan.points, None, vocab_top_k, kv_mode)
    notes = [] if plan.points else ["no exit point pays for its checks at this target on the fit data; the policy never exits"]
    thresholds = generation_grid(plan.fit_trace) if plan.points else []
    dynamic = DynamicModel(lm, dataclasses.replace(policy), lens, plan.classifier)  # its own policy: the threshold moves
    sets = [(s.prompts.cpu().numpy(), s.continuations.cpu().numpy()) for s in (calibration, heldout)]
    certified = certify_fidelity(
        rows_logits(dynamic), lm, sets[0], sets[1], thresholds, target=plan.target, epsilon=epsilon, kl_tau=kl_tau,
        batch_size=batch_size, progress=progress,
    )  # fmt: skip
    policy.threshold = certified.threshold
    if policy.threshold is None and plan.points:
        notes.append(
            f"no threshold keeps the full model's top-1 at {plan.target:g} of positions with the guarantee: the policy never exits"
        )
    curve = [
        CurvePoint(
            math.inf if point["threshold"] is None else point["threshold"],
            point["same_top1"],
            float("nan"),
            _predicted_speedup(point["exit_histogram"], policy, costs, lm.hidden_size),
            point["mean_exit_layer"],
            p_value,
        )
        for point, p_value in zip(certified.curve, certified.ltt.p_values)
    ]
    generated = _heldout_summary(dynamic, heldout, certified, policy, costs, batch_size, progress)
    return CalibrationResult(
        policy=policy,
        target=plan.target,
        epsilon=epsilon,
        risk=FIDELITY_RISK,
        units=f"{calibration.size} prompts of {calibration.prompts.shape[1]} tokens, {calibration.length} positions each (top-1 fidelity)",
        ltt=certified.ltt,
        naive_threshold=None,
        curve=curve,
        heldout=evaluate(held_trace, policy.threshold, costs, policy, lm.hidden_size),
        naive_heldout=None,
        full_accuracy_heldout=float(held_trace.final_correct.double().mean()),
        fit_tokens=fit_tokens,
        calibration_tokens=calibration.size * calibration.length,
        notes=notes,
        generated=generated,
    )


def _predicted_speedup(histogram: dict, policy: ExitPolicy, costs: CostModel, hidden_size: int) -> float:
    """Full cost over the mean cost of the positions' exits (`histogram`: exit depth -> positions)."""
    point_cost, full = exit_costs(costs, policy.exit_points, policy.measure, policy.lens == "tuned", policy.vocab_top_k, hidden_size)
    price = dict(zip(policy.exit_points, point_cost))
    total = sum(histogram.values())
    mean = sum(price.get(int(depth), full) * count for depth, count in histogram.items()) / max(total, 1)
    return float(costs.full_cost() / mean) if mean > 0 else 1.0


def _heldout_summary(
    dynamic: DynamicModel, heldout: PromptSet, certified: FidelityCertificate, policy, costs, batch_size, progress
) -> dict:
    """The certified policy on the held-out prompts: its fidelity (certified measure) and free-running consistency."""
    base = {"prompts": heldout.size, "new_tokens": heldout.length, "measure": TOP1}
    fidelity = certified.heldout or {}
    if policy.threshold is None:  # the policy never exits: its continuations and distributions are the full model's
        free = {name: 1.0 for name in CONSISTENCY_MEASURES}
    else:
        dynamic.policy.threshold = policy.threshold
        free = all_measures(
            generate_and_score(dynamic, heldout, "tokens", batch_size, progress, "held-out generation").tokens, heldout.continuations
        )
    histogram = fidelity.get("exit_histogram") or {dynamic.lm.num_layers: 1}
    total = max(sum(histogram.values()), 1)
    return (
        base
        | free
        | {
            "certified_measure": fidelity.get("same_top1", 1.0),
            "fidelity": fidelity,
            "predicted_speedup": _predicted_speedup(histogram, policy, costs, dynamic.lm.hidden_size),
            "mean_exit_layer": fidelity.get("mean_exit_layer", float(dynamic.lm.num_layers)),
            "exit_distribution": {str(d): c / total for d, c in histogram.items()},
        }
    )

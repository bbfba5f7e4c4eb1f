"""Teaching a model to exit early (`tune-exits`): a LoRA fine-tune with early-exit losses and self-distillation.

Off-the-shelf checkpoints are not trained to be read before their last layer. LayerSkip
(Elhoushi et al., 2024) and CALM (Schuster et al., 2022) train the exits the model already has
(its own final norm and LM head, read after intermediate layers). Here a LoRA (peft) on every
layer learns that, and the original weights never change: the result is a low-rank delta that
every loader bakes in.

The loss at each step, over a batch of train windows (x: tokens, y: next tokens):

    sum over this step's exit depths d:  w_d * exit_loss_d
    + kl_weight * KL(original final || tuned final)   (self-distillation: the full model stays the original)

- `exit_loss_d` with `exit_target` "teacher" is KL(original final || exit d): what self-speculation
  and early exit are paid for, agreement with the full model. With "labels" it is the
  cross-entropy against y (LayerSkip's choice).
- `w_d` rises with depth (`depth_weighting`: LayerSkip's quadratic d(d+1)/2, linear d, or uniform),
  normalised to sum to `exit_weight` over the step's depths.
- Curriculum (LayerSkip): "rotational" trains every `rotation`-th exit depth, shifting by one each
  step; "gradual" switches the exits on from the deepest to the shallowest over the run; "all"
  trains every exit at every step.
- Layer dropout (LayerSkip): decoder layer l (0-based) is skipped for the whole batch with
  probability layer_dropout * (2^(l/(L-1)) - 1), rising with depth to `layer_dropout` at the last.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dyninfer.compressors.lora import lora_attached, lora_delta
from dyninfer.compressors.steering import ValveDelta
from dyninfer.compressors.tuning_settings import TuningSettings
from dyninfer.core import distributed
from dyninfer.core.artifacts import Artifact
from dyninfer.core.errors import DyninferError, option
from dyninfer.core.layered import LayeredModel
from dyninfer.core.progress import ProgressFn, silent
from dyninfer.core.records import TuneRecord
from dyninfer.core.stages import TUNING_GROUP

# Where the LoRA's delta lives in the artifact's `tuning` tensor group.
TUNING_PREFIX = "lora."


def active_depths(depths: list[int], curriculum: str, rotation: int, step: int, steps: int) -> list[int]:
    """The exit depths trained at `step` (0-based) of `steps`."""
    if curriculum == "rotational":
        return [d for i, d in enumerate(depths) if i % rotation == step % rotation]
    if curriculum == "gradual":  # deepest first, one more every steps/len(depths) steps
        count = min(len(depths), 1 + (step * len(depths)) // steps)
        return depths[len(depths) - count :]
    return list(depths)


def depth_weights(depths: list[int], weighting: str, total: float) -> dict[int, float]:
    """Each depth's weight, rising with depth, summing to `total`."""
    raw = {d: (d * (d + 1) / 2 if weighting == "quadratic" else d if weighting == "linear" else 1.0) for d in depths}
    norm = sum(raw.values())
    return {d: total * w / norm for d, w in raw.items()}


def layer_drop_rates(num_layers: int, maximum: float) -> list[float]:
    """LayerSkip's per-layer dropout rate: 0 at the first layer, rising exponentially to `maximum` at the last."""
    if num_layers == 1:
        return [0.0]
    return [maximum * (2 ** (i / (num_layers - 1)) - 1) for i in range(num_layers)]


def layer_groups(depths: list[int], num_layers: int) -> dict[str, list[int]]:
    """Exit depths by thirds of the model (shallow, middle, deep), for progress and the record."""
    groups: dict[str, list[int]] = {"shallow": [], "middle": [], "deep": []}
    for d in depths:
        groups[("shallow", "middle", "deep")[min(2, 3 * (d - 1) // num_layers)]].append(d)
    return {name: found for name, found in groups.items() if found}


@dataclass
class TuningRecord:
    settings: dict
    exit_depths: list[int]
    tokens: int  # train tokens seen (predictions, all steps)
    seconds: float
    trainable_parameters: int
    # Per step: the mean exit loss of each group trained that step, and the final KL.
    history: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        first, last = self.history[:10], self.history[-10:]

        def mean(rows, key):
            values = [r[key] for r in rows if key in r]
            return sum(values) / len(values) if values else None

        keys = sorted({k for r in self.history for k in r if k != "step"})
        return {
            "settings": self.settings,
            "exit_depths": self.exit_depths,
            "tokens": self.tokens,
            "seconds": self.seconds,
            "trainable_parameters": self.trainable_parameters,
            "first_losses": {k: mean(first, k) for k in keys},
            "final_losses": {k: mean(last, k) for k in keys},
        }


def _exit_loss(lm: LayeredModel, hidden: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, target: str) -> torch.Tensor:
    """The exit's loss at every position: KL(teacher || exit) or cross-entropy against the next token."""
    logp = lm.head(lm.final_norm(hidden)).float().log_softmax(-1)
    if target == "teacher":
        return (teacher.exp() * (teacher - logp)).sum(-1).mean()
    return F.nll_loss(logp.flatten(0, 1), labels.flatten())


def tune_exits(
    lm: LayeredModel, windows: torch.Tensor, settings: TuningSettings, progress: ProgressFn | None = None
) -> tuple[ValveDelta, TuningRecord]:
    """Train a LoRA that makes the exits at `settings.depths` agree with the full model; returns its delta.

    `windows` [N, T + 1]: the train windows, used in order and again from the start if the steps
    need more (a caller shuffles them). The model's weights are unchanged afterwards.
    Data-parallel: every rank draws the same batch rows and trains on its share; gradients are summed.
    """
    world = distributed.current()
    depths = _checked_depths(lm, windows, settings, world)
    report = progress or silent
    groups = layer_groups(depths, lm.num_layers)
    drop_rates = layer_drop_rates(lm.num_layers, settings.layer_dropout)
    dropout = torch.Generator().manual_seed(settings.seed + 1)  # the same draws on every rank
    sampling = torch.Generator().manual_seed(settings.seed + 2)
    started = time.perf_counter()
    history: list[dict] = []
    with lora_attached(lm, settings.rank, settings.targets or None, settings.seed) as peft_model:
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer, schedule = _optimizer_and_schedule(params, settings)
        for step in range(settings.steps):
            local, share = _local_batch(windows, step, settings.batch_size, world, lm.device)
            active = set(active_depths(depths, settings.curriculum, settings.rotation, step, settings.steps))
            skip = (torch.rand(lm.num_layers, generator=dropout) < torch.tensor(drop_rates)).tolist()
            loss, final, losses = _step_loss(lm, peft_model, local, active, skip, sampling, settings)
            optimizer.zero_grad()
            (loss * share).backward()
            world.sum_gradients(params)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            row = _history_row(step, final, losses, groups, share, world)
            if not math.isfinite(row["final_kl"]):
                raise DyninferError(f"the tuning loss became {row['final_kl']} at step {step + 1}; lower {option('lr')}")
            history.append(row)
            report(f"tuning exits — {_describe_losses(history, groups)}", step + 1, settings.steps)
        delta = lora_delta(peft_model)
        trainable = sum(p.numel() for p in params)
    record = TuningRecord(
        asdict(settings),
        depths,
        settings.steps * settings.batch_size * (windows.shape[1] - 1),
        time.perf_counter() - started,
        trainable,
        history,
    )
    return delta, record


def _checked_depths(lm: LayeredModel, windows: torch.Tensor, settings: TuningSettings, world: distributed.World) -> list[int]:
    """The exit depths to train, once the settings, the model, the windows and the world size are checked."""
    settings.validate()
    lm.require_weights("tune-exits")
    if lm.adapter.recurrent:
        raise DyninferError(
            f"tune-exits does not apply to {lm.config.model_type}: its recurrent state has no "
            "cache to reuse in self-speculation; probe, calibrate and run work"
        )
    depths = settings.depths(lm.num_layers)
    if windows.shape[0] < 1:
        raise DyninferError("no train windows to tune on; use more data")
    if settings.batch_size < world.size:
        raise DyninferError(
            f"{option('batch_size')} {settings.batch_size} cannot be shared among {world.size} processes; give each at least one window"
        )
    return depths


def _optimizer_and_schedule(params: list[torch.nn.Parameter], settings: TuningSettings):
    """AdamW with a linear warm-up over the first tenth of the steps, then a linear decay to a tenth of the rate."""
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    warmup = max(1, settings.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, 1.0 - 0.9 * max(0, s - warmup) / max(1, settings.steps - warmup))
    )
    return optimizer, schedule


def _local_batch(
    windows: torch.Tensor, step: int, batch_size: int, world: distributed.World, device: torch.device
) -> tuple[torch.Tensor, float]:
    """This rank's share of the step's batch (the windows in order, wrapping around) and its fraction of the batch."""
    n = windows.shape[0]
    rows = [(step * batch_size + i) % n for i in range(batch_size)]
    local = windows[[rows[i] for i in world.shard(len(rows), "windows of a batch")]].to(device)
    return local, local.shape[0] / len(rows)


def _step_loss(
    lm: LayeredModel,
    peft_model,
    local: torch.Tensor,
    active: set[int],
    skip: list[bool],
    sampling: torch.Generator,
    settings: TuningSettings,
) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
    """One step's loss on `local` (the weighted exit losses plus the final KL), the final KL, and each exit depth's loss.

    The `active` exit depths are scored on a random fraction of the positions; the layers marked in `skip` are dropped.
    """
    x, y = local[:, :-1], local[:, 1:]
    with torch.no_grad(), peft_model.disable_adapter():
        teacher = lm.model(x, use_cache=False).logits.float().log_softmax(-1)
    positions = x.shape[1]
    scored = torch.randperm(positions, generator=sampling)[: max(1, round(settings.exit_token_fraction * positions))].sort().values
    scored = scored.to(lm.device)
    exit_teacher, exit_labels = teacher[:, scored], y[:, scored]
    weights = depth_weights(sorted(active), settings.depth_weighting, settings.exit_weight)
    losses: dict[int, torch.Tensor] = {}
    fwd = lm.begin(x)
    hidden = fwd.hidden
    for index in range(lm.num_layers):
        if not skip[index]:
            if settings.checkpointing:
                hidden = checkpoint(lm.run_layer, fwd, index, hidden, use_reentrant=False)
            else:
                hidden = lm.run_layer(fwd, index, hidden)
        if index + 1 in active:  # the head recomputed in the backward pass: logits are [B, T, V]
            losses[index + 1] = checkpoint(
                _exit_loss, lm, hidden[:, scored], exit_teacher, exit_labels, settings.exit_target, use_reentrant=False
            )
    final = _exit_loss(lm, hidden, teacher, y, "teacher")
    loss = sum(weights[d] * losses[d] for d in losses) + settings.kl_weight * final
    return loss, final, losses


def _history_row(
    step: int, final: torch.Tensor, losses: dict[int, torch.Tensor], groups: dict[str, list[int]], share: float, world: distributed.World
) -> dict:
    """The step's final KL and the mean exit loss of each group trained, averaged over all ranks."""
    row = {"step": step, "final_kl": float(world.sum(float(final.detach()) * share))}
    for name, found in groups.items():
        trained = [d for d in found if d in losses]
        if trained:
            row[name] = float(world.sum(sum(float(losses[d].detach()) for d in trained) / len(trained) * share))
    return row


def _describe_losses(history: list[dict], groups: dict[str, list[int]]) -> str:
    """The recent mean loss of each group of exits and the final KL, for the progress line."""
    recent = history[-20:]
    parts = []
    for name in (*groups, "final_kl"):
        values = [r[name] for r in recent if name in r]
        if values:
            parts.append(f"{name.replace('_', ' ')} {sum(values) / len(values):.3f}")
    return ", ".join(parts)


# --------------------------------------------------------------------------- the artifact's tuning


def fingerprint(delta: ValveDelta) -> str:
    """A short hash of the delta's values: tells two tunings apart (a session bakes one only)."""
    digest = hashlib.sha256()
    for key, value in sorted(delta.tensors(TUNING_PREFIX).items()):
        digest.update(key.encode())
        digest.update(value.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def stored_tuning(artifact: Artifact) -> ValveDelta | None:
    """The tune-exits LoRA the artifact holds (None when it was never tuned)."""
    if TuneRecord.read(artifact) is None:
        return None
    delta = ValveDelta.from_tensors(artifact.tensors.get(TUNING_GROUP, {}), TUNING_PREFIX)
    if delta is None:
        raise DyninferError(
            "the artifact records a tune stage but holds no tuning.safetensors weights; it is damaged: "
            "run `dyninfer tune-exits` into a new artifact"
        )
    return delta


def bake_tuning(lm: LayeredModel, delta: ValveDelta) -> None:
    """Fold the LoRA into the model's weights for good."""
    delta.add_to(lm.model, 1.0, "the tune-exits LoRA", "tune this model again with `dyninfer tune-exits`")


# --------------------------------------------------------------------------- the draft's vocabulary

DRAFT_VOCABULARY = "draft_vocabulary"  # its tensor in the tuning group


def draft_vocabulary(windows: torch.Tensor, vocab_size: int, size: int) -> torch.Tensor:
    """The `size` most frequent token ids of `windows` (most frequent first): the draft head's prior candidates."""
    counts = torch.bincount(windows.flatten(), minlength=vocab_size)
    top = counts.argsort(descending=True, stable=True)[:size]
    return top[counts[top] > 0]


def stored_draft_vocabulary(artifact: Artifact) -> torch.Tensor | None:
    """The draft vocabulary tune-exits stored (None: draft with the full head)."""
    ids = artifact.tensors.get(TUNING_GROUP, {}).get(DRAFT_VOCABULARY)
    if ids is None:
        return None
    vocab = artifact.base_model.vocab_size
    if ids.dim() != 1 or ids.dtype != torch.int64 or ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise DyninferError(
            "the artifact's draft vocabulary is not a list of token ids of this model; it is damaged: "
            "run `dyninfer tune-exits` into a new artifact"
        )
    return ids

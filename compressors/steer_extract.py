"""Making steering directions: prompts for paired chains, activation means, a LoRA valve, deltas.

Every chain is scored as a completion of the same prompt (`CotPrompter`): the question, after
`shots` worked long examples, in the model's chat template when it has one. The activation
direction is the mean hidden state over the short chains' tokens minus the mean over the
long chains' (so +α shortens), per layer; `pca` takes the first principal direction of
the paired differences instead, signed and scaled to move the mean by as much. The valve
is a LoRA (peft) trained on the short chains, or the difference of two checkpoints/adapters.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from dyninfer.compressors.cot_data import CotExample, builtin_problems, is_builtin, load_cot_jsonl
from dyninfer.compressors.lora import is_conv1d, lora_attached, lora_delta
from dyninfer.compressors.steering import ActivationSteering, ValveDelta
from dyninfer.core.choices import BUILTIN_COT
from dyninfer.core.choices import STEER_KINDS as KINDS
from dyninfer.core.errors import DyninferError
from dyninfer.core.models import LoadedModel, load_model
from dyninfer.core.progress import ProgressFn, silent

# --------------------------------------------------------------------------- data and prompts


def load_cot_split(spec: str, seed: int, train: int, heldout: int) -> tuple[list[CotExample], list[CotExample]]:
    """(train, held-out) examples: disjoint questions, the same for the same arguments.

    The built-in generator is a seeded stream, so a longer request keeps the same prefix; a
    JSONL file is shuffled with `seed` and its last `heldout` examples are held out.
    """
    if train < 1 or heldout < 1:
        raise DyninferError(f"need at least one training and one held-out example, got {train} and {heldout}")
    if is_builtin(spec):
        examples = builtin_problems(spec, seed, train + heldout)
        return examples[:train], examples[train:]
    if spec.startswith("builtin:"):
        raise DyninferError(f"unknown built-in CoT data '{spec}'; use {BUILTIN_COT}[:STEPS] or a .jsonl file")
    examples = load_cot_jsonl(spec)
    if len(examples) < 2:
        raise DyninferError(f"'{spec}' holds {len(examples)} example; steering needs at least 2 (some to extract from, some held out)")
    random.Random(seed).shuffle(examples)
    held = min(heldout, max(1, len(examples) // 5))
    return examples[: min(train, len(examples) - held)], examples[len(examples) - held :]


@dataclass
class CotPrompter:
    tokenizer: object
    shots: list[CotExample]

    @property
    def chat(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def prompt(self, question: str) -> str:
        if self.chat:
            messages = []
            for shot in self.shots:
                messages += [{"role": "user", "content": shot.question}, {"role": "assistant", "content": shot.long}]
            messages.append({"role": "user", "content": question})
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        worked = "".join(f"Question: {s.question}\nAnswer: {s.long}\n\n" for s in self.shots)
        return f"{worked}Question: {question}\nAnswer:"

    def completion(self, chain: str) -> str:
        eos = getattr(self.tokenizer, "eos_token", None) or ""
        return (chain if self.chat else " " + chain) + eos

    def encode(self, question: str, chain: str) -> tuple[list[int], int]:
        """Token ids of prompt + chain (+ end of sequence) and where the chain starts."""
        prompt = self.tokenizer(self.prompt(question), add_special_tokens=not self.chat)["input_ids"]
        chain_ids = self.tokenizer(self.completion(chain), add_special_tokens=False)["input_ids"]
        return list(prompt) + list(chain_ids), len(prompt)


def batches(items: list, size: int):
    """Consecutive slices of `items` of at most `size` each."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def right_padded(sequences: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists as one right-padded batch: (ids, attention mask)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return ids, mask


def pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


# --------------------------------------------------------------------------- activation directions


def default_layers(num_layers: int) -> list[int]:
    """The middle decoder layer: where length/style directions are usually cleanest (repeng, ITI)."""
    return [num_layers // 2]


@torch.no_grad()
def chain_means(
    loaded: LoadedModel,
    prompter: CotPrompter,
    examples: list[CotExample],
    layers: list[int],
    batch_size: int = 8,
    first_tokens: int | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, torch.Tensor]:
    """Mean output of each layer over each chain's tokens (or its first `first_tokens`, counted
    from the last prompt token, where the model decides how to answer): {"long"|"short": [examples, layers, d]}."""
    lm = loaded.layered
    captured: dict[int, torch.Tensor] = {}

    def hook_for(i):
        def hook(module, args, output):
            captured[i] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [lm.layers[i].register_forward_hook(hook_for(i)) for i in layers]
    report = progress or silent
    out = {}
    try:
        for kind in ("long", "short"):
            encoded = [prompter.encode(e.question, getattr(e, kind)) for e in examples]
            means = []
            for done, batch in enumerate(batches(encoded, batch_size)):
                report(f"hidden states of the {kind} chains", done * batch_size, len(encoded))
                ids, mask = right_padded([seq for seq, _ in batch], pad_id(prompter.tokenizer))
                loaded.model(input_ids=ids, attention_mask=mask, use_cache=False)
                chain = torch.zeros(ids.shape, dtype=torch.bool)
                for row, (seq, start) in enumerate(batch):
                    if first_tokens is None:
                        chain[row, start : len(seq)] = True
                    else:
                        chain[row, start - 1 : min(len(seq), start - 1 + first_tokens)] = True
                weights = chain.float() / chain.sum(1, keepdim=True).clamp(min=1)
                means.append(torch.stack([torch.einsum("bt,btd->bd", weights, captured[i].float()) for i in layers], 1))
            out[kind] = torch.cat(means)
    finally:
        for handle in handles:
            handle.remove()
    return out


def activation_direction(means: dict[str, torch.Tensor], layers: list[int], kind: str = "mean") -> ActivationSteering:
    """Short-minus-long per layer: the difference of means, or its first principal direction (PCA)."""
    if kind not in KINDS:
        raise DyninferError(f"`kind` must be one of {', '.join(KINDS)}, got '{kind}'")
    differences = means["short"] - means["long"]  # [examples, layers, d]
    mean_shift = differences.mean(0)
    directions = {}
    for j, layer in enumerate(layers):
        if kind == "mean":
            directions[layer] = mean_shift[j]
            continue
        # Uncentred, so the component follows the consistent shift rather than the spread around it.
        _, _, vh = torch.linalg.svd(differences[:, j], full_matrices=False)
        unit = vh[0]
        projection = float(mean_shift[j] @ unit)
        directions[layer] = unit * projection  # sign and size: moves the mean as far along it as the mean shift
    return ActivationSteering(directions)


# --------------------------------------------------------------------------- CoT-Valve: a LoRA on the short chains


def train_valve(
    loaded: LoadedModel,
    prompter: CotPrompter,
    examples: list[CotExample],
    *,
    rank: int = 8,
    steps: int = 200,
    lr: float = 1e-3,
    batch_size: int = 8,
    seed: int = 0,
    targets: tuple[str, ...] | None = None,
    progress: ProgressFn | None = None,
) -> tuple[ValveDelta, dict]:
    """Fit a LoRA (peft) to the short chains; Δθ = its B·A·scaling per adapted weight. The model is left as it was."""
    lm = loaded.layered
    targets = tuple(targets or lm.adapter.lora_targets)
    encoded = [prompter.encode(e.question, e.short) for e in examples]
    pad = pad_id(prompter.tokenizer)
    rng = random.Random(seed)
    losses = []
    report = progress or silent
    with lora_attached(lm, rank, targets, seed) as peft_model:
        backbone = getattr(peft_model.base_model.model, lm.adapter.backbone)  # final norm included, no head
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
        for step in range(steps):
            batch = rng.sample(encoded, min(batch_size, len(encoded)))
            ids, mask = right_padded([seq for seq, _ in batch], pad)
            labels = ids.clone()
            labels[mask == 0] = -100
            for row, (_, start) in enumerate(batch):
                labels[row, :start] = -100
            # The head only where the loss is: on a 49k vocabulary it costs more than the layers otherwise.
            hidden = backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[:, :-1]
            targets_next = labels[:, 1:]
            scored = targets_next != -100
            loss = F.cross_entropy(lm.head(hidden[scored]).float(), targets_next[scored])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            report("training the CoT-Valve LoRA on the short chains", step + 1, steps)
        delta = lora_delta(peft_model)
    record = {
        "rank": rank,
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,
        "targets": list(targets),
        "first_loss": losses[0] if losses else None,
        "final_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
    }
    return delta, record


# --------------------------------------------------------------------------- CoT-Valve: the delta of two sources


def _read_adapter(path: Path, loaded: LoadedModel) -> ValveDelta:
    """A peft LoRA adapter directory as a low-rank delta on this model's weights."""
    import safetensors.torch

    config_path, weights_path = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not weights_path.is_file():
        raise DyninferError(
            f"'{path}' has no adapter_model.safetensors; save the adapter with peft's "
            "save_pretrained (safetensors; pickled .bin files are not read)"
        )
    try:
        config = json.loads(config_path.read_text())
        rank, alpha = int(config["r"]), float(config["lora_alpha"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DyninferError(f"'{config_path}' is not a readable LoRA adapter config ({exc})") from None
    if rank < 1 or not math.isfinite(alpha):
        raise DyninferError(f"'{config_path}' says r = {rank}, lora_alpha = {alpha:g}: a LoRA needs r of at least 1 and a finite alpha")
    scaling = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    try:
        weights = safetensors.torch.load_file(str(weights_path))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise DyninferError(f"'{weights_path}' is damaged ({str(exc).splitlines()[0]})") from None
    modules = dict(loaded.model.named_modules())
    low_rank = {}
    for key, a in weights.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module_name = key[: -len(".lora_A.weight")].removeprefix("base_model.model.")
        b = weights.get(key.replace(".lora_A.", ".lora_B."))
        if b is None or module_name not in modules:
            raise DyninferError(
                f"the adapter in '{path}' adapts '{module_name}', which this model does not have; it was made for another model"
            )
        b = b.float() * scaling
        a = a.float()
        low_rank[f"{module_name}.weight"] = (a.T, b.T) if is_conv1d(modules[module_name]) else (b, a)
    if not low_rank:
        raise DyninferError(f"'{weights_path}' holds no LoRA weights (no *.lora_A.weight tensors)")
    delta = ValveDelta(low_rank, {})
    delta.parameters_of(loaded.model)  # shapes checked now, with a clear message
    return delta


def _checkpoint_delta(spec: str, loaded: LoadedModel) -> ValveDelta:
    """θ(checkpoint) − θ(base) for every parameter that differs, as dense deltas."""
    other = load_model(spec)
    base = dict(loaded.model.named_parameters())
    dense = {}
    for name, param in other.model.named_parameters():
        mine = base.get(name)
        if mine is None or mine.shape != param.shape:
            raise DyninferError(
                f"'{spec}' is not the same architecture as the base model ('{name}' does not match); pass a checkpoint fine-tuned from it"
            )
        theirs, ours = param.detach().float(), mine.detach().float().cpu()  # compared in float32 on the CPU
        if not torch.equal(ours, theirs):
            dense[name] = theirs - ours
    return ValveDelta({}, dense)


def _source_delta(spec: str, loaded: LoadedModel) -> ValveDelta:
    if spec == "base":
        return ValveDelta({}, {})
    path = Path(spec)
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return _read_adapter(path, loaded)
    return _checkpoint_delta(spec, loaded)


def valve_between(loaded: LoadedModel, start: str, end: str) -> ValveDelta:
    """Δθ = θ(end) − θ(start); each is `base`, a peft adapter directory or a checkpoint (model spec)."""
    to, frm = _source_delta(end, loaded), _source_delta(start, loaded)
    if not frm.dense and not to.dense:  # both low rank: [up_to, -up_from] @ [down_to; down_from]
        low_rank = dict(to.low_rank)
        for name, (up, down) in frm.low_rank.items():
            if name in low_rank:
                up_to, down_to = low_rank[name]
                low_rank[name] = (torch.cat([up_to, -up], 1), torch.cat([down_to, down], 0))
            else:
                low_rank[name] = (-up, down)
        delta = ValveDelta(low_rank, {})
    else:
        names = set(to.names()) | set(frm.names())
        dense = {}
        for name in names:
            value = (to.delta(name) if name in to.names() else 0) - (frm.delta(name) if name in frm.names() else 0)
            if isinstance(value, torch.Tensor) and bool(value.abs().max() > 0):
                dense[name] = value
        delta = ValveDelta({}, dense)
    if not delta.names():
        raise DyninferError(f"'{start}' and '{end}' have the same weights: there is no direction between them")
    return delta

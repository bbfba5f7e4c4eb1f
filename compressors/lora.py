"""A peft LoRA attached to a loaded model for training, and what it learned as a low-rank delta.

`lora_attached` wraps the model's target linears (the adapter's `lora_targets` by default) for
the duration of a training loop and takes them out again, leaving every original weight as it
was; `lora_delta` reads the trained B·A·scaling of each adapted weight as a `ValveDelta`
(laid out like the weight), which `steering.bake` folds into any copy of the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from dyninfer.compressors.steering import ValveDelta
from dyninfer.core.errors import DyninferError
from dyninfer.core.layered import LayeredModel


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"  # transformers' GPT-2 layer: weight stored as [in, out]


@contextlib.contextmanager
def lora_attached(lm: LayeredModel, rank: int, targets: tuple[str, ...] | None = None, seed: int = 0) -> Iterator:
    """The peft model with a fresh LoRA of `rank` on `targets` while inside; the plain model again after."""
    from peft import LoraConfig, get_peft_model  # peft imports slowly; only training stages need it

    targets = tuple(targets or lm.adapter.lora_targets)
    model = lm.model
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    config = LoraConfig(
        r=rank, lora_alpha=rank, target_modules=list(targets), lora_dropout=0.0, bias="none", fan_in_fan_out=lm.family == "gpt2"
    )
    torch.manual_seed(seed)  # the LoRA's initialisation
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:
        raise DyninferError(f"cannot attach a LoRA to {', '.join(targets)}: {str(exc).splitlines()[0]}") from None
    try:
        yield peft_model
    finally:
        peft_model.unload()  # the original modules back in place; their weights were never touched
        if hasattr(model, "peft_config"):  # peft leaves its config on the model it wrapped
            del model.peft_config
        for name, p in model.named_parameters():  # peft froze the base weights; give them back as they were
            p.requires_grad_(trainable.get(name, p.requires_grad))


def lora_delta(peft_model) -> ValveDelta:
    """Each adapted weight's B·A·scaling (laid out like the weight) as a low-rank delta."""
    low_rank = {}
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            a = module.lora_A["default"].weight.detach().float().cpu().clone()  # [r, in]
            b = module.lora_B["default"].weight.detach().float().cpu().clone() * module.scaling["default"]  # [out, r]
            low_rank[f"{name}.weight"] = (a.T, b.T) if is_conv1d(module.get_base_layer()) else (b, a)
    if not low_rank:
        raise DyninferError("no weights matched the LoRA targets; pass other `targets`")
    return ValveDelta(low_rank, {})

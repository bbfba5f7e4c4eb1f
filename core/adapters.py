"""The one place that knows model architectures, with core/adapter_forward.py.

For each supported family an `ArchAdapter` says where the embedding, the decoder layers,
the final norm and the LM head live, how to prepare one forward pass (positions, masks,
rotary embeddings, cache positions) and how to call a single layer: this module holds the
adapters, how a model is matched to one, what each family of the standard layout does
differently, and how a layer's weights are read; core/adapter_forward.py holds the forward
code the adapters point to. `LayeredModel` (core/layered.py) wraps a Hugging Face causal LM
with its adapter so that the rest of dyninfer can run the model layer by layer (to read every
layer's hidden state, or to stop early) without knowing the family. The code mirrors the
forward loops of transformers 4.57 (pinned in pyproject).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dyninfer.core.adapter_forward import GPT2_FORWARD, MAMBA_FORWARD, ROTARY_FORWARD, ForwardPass
from dyninfer.core.errors import DyninferError
from dyninfer.core.families import family_of


@dataclass(frozen=True)
class ArchAdapter:
    family: str
    model_types: tuple[str, ...]
    backbone: str  # attribute of the CausalLM holding the base model
    embed: str
    layers: str
    norm: str
    prepare: Callable[..., ForwardPass]
    new_cache: Callable[[nn.Module, int], Any]
    layer_kwargs_at: Callable[..., dict[str, Any]]  # kwargs to run one layer on tokens at explicit positions
    propagate: Callable[..., None]  # write a skipped layer's cache entry from an exit hidden state
    embed_at: Callable[..., torch.Tensor]
    recurrent: bool = False  # state-space model: a fixed-size state instead of a KV cache
    # For an attention kernel that rotates queries and keys itself: the rotary tables of positions 0 .. total-1 per
    # layer, and a context in which the family's attention leaves them unrotated. None: no rotary embedding to move.
    rotary_tables: Callable[..., Any] | None = None
    deferred_rotary: Callable[..., Any] | None = None
    # The module (path inside a decoder layer) whose output is the last term added to the
    # residual stream: a bias there equals adding a vector to the layer's output (steering).
    residual_out: str | None = "mlp.down_proj"  # None: found per layer by structure
    # Weight matrices a LoRA adapts by default (peft target module names).
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    # The blocks a decoder layer is profiled by: (piece name, submodule path). What a layer
    # does outside them (norms, residual adds) is reported as its "rest".
    blocks: tuple[tuple[str, str], ...] = (("attention", "self_attn"), ("mlp", "mlp"))


_ROTARY = dict(backbone="model", embed="embed_tokens", layers="layers", norm="norm", **ROTARY_FORWARD)

# Families known by name: the ones whose layout is not the standard rotary decoder's.
NAMED_ADAPTERS: tuple[ArchAdapter, ...] = (
    ArchAdapter(
        "gpt2",
        ("gpt2",),
        backbone="transformer",
        embed="wte",
        layers="h",
        norm="ln_f",
        **GPT2_FORWARD,
        residual_out="mlp.c_proj",
        lora_targets=("c_attn", "c_proj", "c_fc"),
        blocks=(("attention", "attn"), ("mlp", "mlp")),
    ),
    ArchAdapter(
        "mamba",
        ("mamba",),
        backbone="backbone",
        embed="embeddings",
        layers="layers",
        norm="norm_f",
        **MAMBA_FORWARD,
        recurrent=True,
        residual_out="mixer.out_proj",
        lora_targets=("in_proj", "x_proj", "out_proj"),
        blocks=(("mixer", "mixer"),),
    ),
)

# --- what families of the standard rotary layout do differently (transformers 4.57) ---
# (Which of them CALM propagation computes K/V for directly, PLAIN_KV_FAMILIES, is declared beside that
# code in core/adapter_forward.py.)
# The embedding output is scaled in the model's forward, outside the embedding module.
EMBED_SCALES: dict[str, Callable[[Any], float]] = {
    **dict.fromkeys(("gemma", "gemma2", "vaultgemma"), lambda config: config.hidden_size**0.5),
    **dict.fromkeys(("granite", "granitemoe", "granitemoeshared", "granitemoehybrid"), lambda config: config.embedding_multiplier),
}
# The LM head's logits are scaled before any softcap.
LOGIT_SCALES: dict[str, Callable[[Any], float]] = {
    **dict.fromkeys(("granite", "granitemoe", "granitemoeshared", "granitemoehybrid"), lambda config: 1.0 / config.logits_scaling),
    **dict.fromkeys(("cohere", "cohere2"), lambda config: config.logit_scale),
}
# Where the standard layout keeps its pieces, in the order they are looked for.
FINAL_NORMS = ("norm", "final_layernorm")
MLP_BLOCKS = ("mlp", "block_sparse_moe")
ATTENTION_INPUT_NORMS = ("input_layernorm", "attention_layernorm")  # none: post-norm layers (OLMo 2, EXAONE 4)
MLP_OUTPUTS = ("down_proj", "fc2", "c_proj")
POST_MLP_NORMS = ("post_feedforward_layernorm", "post_mlp_layernorm")
MOE_MARKERS = ("experts", "router")  # a mixture-of-experts block holds experts and a router
ROUTER_NAMES = ("gate", "router")


def first_child(module: nn.Module, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if isinstance(getattr(module, n, None), nn.Module)), None)


def is_moe(block: nn.Module) -> bool:
    return first_child(block, MOE_MARKERS) is not None


def _standard_layout(model: nn.Module) -> str | None:
    """Why `model` does not have the standard rotary decoder layout, or None when it does."""
    base = getattr(model, "model", None)
    if not isinstance(base, nn.Module):
        return "no `model` backbone"
    missing = [n for n in ("embed_tokens", "layers", "rotary_emb") if not hasattr(base, n)]
    if first_child(base, FINAL_NORMS) is None:
        missing.append("final norm")
    if missing:
        return f"no {', '.join(missing)} in its backbone"
    if "position_ids" not in inspect.signature(base.rotary_emb.forward).parameters:
        return "a rotary embedding that does not take position ids (an older rotary API)"
    if not isinstance(base.layers, nn.ModuleList) or len(base.layers) == 0:
        return "no list of decoder layers"
    layer = base.layers[0]
    if not hasattr(layer, "self_attn") or first_child(layer, MLP_BLOCKS) is None:
        return "decoder layers without `self_attn` and an MLP block"
    if model.get_output_embeddings() is None:
        return "no LM head"
    return None


def _rotary_adapter(model: nn.Module) -> ArchAdapter:
    """The generic adapter, fitted to `model`'s module names."""
    base, model_type = model.model, model.config.model_type
    layer = base.layers[0]
    mlp = first_child(layer, MLP_BLOCKS)
    routers = set(ROUTER_NAMES) if any(is_moe(getattr(x, mlp)) for x in base.layers) else set()
    linear = sorted({name.rpartition(".")[2] for name, m in layer.named_modules() if isinstance(m, nn.Linear)} - routers)
    return ArchAdapter(
        family_of(model_type),
        (model_type,),
        **(_ROTARY | {"norm": first_child(base, FINAL_NORMS)}),
        residual_out=None,
        lora_targets=tuple(linear),
        blocks=(("attention", "self_attn"), ("mlp", mlp)),
    )


def residual_out_path(layer: nn.Module) -> str:
    """The module whose output a standard decoder layer adds to the residual stream last (per layer: some
    families mix dense and mixture-of-experts layers)."""
    post_norm = first_child(layer, POST_MLP_NORMS)
    if post_norm:  # post-norm MLP (Gemma 2/3, OLMo 2, GLM-4): the norm adds last
        return post_norm
    mlp = first_child(layer, MLP_BLOCKS)
    block = getattr(layer, mlp)
    output = None if is_moe(block) else first_child(block, MLP_OUTPUTS)
    return f"{mlp}.{output}" if output else mlp  # a mixture of experts: its whole output is added


def adapter_for(model: nn.Module) -> ArchAdapter:
    """The named adapter of `model`'s family, or the generic one when its modules follow the standard
    rotary decoder layout (whatever its model_type)."""
    model_type = getattr(model.config, "model_type", None)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers) == 0:
        raise DyninferError(
            f"the {model_type} model has no decoder layers (num_hidden_layers 0); there is nothing to exit from: pass a model with layers"
        )
    for adapter in NAMED_ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    why = _standard_layout(model)
    if why is None:
        return _rotary_adapter(model)
    hint = " (for Gemma 3 use the text-only checkpoint / Gemma3ForCausalLM)" if model_type == "gemma3" else ""
    raise DyninferError(
        f"unsupported architecture '{model_type}'{hint}: {why}. dyninfer runs decoders with the "
        "standard rotary layout (model.{embed_tokens, layers, norm, rotary_emb} and lm_head), "
        "GPT-2 and Mamba; `dyninfer models` lists the tested families"
    )


# Activation names in configs -> the kernels' names (kernels/reference.py).
_MLP_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
    "relu": "relu",
}


@dataclass
class MlpWeights:
    """A decoder layer's MLP as plain tensors (the module's own weights, not copies).

    `kind` "gated": down(act(first(x)) * up(x)); "plain": down(act(first(x) + first_bias)).
    `first`/`up` are [n, d] (one row per neuron), `down` is [d, n].
    """

    kind: str
    act: str
    first: torch.Tensor
    up: torch.Tensor | None
    down: torch.Tensor
    first_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    @property
    def neurons(self) -> int:
        return self.first.shape[0]


def _mlp_activation(config) -> str:
    name = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None) or getattr(config, "activation_function", None)
    if name not in _MLP_ACTIVATIONS:
        raise DyninferError(
            f"MLP pruning does not apply to {getattr(config, 'model_type', '?')}: its MLP activation '{name}' has no "
            f"sparse kernel (supported: {', '.join(sorted(_MLP_ACTIVATIONS))}); the other stages work"
        )
    return _MLP_ACTIVATIONS[name]


def _rows(module: nn.Module) -> torch.Tensor:
    """A projection's weight as [out, in] (GPT-2's Conv1D stores [in, out])."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()


def mlp_weights(config, mlp: nn.Module) -> MlpWeights:
    model_type = getattr(config, "model_type", "?")
    if is_moe(mlp):
        raise DyninferError(
            f"MLP pruning does not apply to {model_type}: its MLP is a mixture-of-experts block "
            f"({type(mlp).__name__}); the other stages work"
        )
    act = _mlp_activation(config)
    if hasattr(mlp, "gate_proj"):  # Llama's gated MLP and most of its descendants
        return MlpWeights("gated", act, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, down_bias=mlp.down_proj.bias)
    if hasattr(mlp, "gate_up_proj") and isinstance(mlp.gate_up_proj, nn.Linear):  # Phi-3, GLM: [gate; up] fused
        gate, up = mlp.gate_up_proj.weight.chunk(2, dim=0)
        return MlpWeights("gated", act, gate, up, mlp.down_proj.weight, down_bias=mlp.down_proj.bias)
    for first, down in (("up_proj", "down_proj"), ("fc1", "fc2"), ("c_fc", "c_proj")):  # ungated
        if hasattr(mlp, first) and hasattr(mlp, down):
            one, two = getattr(mlp, first), getattr(mlp, down)
            return MlpWeights("plain", act, _rows(one), None, _rows(two), first_bias=one.bias, down_bias=two.bias)
    raise DyninferError(
        f"cannot read the MLP of {model_type} ({type(mlp).__name__}) for pruning; pruning supports "
        "gated (gate/up/down, fused gate_up) and two-projection MLPs"
    )

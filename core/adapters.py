"""The one place that knows model architectures.

For each supported family an `ArchAdapter` says where the embedding, the decoder layers,
the final norm and the LM head live, how to prepare one forward pass (positions, masks,
rotary embeddings, cache positions) and how to call a single layer. `LayeredModel` wraps a
Hugging Face causal LM with its adapter so that the rest of dyninfer can run the model
layer by layer (to read every layer's hidden state, or to stop early) without knowing the
family. The code mirrors the forward loops of transformers 4.57 (pinned in pyproject).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dyninfer.core.errors import DyninferError
from dyninfer.core.families import family_of

if TYPE_CHECKING:  # the layered model hands itself to its adapter's functions
    from dyninfer.core.layered import LayeredModel


@dataclass
class ForwardPass:
    """Per-forward state shared by all layers: the embedding output and layer kwargs."""

    hidden: torch.Tensor
    layer_kwargs: Callable[[int, nn.Module], dict[str, Any]]
    layer_args: Callable[[int], tuple] = lambda i: ()


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
    # The module (path inside a decoder layer) whose output is the last term added to the
    # residual stream: a bias there equals adding a vector to the layer's output (steering).
    residual_out: str | None = "mlp.down_proj"  # None: found per layer by structure
    # Weight matrices a LoRA adapts by default (peft target module names).
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    # The blocks a decoder layer is profiled by: (piece name, submodule path). What a layer
    # does outside them (norms, residual adds) is reported as its "rest".
    blocks: tuple[tuple[str, str], ...] = (("attention", "self_attn"), ("mlp", "mlp"))


def _cache_position(past_seen: int, length: int, device) -> torch.Tensor:
    return torch.arange(past_seen, past_seen + length, device=device)


def _dynamic_cache(model: nn.Module, batch_size: int):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _prepare_rotary(lm: LayeredModel, input_ids, cache, attention_mask) -> ForwardPass:
    """The standard rotary decoder (Llama's layout): rotary positions, per-layer-type masks."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    base = lm.backbone
    config = base.config
    embeds = lm.scaled_embedding(base.embed_tokens(input_ids))
    past_seen = cache.get_seq_length() if cache is not None else 0
    cache_position = _cache_position(past_seen, embeds.shape[1], embeds.device)
    position_ids = cache_position.unsqueeze(0)
    mask_kwargs = dict(
        config=config,
        input_embeds=embeds,
        attention_mask=attention_mask,
        cache_position=cache_position,
        past_key_values=cache,
        position_ids=position_ids,
    )
    types = {_attention_type(lm, i) for i in range(lm.num_layers)}
    masks: dict[str, Any] = {}
    if FULL in types:
        masks[FULL] = create_causal_mask(**mask_kwargs)
    if SLIDING in types:
        masks[SLIDING] = create_sliding_window_causal_mask(**mask_kwargs)
    if hasattr(base, "rotary_emb_local"):  # Gemma 3: global and local (sliding) rotary bases
        rope = {
            "position_embeddings_global": base.rotary_emb(embeds, position_ids),
            "position_embeddings_local": base.rotary_emb_local(embeds, position_ids),
        }
    else:
        rope = {"position_embeddings": base.rotary_emb(embeds, position_ids)}

    def layer_kwargs(i: int, layer: nn.Module) -> dict[str, Any]:
        return dict(
            attention_mask=masks[_attention_type(lm, i)],
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=cache is not None,
            cache_position=cache_position,
            **rope,
        )

    return ForwardPass(embeds, layer_kwargs)


FULL, SLIDING = "full_attention", "sliding_attention"


def _attention_type(lm: LayeredModel, index: int) -> str:
    """Full or sliding-window attention for layer `index`, as transformers 4.57 decides it: the config's
    `layer_types` when it has them, else every layer slides when `sliding_window` is set (Mistral, Mixtral,
    Starcoder2, Phi-3)."""
    config = lm.config
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return SLIDING if layer_types[index] == SLIDING else FULL
    return SLIDING if getattr(config, "sliding_window", None) else FULL


def _prepare_gpt2(lm: LayeredModel, input_ids, cache, attention_mask) -> ForwardPass:
    from transformers.masking_utils import create_causal_mask

    base = lm.backbone
    embeds = base.wte(input_ids)
    past_seen = cache.get_seq_length() if cache is not None else 0
    cache_position = _cache_position(past_seen, embeds.shape[1], embeds.device)
    position_ids = cache_position.unsqueeze(0)
    hidden = base.drop(embeds + base.wpe(position_ids))
    mask = create_causal_mask(
        config=base.config,
        input_embeds=embeds,
        attention_mask=attention_mask,
        cache_position=cache_position,
        past_key_values=cache,
        position_ids=position_ids,
    )

    def layer_kwargs(i: int, layer: nn.Module) -> dict[str, Any]:
        return dict(
            past_key_values=cache,
            cache_position=cache_position,
            attention_mask=mask,
            use_cache=cache is not None,
        )

    return ForwardPass(hidden, layer_kwargs)


def _mamba_cache(model: nn.Module, batch_size: int):
    from transformers.models.mamba.modeling_mamba import MambaCache

    param = next(model.parameters())
    return MambaCache(model.config, batch_size, device=param.device, dtype=param.dtype)


def _prepare_mamba(lm: LayeredModel, input_ids, cache, attention_mask) -> ForwardPass:
    base = lm.backbone
    hidden = base.embeddings(input_ids)
    cache_position = None
    if cache is not None:
        # transformers' Mamba signals a prefill by a cache_position of length conv_kernel and
        # a decode step by the single position being written (see MambaMixer.slow_forward).
        seen = getattr(cache, "_dyninfer_seen", 0)
        if seen == 0:
            cache_position = torch.arange(0, base.config.conv_kernel, device=hidden.device)
        else:
            if input_ids.shape[1] != 1:
                raise DyninferError("Mamba's cache takes one token at a time after the prefill")
            cache_position = torch.tensor([seen], device=hidden.device)
        cache._dyninfer_seen = seen + input_ids.shape[1]

    def layer_kwargs(i: int, layer: nn.Module) -> dict[str, Any]:
        return dict(cache_params=cache, cache_position=cache_position, attention_mask=attention_mask)

    return ForwardPass(hidden, layer_kwargs)


# --- decoding at explicit positions -------------------------------------------------
# During dynamic decoding the layers' caches hold different numbers of positions (a token
# that exits early is missing from the deeper layers until it is caught up or propagated),
# while transformers sizes masks from layer 0. So each layer call builds its own mask.


def full_dynamic_cache(model: nn.Module, batch_size: int):
    """Caches keep every position (no sliding-window truncation), so they can be cropped
    for speculative rollback; sliding windows are applied in the masks instead."""
    from transformers import DynamicCache

    return DynamicCache()


def _sliding_window(lm: LayeredModel, index: int) -> int | None:
    return lm.config.sliding_window if _attention_type(lm, index) == SLIDING else None


def _mask_at(start: int, length: int, window: int | None, dtype, device, always: bool = False) -> torch.Tensor | None:
    """Additive mask [1, 1, length, start + length]: query start+i sees keys <= itself (and in window).

    None when no key is hidden (one new token, window not yet full): SDPA then takes its
    fast unmasked kernel, as transformers does for plain decoding. `always` builds it
    anyway, for graphs traced once for any number of new tokens.
    """
    if not always and length == 1 and (window is None or start < window):
        return None
    queries = torch.arange(start, start + length, device=device)[:, None]
    keys = torch.arange(0, start + length, device=device)[None, :]
    allowed = keys <= queries
    if window is not None:
        allowed &= keys > queries - window
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def _mask_for(lm: LayeredModel, start: int, length: int, window: int | None, dtype, device):
    if lm.step_memo is None:
        return _mask_at(start, length, window, dtype, device)
    key = ("mask", window)
    if key not in lm.step_memo:  # tracing: one mask per window size per step, always built
        lm.step_memo[key] = _mask_at(start, length, window, dtype, device, always=True)
    return lm.step_memo[key]


def _rotary_at(lm: LayeredModel, layer: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor):
    base = lm.backbone
    # Every layer of a decode step sees the same positions: compute the embedding once per step.
    if lm.step_memo is not None:  # tracing one step: computed once, in the step's main graph
        memo = lm.step_memo.get("rope")
        if memo is None:
            memo = lm.step_memo["rope"] = (
                None,
                base.rotary_emb(hidden, position_ids),
                base.rotary_emb_local(hidden, position_ids) if hasattr(base, "rotary_emb_local") else None,
            )
    else:
        key = (int(position_ids[0, 0]), position_ids.shape[1], hidden.dtype, hidden.device)
        if lm._rope_memo is None or lm._rope_memo[0] != key:
            local = base.rotary_emb_local(hidden, position_ids) if hasattr(base, "rotary_emb_local") else None
            lm._rope_memo = (key, base.rotary_emb(hidden, position_ids), local)
        memo = lm._rope_memo
    _, global_, local = memo
    if local is not None:  # Gemma 3: global and local (sliding) rotary bases
        return {"position_embeddings_global": global_, "position_embeddings_local": local}, (
            local if _attention_type(lm, lm.layer_index(layer)) == SLIDING else global_
        )
    return {"position_embeddings": global_}, global_


def _rotary_kwargs_at(lm: LayeredModel, layer: nn.Module, hidden, start: int, cache) -> dict[str, Any]:
    length = hidden.shape[1]
    positions = torch.arange(start, start + length, device=hidden.device)
    rope, _ = _rotary_at(lm, layer, hidden, positions[None])
    return dict(
        attention_mask=_mask_for(lm, start, length, _sliding_window(lm, lm.layer_index(layer)), hidden.dtype, hidden.device),
        position_ids=positions[None],
        past_key_values=cache,
        use_cache=True,
        cache_position=positions,
        **rope,
    )


def extra_layer_kwargs(cache) -> dict:
    """Keywords a cache asks layers to be called with (the export's buffered KV cache reaches its attention
    function this way; transformers hands a layer's extra keywords down to it). None for transformers' caches."""
    return getattr(cache, "layer_kwargs", {})


def _rotary_propagate(lm: LayeredModel, index: int, hidden: torch.Tensor, start: int, cache) -> None:
    """CALM state propagation: the skipped layer's K/V computed from the exit hidden state.

    Plain K/V projections (Llama, Qwen, Mistral, Gemma...) are computed directly: two projections,
    the per-head key norm where there is one, and the rotary embedding. Any other attention (fused
    QKV, partial rotary, full-width QK norms, latent attention) runs its own forward on the exit
    state, which writes the cache entry exactly as the layer would and discards the output.
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    layer = lm.layers[index]
    attn = layer.self_attn
    x = lm.attention_input(layer, hidden)
    positions = torch.arange(start, start + hidden.shape[1], device=hidden.device)
    _, rope = _rotary_at(lm, layer, hidden, positions[None])
    if not _plain_kv(lm, attn):
        attn(
            hidden_states=x,
            position_embeddings=rope,
            position_ids=positions[None],
            attention_mask=_mask_for(lm, start, hidden.shape[1], _sliding_window(lm, index), x.dtype, x.device),
            past_key_values=cache,
            cache_position=positions,
            use_cache=True,
            **extra_layer_kwargs(cache),
        )
        return
    shape = (*x.shape[:-1], -1, attn.head_dim)
    key = attn.k_proj(x).view(shape).transpose(1, 2)
    value = attn.v_proj(x).view(shape).transpose(1, 2)
    if hasattr(attn, "k_norm"):  # Gemma 3, Qwen 3: keys normalised per head
        key = attn.k_norm(key)
    cos, sin = rope
    _, key = apply_rotary_pos_emb(key, key, cos, sin)
    cache.update(key, value, index, {"sin": sin, "cos": cos, "cache_position": positions})


def _plain_kv(lm: LayeredModel, attn: nn.Module) -> bool:
    """Keys and values are two projections, rotated over the whole head, normalised (if at all) per head."""
    if getattr(lm.config, "partial_rotary_factor", 1.0) not in (None, 1.0) or lm.family not in PLAIN_KV_FAMILIES:
        return False
    norm = getattr(attn, "k_norm", None)
    head_dim = getattr(attn, "head_dim", None)
    return (
        isinstance(getattr(attn, "k_proj", None), nn.Linear)
        and isinstance(getattr(attn, "v_proj", None), nn.Linear)
        and (norm is None or getattr(norm, "weight", torch.empty(0)).numel() == head_dim)
    )


def _token_embed_at(lm: LayeredModel, input_ids: torch.Tensor, start: int) -> torch.Tensor:
    return lm.scaled_embedding(getattr(lm.backbone, lm.adapter.embed)(input_ids))


def _gpt2_embed_at(lm: LayeredModel, input_ids: torch.Tensor, start: int) -> torch.Tensor:
    base = lm.backbone
    positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)[None]
    return base.drop(base.wte(input_ids) + base.wpe(positions))


def _gpt2_kwargs_at(lm: LayeredModel, layer: nn.Module, hidden, start: int, cache) -> dict[str, Any]:
    length = hidden.shape[1]
    return dict(
        past_key_values=cache,
        cache_position=torch.arange(start, start + length, device=hidden.device),
        attention_mask=_mask_for(lm, start, length, None, hidden.dtype, hidden.device),
        use_cache=True,
    )


def _gpt2_propagate(lm: LayeredModel, index: int, hidden: torch.Tensor, start: int, cache) -> None:
    layer = lm.layers[index]
    attn = layer.attn
    _, key, value = attn.c_attn(layer.ln_1(hidden)).split(attn.split_size, dim=2)
    shape = (*hidden.shape[:-1], -1, attn.head_dim)
    positions = torch.arange(start, start + hidden.shape[1], device=hidden.device)
    cache.update(key.view(shape).transpose(1, 2), value.view(shape).transpose(1, 2), index, {"cache_position": positions})


def _mamba_kwargs_at(lm: LayeredModel, layer: nn.Module, hidden, start: int, cache) -> dict[str, Any]:
    if hidden.shape[1] != 1 and start != 0:
        raise ValueError("Mamba layers take one token at a time after the prefill")
    if start == 0:  # transformers' Mamba signals a prefill by a cache_position of length conv_kernel
        position = torch.arange(0, lm.config.conv_kernel, device=hidden.device)
    else:
        position = torch.tensor([start], device=hidden.device)
    return dict(cache_params=cache, cache_position=position, attention_mask=None)


def _mamba_propagate(lm: LayeredModel, index: int, hidden: torch.Tensor, start: int, cache) -> None:
    """A state-space layer has no K/V: its state advances by running the layer on the exit state."""
    layer = lm.layers[index]
    layer(hidden, **_mamba_kwargs_at(lm, layer, hidden, start, cache))


_ROTARY = dict(
    backbone="model",
    embed="embed_tokens",
    layers="layers",
    norm="norm",
    prepare=_prepare_rotary,
    new_cache=_dynamic_cache,
    layer_kwargs_at=_rotary_kwargs_at,
    propagate=_rotary_propagate,
    embed_at=_token_embed_at,
)

# Families known by name: the ones whose layout is not the standard rotary decoder's.
NAMED_ADAPTERS: tuple[ArchAdapter, ...] = (
    ArchAdapter(
        "gpt2",
        ("gpt2",),
        backbone="transformer",
        embed="wte",
        layers="h",
        norm="ln_f",
        prepare=_prepare_gpt2,
        new_cache=_dynamic_cache,
        layer_kwargs_at=_gpt2_kwargs_at,
        propagate=_gpt2_propagate,
        embed_at=_gpt2_embed_at,
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
        prepare=_prepare_mamba,
        new_cache=_mamba_cache,
        layer_kwargs_at=_mamba_kwargs_at,
        propagate=_mamba_propagate,
        embed_at=_token_embed_at,
        recurrent=True,
        residual_out="mixer.out_proj",
        lora_targets=("in_proj", "x_proj", "out_proj"),
        blocks=(("mixer", "mixer"),),
    ),
)

# --- what families of the standard rotary layout do differently (transformers 4.57), in one place ---
# Families whose attention computes K and V with two plain projections rotated over the whole head
# (keys normalised per head at most): CALM propagation computes them directly; the others run the
# attention module itself (fused QKV, partial rotary, layers without rotary, latent attention...).
PLAIN_KV_FAMILIES = frozenset({"llama", "qwen2", "mistral", "gemma3", "qwen3"})
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

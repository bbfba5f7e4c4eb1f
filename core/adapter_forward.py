"""The per-family forward code the adapters of core/adapters.py point to.

How one forward pass is prepared for each layout (positions, masks, rotary embeddings, cache
positions), and how one layer runs on tokens at explicit positions during dynamic decoding,
including CALM's propagation of a skipped layer's cache entry. Together with core/adapters.py
(which family gets which of these functions) this is the only architecture-specific code. The
code mirrors the forward loops of transformers 4.57 (pinned in pyproject).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from dyninfer.core.errors import DyninferError


@dataclass
class ForwardPass:
    """Per-forward state shared by all layers: the embedding output and layer kwargs."""

    hidden: torch.Tensor
    layer_kwargs: Callable[[int, nn.Module], dict[str, Any]]
    layer_args: Callable[[int], tuple] = lambda i: ()


class LayeredModelView(Protocol):
    """What the code below uses of the `LayeredModel` (core/layered.py) that hands itself to it.

    A protocol rather than the class: layered.py imports this module, which must not import it back.
    """

    config: Any
    backbone: nn.Module
    layers: nn.ModuleList
    adapter: Any  # its ArchAdapter: `embed` names the backbone's token embedding module
    step_memo: dict | None  # while a decoding step is traced for export
    rope_memo: tuple | None  # (positions key, global rotary, local rotary) of the last step
    rotary_deferred: bool  # queries and keys reach the attention unrotated (its kernel rotates them)

    @property
    def family(self) -> str: ...

    @property
    def num_layers(self) -> int: ...

    def layer_index(self, layer: nn.Module) -> int: ...

    def scaled_embedding(self, embeds: torch.Tensor) -> torch.Tensor: ...

    def attention_input(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor: ...


# Families whose attention computes K and V with two plain projections rotated over the whole head
# (keys normalised per head at most): CALM propagation computes them directly; the others run the
# attention module itself (fused QKV, partial rotary, layers without rotary, latent attention...).
PLAIN_KV_FAMILIES = frozenset({"llama", "qwen2", "mistral", "gemma3", "qwen3"})


def _cache_position(past_seen: int, length: int, device) -> torch.Tensor:
    return torch.arange(past_seen, past_seen + length, device=device)


def _dynamic_cache(model: nn.Module, batch_size: int):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _prepare_rotary(lm: LayeredModelView, input_ids, cache, attention_mask) -> ForwardPass:
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


def _attention_type(lm: LayeredModelView, index: int) -> str:
    """Full or sliding-window attention for layer `index`, as transformers 4.57 decides it: the config's
    `layer_types` when it has them, else every layer slides when `sliding_window` is set (Mistral, Mixtral,
    Starcoder2, Phi-3)."""
    config = lm.config
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return SLIDING if layer_types[index] == SLIDING else FULL
    return SLIDING if getattr(config, "sliding_window", None) else FULL


def _prepare_gpt2(lm: LayeredModelView, input_ids, cache, attention_mask) -> ForwardPass:
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


def _prepare_mamba(lm: LayeredModelView, input_ids, cache, attention_mask) -> ForwardPass:
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


def _sliding_window(lm: LayeredModelView, index: int) -> int | None:
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


def _mask_for(lm: LayeredModelView, start: int, length: int, window: int | None, dtype, device):
    if lm.step_memo is None:
        return _mask_at(start, length, window, dtype, device)
    key = ("mask", window)
    if key not in lm.step_memo:  # tracing: one mask per window size per step, always built
        lm.step_memo[key] = _mask_at(start, length, window, dtype, device, always=True)
    return lm.step_memo[key]


def _rotary_at(lm: LayeredModelView, layer: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor):
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
        if lm.rope_memo is None or lm.rope_memo[0] != key:
            local = base.rotary_emb_local(hidden, position_ids) if hasattr(base, "rotary_emb_local") else None
            lm.rope_memo = (key, base.rotary_emb(hidden, position_ids), local)
        memo = lm.rope_memo
    _, global_, local = memo
    if local is not None:  # Gemma 3: global and local (sliding) rotary bases
        return {"position_embeddings_global": global_, "position_embeddings_local": local}, (
            local if _attention_type(lm, lm.layer_index(layer)) == SLIDING else global_
        )
    return {"position_embeddings": global_}, global_


def _rotary_kwargs_at(lm: LayeredModelView, layer: nn.Module, hidden, start: int, cache) -> dict[str, Any]:
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


def _rotary_propagate(lm: LayeredModelView, index: int, hidden: torch.Tensor, start: int, cache) -> None:
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
    if not lm.rotary_deferred:
        _, key = apply_rotary_pos_emb(key, key, cos, sin)
    cache.update(key, value, index, {"sin": sin, "cos": cos, "cache_position": positions})


RotaryTables = Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # layer index -> (cos, sin) [positions, head dim / 2]


def _rotary_tables(lm: LayeredModelView, hidden: torch.Tensor, total) -> RotaryTables | None:
    """The rotary embedding of positions 0 .. total-1 as an attention kernel that rotates queries and keys itself
    reads it (ONNX Runtime's GroupQueryAttention with do_rotary): per layer (Gemma 3's sliding layers have their own
    base), the first half of cos and sin, the rotate-half form transformers' rotary families use. None when the
    rotation does not cover the whole head (partial rotary), which that kernel does not compute."""
    base = lm.backbone
    positions = torch.arange(total, device=hidden.device)[None]
    rotations = [base.rotary_emb(hidden, positions)]
    if hasattr(base, "rotary_emb_local"):
        rotations.append(base.rotary_emb_local(hidden, positions))
    head_dim = getattr(lm.config, "head_dim", None) or lm.config.hidden_size // lm.config.num_attention_heads
    if any(cos.shape[-1] != head_dim for cos, _ in rotations):
        return None
    halves = [(cos[0, :, : head_dim // 2], sin[0, :, : head_dim // 2]) for cos, sin in rotations]

    def at(index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return halves[-1] if len(halves) > 1 and _attention_type(lm, index) == SLIDING else halves[0]

    return at


def _unrotated(q, k, cos, sin, *args, **kwargs):
    return q, k


@contextlib.contextmanager
def _deferred_rotary(lm: LayeredModelView) -> Iterator[None]:
    """While inside, the family's attention hands queries and keys on unrotated (the module that defines its
    attention has its `apply_rotary_pos_emb`, the transformers convention, return them as they are), and so does
    CALM propagation: the attention kernel rotates them with `_rotary_tables`. Raises DyninferError for a family
    whose attention rotates otherwise."""
    modules = {sys.modules[type(getattr(layer, "self_attn", layer)).__module__] for layer in lm.layers}
    if not all(hasattr(module, "apply_rotary_pos_emb") for module in modules):
        raise DyninferError(f"the {lm.family} attention does not rotate through apply_rotary_pos_emb")
    saved = {module: module.apply_rotary_pos_emb for module in modules}
    for module in modules:
        module.apply_rotary_pos_emb = _unrotated
    lm.rotary_deferred = True
    try:
        yield
    finally:
        lm.rotary_deferred = False
        for module, function in saved.items():
            module.apply_rotary_pos_emb = function


def _plain_kv(lm: LayeredModelView, attn: nn.Module) -> bool:
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


def _token_embed_at(lm: LayeredModelView, input_ids: torch.Tensor, start: int) -> torch.Tensor:
    return lm.scaled_embedding(getattr(lm.backbone, lm.adapter.embed)(input_ids))


def _gpt2_embed_at(lm: LayeredModelView, input_ids: torch.Tensor, start: int) -> torch.Tensor:
    base = lm.backbone
    positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)[None]
    return base.drop(base.wte(input_ids) + base.wpe(positions))


def _gpt2_kwargs_at(lm: LayeredModelView, layer: nn.Module, hidden, start: int, cache) -> dict[str, Any]:
    length = hidden.shape[1]
    return dict(
        past_key_values=cache,
        cache_position=torch.arange(start, start + length, device=hidden.device),
        attention_mask=_mask_for(lm, start, length, None, hidden.dtype, hidden.device),
        use_cache=True,
    )


def _gpt2_propagate(lm: LayeredModelView, index: int, hidden: torch.Tensor, start: int, cache) -> None:
    layer = lm.layers[index]
    attn = layer.attn
    _, key, value = attn.c_attn(layer.ln_1(hidden)).split(attn.split_size, dim=2)
    shape = (*hidden.shape[:-1], -1, attn.head_dim)
    positions = torch.arange(start, start + hidden.shape[1], device=hidden.device)
    cache.update(key.view(shape).transpose(1, 2), value.view(shape).transpose(1, 2), index, {"cache_position": positions})


def _mamba_kwargs_at(lm: LayeredModelView, layer: nn.Module, hidden, start: int, cache) -> dict[str, Any]:
    if hidden.shape[1] != 1 and start != 0:
        raise ValueError("Mamba layers take one token at a time after the prefill")
    if start == 0:  # transformers' Mamba signals a prefill by a cache_position of length conv_kernel
        position = torch.arange(0, lm.config.conv_kernel, device=hidden.device)
    else:
        position = torch.tensor([start], device=hidden.device)
    return dict(cache_params=cache, cache_position=position, attention_mask=None)


def _mamba_propagate(lm: LayeredModelView, index: int, hidden: torch.Tensor, start: int, cache) -> None:
    """A state-space layer has no K/V: its state advances by running the layer on the exit state."""
    layer = lm.layers[index]
    layer(hidden, **_mamba_kwargs_at(lm, layer, hidden, start, cache))


# Each layout's forward code, as the ArchAdapter fields it fills (core/adapters.py).
ROTARY_FORWARD = dict(
    prepare=_prepare_rotary,
    new_cache=_dynamic_cache,
    layer_kwargs_at=_rotary_kwargs_at,
    propagate=_rotary_propagate,
    embed_at=_token_embed_at,
    rotary_tables=_rotary_tables,
    deferred_rotary=_deferred_rotary,
)
GPT2_FORWARD = dict(
    prepare=_prepare_gpt2,
    new_cache=_dynamic_cache,
    layer_kwargs_at=_gpt2_kwargs_at,
    propagate=_gpt2_propagate,
    embed_at=_gpt2_embed_at,
)
MAMBA_FORWARD = dict(
    prepare=_prepare_mamba,
    new_cache=_mamba_cache,
    layer_kwargs_at=_mamba_kwargs_at,
    propagate=_mamba_propagate,
    embed_at=_token_embed_at,
)

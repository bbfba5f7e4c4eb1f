"""Attention with a preallocated KV buffer: one ONNX Runtime `GroupQueryAttention` node per layer.

The concatenated layout joins each layer's past and new K/V, so every decoding step copies the
whole cache into a new tensor, and the family's attention exports as some thirty small nodes a
layer (repeat of the KV heads, masks, two matmuls, softmax, transposes). In the buffered layout
the past of a layer is one buffer [batch, kv heads, capacity, head dim] that the step's
`GroupQueryAttention` (ONNX Runtime's contrib op, CPU and CUDA kernels) writes the new K/V into at
their positions and attends over in one kernel. The runtime binds each buffer as both the past
input and the present output, so ONNX Runtime updates it in place.

Route: the family's own layer code runs unchanged up to the attention call (projections, norms,
rotary). The layer is called with one more keyword, the cache: transformers passes a layer's
extra keywords down to the attention function (a context variable would not survive tracing
`torch.cond` branches). `BufferedCache.update` returns the new K/V only; the attention function
registered here (transformers' `AttentionInterface`) then calls the custom op
`dyninfer::group_query_attention` with the layer's buffers, and the exporter's translation table
turns that op into the contrib node. The op's torch implementation is the reference the export is checked against: causal
attention over the first `total_length` positions, optionally within a sliding window and with
logits softcapped, as the contrib op computes it.
"""

from __future__ import annotations

import torch

from dyninfer.core.adapter_forward import RotaryTables

CONTRIB_DOMAIN = "com.microsoft"
ATTENTION_NAME = "dyninfer_buffered"
CACHE_KWARG = "kv_buffers"  # how the cache reaches the attention function: a layer keyword passed down to it


@torch.library.custom_op("dyninfer::group_query_attention", mutates_args=())
def group_query_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    past_key: torch.Tensor,
    past_value: torch.Tensor,
    seqlens_k: torch.Tensor,
    total_length: torch.Tensor,
    num_heads: int,
    kv_num_heads: int,
    scale: float,
    softcap: float,
    window: int,
    cos_cache: torch.Tensor | None = None,
    sin_cache: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`query` [B, S, H*D], `key`/`value` [B, S, KV*D] for positions total-S .. total-1; `past_*` [B, KV, C, D]
    holding positions 0 .. total-S-1. Returns the attention output [B, S, H*D] and the buffers with the new
    positions written (C grows to `total` if it was smaller). `window` <= 0: no sliding window; `softcap` 0: none.
    With `cos_cache`/`sin_cache` [>= total, D/2] (the op's `do_rotary`), query and key are rotated first, position p
    by row p of the tables, the two halves of each head as a pair (rotate-half, not interleaved)."""
    batch, new, _ = query.shape
    total = int(total_length)
    head_dim = past_key.shape[-1]
    if cos_cache is not None and sin_cache is not None:
        rows = slice(total - new, total)
        query = _rotated(query, cos_cache[rows], sin_cache[rows], head_dim)
        key = _rotated(key, cos_cache[rows], sin_cache[rows], head_dim)
    present_key, present_value = (_written(past, x, total, kv_num_heads, head_dim) for past, x in ((past_key, key), (past_value, value)))
    q = query.view(batch, new, num_heads, head_dim).transpose(1, 2).float()
    group = num_heads // kv_num_heads
    keys = present_key[:, :, :total].float().repeat_interleave(group, dim=1)
    values = present_value[:, :, :total].float().repeat_interleave(group, dim=1)
    scores = q @ keys.transpose(-1, -2) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    positions = torch.arange(total - new, total, device=query.device)[:, None]
    seen = torch.arange(total, device=query.device)[None, :]
    allowed = seen <= positions
    if window > 0:
        allowed &= seen > positions - window
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ values
    return out.transpose(1, 2).reshape(batch, new, num_heads * head_dim).to(query.dtype), present_key, present_value


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[B, S, N*D] rotated per head: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), cos/sin [S, D/2]."""
    batch, length, width = x.shape
    heads = x.view(batch, length, width // head_dim, 2, head_dim // 2).float()
    c, s = cos.float()[None, :, None], sin.float()[None, :, None]
    first, second = heads[..., 0, :], heads[..., 1, :]
    out = torch.stack([first * c - second * s, second * c + first * s], dim=-2)
    return out.reshape(batch, length, width).to(x.dtype)


def _written(past: torch.Tensor, new: torch.Tensor, total: int, heads: int, head_dim: int) -> torch.Tensor:
    batch, length = new.shape[:2]
    capacity = max(past.shape[2], total)
    present = past.new_zeros(batch, heads, capacity, head_dim)
    present[:, :, : past.shape[2]] = past
    present[:, :, total - length : total] = new.view(batch, length, heads, head_dim).transpose(1, 2)
    return present


@group_query_attention.register_fake
def _(
    query,
    key,
    value,
    past_key,
    past_value,
    seqlens_k,
    total_length,
    num_heads,
    kv_num_heads,
    scale,
    softcap,
    window,
    cos_cache=None,
    sin_cache=None,
):
    # The exported step's buffers keep their capacity (the runtime sizes them for the whole generation).
    return query.new_empty(query.shape), past_key.new_empty(past_key.shape), past_value.new_empty(past_value.shape)


def translation_table() -> dict:
    """The custom op -> one `com.microsoft.GroupQueryAttention` node."""
    from onnxscript import values

    node = values.Op(values.Opset(CONTRIB_DOMAIN, 1), "GroupQueryAttention", _schema())

    def emit(
        query,
        key,
        value,
        past_key,
        past_value,
        seqlens_k,
        total_length,
        num_heads,
        kv_num_heads,
        scale,
        softcap,
        window,
        cos_cache=None,
        sin_cache=None,
    ):
        rotary = cos_cache is not None and sin_cache is not None
        return node(
            query,
            key,
            value,
            past_key,
            past_value,
            seqlens_k,
            total_length,
            *((cos_cache, sin_cache) if rotary else ()),
            do_rotary=int(rotary),
            rotary_interleaved=0,
            num_heads=num_heads,
            kv_num_heads=kv_num_heads,
            scale=scale,
            softcap=softcap,
            local_window_size=window if window > 0 else -1,  # the same count as transformers' (checked in the tests)
        )

    return {group_query_attention._opoverload: emit}


def _schema():
    from onnx.defs import OpSchema

    float_types = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    tensors = ("query", "key", "value", "past_key", "past_value")
    optional = OpSchema.FormalParameterOption.Optional
    attribute = OpSchema.Attribute
    return OpSchema(
        "GroupQueryAttention",
        CONTRIB_DOMAIN,
        1,
        inputs=[OpSchema.FormalParameter(name, "T") for name in tensors]
        + [OpSchema.FormalParameter("seqlens_k", "M"), OpSchema.FormalParameter("total_sequence_length", "M")]
        + [OpSchema.FormalParameter(name, "T", param_option=optional) for name in ("cos_cache", "sin_cache")],
        outputs=[OpSchema.FormalParameter(name, "T") for name in ("output", "present_key", "present_value")],
        type_constraints=[("T", float_types, "float tensors"), ("M", ["tensor(int32)"], "lengths")],
        attributes=[
            attribute("num_heads", OpSchema.AttrType.INT),
            attribute("kv_num_heads", OpSchema.AttrType.INT),
            attribute("scale", OpSchema.AttrType.FLOAT),
            attribute("softcap", OpSchema.AttrType.FLOAT),
            attribute("local_window_size", OpSchema.AttrType.INT),
            attribute("do_rotary", OpSchema.AttrType.INT),
            attribute("rotary_interleaved", OpSchema.AttrType.INT),
        ],
    )


class BufferedCache:
    """The KV cache of a buffered step: layer buffers in, the same buffers with this step written out.

    `update` (called by the family's attention before its attention function) hands the new K/V
    back unchanged and keeps them; `attend` (the registered attention function) or `write` (CALM
    propagation, which attends to nothing) turns them into the layer's present buffers.
    """

    def __init__(self, past: dict[int, tuple[torch.Tensor, torch.Tensor]], start, new: int, rotary: RotaryTables | None = None):
        self.past = past
        self.start = start  # positions already in the buffers (a symbolic int when tracing)
        self.new = new
        self.rotary = rotary  # the layers' rotary tables when the attention op rotates (the family's code did not)
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.present: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def for_layers(cls, first: int, past, start, new: int, rotary: RotaryTables | None = None) -> BufferedCache:
        """The cache of layers first, first + 1, ... from their flat (key, value, key, value, ...) buffers."""
        return cls(layer_pairs(first, past), start, new, rotary)

    @property
    def layer_kwargs(self) -> dict:
        """What a layer (or an attention module) is called with besides its usual inputs, so the buffered
        attention function finds this cache: transformers hands a layer's extra keywords down to it."""
        return {CACHE_KWARG: self}

    def update(self, key, value, layer_idx, cache_kwargs=None):
        self.pending[layer_idx] = (key, value)
        return key, value

    def get_seq_length(self, layer_idx: int = 0):
        return self.start

    def _lengths(self, batch: int):
        total = self.start + self.new
        return torch.full((batch,), total - 1, dtype=torch.int32), torch.full((), total, dtype=torch.int32)

    def attend(self, layer_idx: int, query, num_heads: int, scale: float, softcap: float | None, window: int | None):
        """Attention of `query` [B, H, S, D] over the layer's buffer with its pending K/V written; [B, S, H*D]."""
        key, value = self.pending.pop(layer_idx)
        past_key, past_value = self.past[layer_idx]
        batch, _, new, head_dim = query.shape
        seqlens, total = self._lengths(batch)
        out, present_key, present_value = group_query_attention(
            _packed(query),
            _packed(key.to(past_key.dtype)),
            _packed(value.to(past_value.dtype)),
            past_key,
            past_value,
            seqlens,
            total,
            num_heads,
            past_key.shape[1],
            float(scale),
            float(softcap or 0.0),
            int(window or 0),
            *(self.rotary(layer_idx) if self.rotary is not None else ()),
        )
        self.present[layer_idx] = (present_key, present_value)
        return out

    def write(self, layer_idx: int) -> None:
        """Write the layer's pending K/V without attending (a query of the KV heads' width, output unused)."""
        key, _ = self.pending[layer_idx]
        self.attend(layer_idx, torch.zeros_like(key), key.shape[1], 1.0, None, None)


def layer_pairs(first: int, past) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Layer index -> (key, value), from the flat (key, value, key, value, ...) past of layers first, first + 1, ..."""
    return {first + i: (past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)}


def _packed(x: torch.Tensor) -> torch.Tensor:
    """[B, N, S, D] -> [B, S, N*D], the contrib op's layout."""
    batch, heads, length, dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * dim)


def buffered_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None, softcap=None, **kwargs):
    """transformers' attention-function signature; `key`/`value` are the layer's new K/V (BufferedCache.update)."""
    cache = kwargs.get(CACHE_KWARG)
    if cache is None:
        raise RuntimeError(f"buffered attention needs the layer's BufferedCache as the keyword {CACHE_KWARG}")
    unsupported = sorted(k for k in ("s_aux", "sinks", "head_mask") if kwargs.get(k) is not None)
    if unsupported or getattr(module, "is_causal", True) is False:
        raise UnsupportedAttention(f"attention with {', '.join(unsupported) or 'no causal mask'}")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = cache.attend(module.layer_idx, query, query.shape[1], scale, softcap, sliding_window)
    return out.view(*out.shape[:2], query.shape[1], query.shape[-1]), None


class UnsupportedAttention(RuntimeError):
    """The family's attention has a feature the contrib op does not compute."""


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, buffered_attention)

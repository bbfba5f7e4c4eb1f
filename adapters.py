"""The one place that knows model architectures.

For each supported family an `ArchAdapter` says where the embedding, the decoder layers,
the final norm and the LM head live, how to prepare one forward pass (positions, masks,
rotary embeddings, cache positions) and how to call a single layer. `LayeredModel` wraps a
Hugging Face causal LM with its adapter so that the rest of dyninfer can run the model
layer by layer (to read every layer's hidden state, or to stop early) without knowing the
family. The code mirrors the forward loops of transformers 4.57 (pinned in pyproject).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dyninfer.errors import DyninferError


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
    recurrent: bool = False  # state-space model: a fixed-size state instead of a KV cache


def _cache_position(past_seen: int, length: int, device) -> torch.Tensor:
    return torch.arange(past_seen, past_seen + length, device=device)


def _dynamic_cache(model: nn.Module, batch_size: int):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _prepare_rotary(lm: "LayeredModel", input_ids, cache, attention_mask) -> ForwardPass:
    """Llama, Qwen2, Mistral and Gemma 3: rotary positions, per-layer-type masks."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    base = lm.backbone
    config = base.config
    embeds = base.embed_tokens(input_ids)  # Gemma 3's embedding scales by sqrt(d) itself
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
    masks: dict[str, Any] = {"full_attention": create_causal_mask(**mask_kwargs)}
    layer_types = set(getattr(config, "layer_types", None) or [])
    mistral_sliding = config.model_type == "mistral" and getattr(config, "sliding_window", None)
    if "sliding_attention" in layer_types or mistral_sliding:
        masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)

    if config.model_type == "gemma3_text":
        rope = {
            "position_embeddings_global": base.rotary_emb(embeds, position_ids),
            "position_embeddings_local": base.rotary_emb_local(embeds, position_ids),
        }
    else:
        rope = {"position_embeddings": base.rotary_emb(embeds, position_ids)}

    def layer_kwargs(i: int, layer: nn.Module) -> dict[str, Any]:
        if mistral_sliding:
            mask = masks["sliding_attention"]
        else:
            mask = masks[getattr(layer, "attention_type", "full_attention")]
        return dict(
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=cache is not None,
            cache_position=cache_position,
            **rope,
        )

    return ForwardPass(embeds, layer_kwargs)


def _prepare_gpt2(lm: "LayeredModel", input_ids, cache, attention_mask) -> ForwardPass:
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


def _prepare_mamba(lm: "LayeredModel", input_ids, cache, attention_mask) -> ForwardPass:
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


_ROTARY = dict(backbone="model", embed="embed_tokens", layers="layers", norm="norm")

ADAPTERS: tuple[ArchAdapter, ...] = (
    ArchAdapter("llama", ("llama",), prepare=_prepare_rotary, new_cache=_dynamic_cache, **_ROTARY),
    ArchAdapter("qwen2", ("qwen2",), prepare=_prepare_rotary, new_cache=_dynamic_cache, **_ROTARY),
    ArchAdapter("mistral", ("mistral",), prepare=_prepare_rotary, new_cache=_dynamic_cache, **_ROTARY),
    ArchAdapter("gemma3", ("gemma3_text",), prepare=_prepare_rotary, new_cache=_dynamic_cache, **_ROTARY),
    ArchAdapter(
        "gpt2", ("gpt2",), backbone="transformer", embed="wte", layers="h", norm="ln_f",
        prepare=_prepare_gpt2, new_cache=_dynamic_cache,
    ),
    ArchAdapter(
        "mamba", ("mamba",), backbone="backbone", embed="embeddings", layers="layers", norm="norm_f",
        prepare=_prepare_mamba, new_cache=_mamba_cache, recurrent=True,
    ),
)


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def adapter_for(config) -> ArchAdapter:
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    hint = ""
    if model_type == "gemma3":
        hint = " (for Gemma 3 use the text-only checkpoint / Gemma3ForCausalLM)"
    raise DyninferError(
        f"unsupported architecture '{model_type}'{hint}; dyninfer supports: "
        + ", ".join(supported_model_types())
    )


class LayeredModel:
    """A causal LM that dyninfer can run one decoder layer at a time.

    Hidden-state indexing used everywhere: index 0 is the embedding output, index i
    (1..num_layers) is the output of decoder layer i (before the final norm).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.adapter = adapter_for(model.config)
        self.config = model.config
        self.backbone: nn.Module = getattr(model, self.adapter.backbone)
        self.layers: nn.ModuleList = getattr(self.backbone, self.adapter.layers)
        self.final_norm: nn.Module = getattr(self.backbone, self.adapter.norm)
        self.lm_head: nn.Module = model.get_output_embeddings()
        self.softcap = getattr(self.config, "final_logit_softcapping", None)

    @property
    def family(self) -> str:
        return self.adapter.family

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return self.lm_head.weight.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.lm_head.weight.shape[0]

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def new_cache(self, batch_size: int = 1):
        """A fresh KV cache (transformers' Cache classes) or Mamba state cache."""
        return self.adapter.new_cache(self.model, batch_size)

    def begin(self, input_ids: torch.Tensor, cache=None, attention_mask=None) -> ForwardPass:
        """Embed `input_ids` and prepare what every layer of this forward needs."""
        return self.adapter.prepare(self, input_ids, cache, attention_mask)

    def run_layer(self, fwd: ForwardPass, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Run decoder layer `index` (0-based module index) on `hidden`."""
        layer = self.layers[index]
        out = layer(hidden, *fwd.layer_args(index), **fwd.layer_kwargs(index, layer))
        return out[0] if isinstance(out, tuple) else out

    def head(self, normed: torch.Tensor) -> torch.Tensor:
        """LM head on an already normalised hidden state (with Gemma's final softcap)."""
        logits = self.lm_head(normed)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def head_rows(self, normed: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Logits of only `token_ids` (a vocabulary subset): cheap partial head."""
        logits = normed @ self.lm_head.weight[token_ids].T
        if getattr(self.lm_head, "bias", None) is not None:
            logits = logits + self.lm_head.bias[token_ids]
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def logits_from(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + head: the logit lens on any layer's residual stream."""
        return self.head(self.final_norm(hidden))

    def hidden_states(
        self, input_ids: torch.Tensor, cache=None, attention_mask=None
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (index, hidden) for the embedding output (0) and each decoder layer."""
        fwd = self.begin(input_ids, cache, attention_mask)
        hidden = fwd.hidden
        yield 0, hidden
        for i in range(self.num_layers):
            hidden = self.run_layer(fwd, i, hidden)
            yield i + 1, hidden

    def forward_logits(self, input_ids: torch.Tensor, cache=None, attention_mask=None) -> torch.Tensor:
        """Full-depth logits computed layer by layer (equals the model's own forward)."""
        hidden = None
        for _, hidden in self.hidden_states(input_ids, cache, attention_mask):
            pass
        return self.logits_from(hidden)

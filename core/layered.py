"""`LayeredModel`: a Hugging Face causal LM that dyninfer runs one decoder layer at a time.

The rest of dyninfer reads every layer's hidden state, stops early or swaps a layer's MLP through
it, without knowing the family: what differs between families comes from the model's
`ArchAdapter` (core/adapters.py, its forward code in core/adapter_forward.py). The code mirrors
the forward loops of transformers 4.57.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from dyninfer.core.adapter_forward import ForwardPass, extra_layer_kwargs, full_dynamic_cache
from dyninfer.core.adapters import (
    ATTENTION_INPUT_NORMS,
    EMBED_SCALES,
    LOGIT_SCALES,
    MlpWeights,
    adapter_for,
    first_child,
    mlp_weights,
    residual_out_path,
)
from dyninfer.core.errors import DyninferError


class LayeredModel:
    """A causal LM that dyninfer can run one decoder layer at a time.

    Hidden-state indexing used everywhere: index 0 is the embedding output, index i
    (1..num_layers) is the output of decoder layer i (before the final norm).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.adapter = adapter_for(model)
        self.config = model.config
        self.backbone: nn.Module = getattr(model, self.adapter.backbone)
        self.layers: nn.ModuleList = getattr(self.backbone, self.adapter.layers)
        if len(self.layers) == 0:
            raise DyninferError(
                f"the {model.config.model_type} model has no decoder layers (num_hidden_layers 0); "
                "there is nothing to exit from: pass a model with layers"
            )
        self.final_norm: nn.Module = getattr(self.backbone, self.adapter.norm)
        self.lm_head: nn.Module = model.get_output_embeddings()
        self.softcap = getattr(self.config, "final_logit_softcapping", None)
        model_type = getattr(self.config, "model_type", None)
        self.embed_scale = EMBED_SCALES[model_type](self.config) if model_type in EMBED_SCALES else None
        self.logit_scale = LOGIT_SCALES[model_type](self.config) if model_type in LOGIT_SCALES else None
        self._layer_index = {id(layer): i for i, layer in enumerate(self.layers)}
        self.rope_memo = None  # (positions key, global rotary, local rotary) of the last step
        # While a step is traced for export: rotary embeddings and masks computed once per step
        # (in its main graph, so every branch shares them) and no data-dependent shortcuts.
        self.step_memo: dict | None = None
        self.rotary_deferred = False  # inside `deferred_rotary`

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
    def context_length(self) -> int | None:
        """The positions the model has (learned position embeddings) or was trained for (rotary); None if unsaid."""
        for name in ("max_position_embeddings", "n_positions", "n_ctx"):
            value = getattr(self.config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    @property
    def device(self) -> torch.device:
        """Where inputs go: the embedding's device (its execution device when accelerate dispatched the
        model over several devices or offloaded it)."""
        embed = self.model.get_input_embeddings()
        hook = getattr(embed, "_hf_hook", None)
        if getattr(hook, "execution_device", None) is not None:
            return torch.device(hook.execution_device)
        return embed.weight.device

    @property
    def offloaded(self) -> bool:
        """Some weights live off-device (accelerate's CPU or disk offload): read only through forward hooks."""
        return any(p.device.type == "meta" for p in self.model.parameters())

    def require_weights(self, feature: str) -> None:
        """Refuse `feature`, which reads or changes weights directly, on an offloaded model."""
        if self.offloaded:
            raise DyninferError(
                f"{feature} reads and changes the weights directly, and this model's device map "
                "offloads some of them; give `max_memory` room for every weight (or load it without "
                "`device_map`)"
            )

    def new_cache(self, batch_size: int = 1):
        """A fresh KV cache (transformers' Cache classes) or Mamba state cache."""
        return self.adapter.new_cache(self.model, batch_size)

    def new_decoding_cache(self, batch_size: int = 1):
        """A cache for dynamic decoding: every layer keeps all positions (croppable)."""
        if self.adapter.recurrent:
            return self.adapter.new_cache(self.model, batch_size)
        return full_dynamic_cache(self.model, batch_size)

    def embed_at(self, input_ids: torch.Tensor, start: int) -> torch.Tensor:
        """Embedding output of tokens placed at positions start, start + 1, ..."""
        return self.adapter.embed_at(self, input_ids, start)

    def layer_at(self, index: int, hidden: torch.Tensor, start: int, cache) -> torch.Tensor:
        """Run layer `index` on tokens at positions start.. whose cache holds exactly [0, start)."""
        layer = self.layers[index]
        if self.adapter.recurrent and hidden.shape[1] > 1 and start > 0:
            outs = [self.layer_at(index, hidden[:, t : t + 1], start + t, cache) for t in range(hidden.shape[1])]
            return torch.cat(outs, dim=1)
        out = layer(hidden, **self.adapter.layer_kwargs_at(self, layer, hidden, start, cache), **extra_layer_kwargs(cache))
        return out[0] if isinstance(out, tuple) else out

    @contextlib.contextmanager
    def traced_step(self, hidden: torch.Tensor, start) -> Iterator[None]:
        """Trace one decoding step: positional inputs are built once, up front, for all layers."""
        self.step_memo = {}
        try:
            for layer in self.layers:
                self.adapter.layer_kwargs_at(self, layer, hidden, start, None)
            yield
        finally:
            self.step_memo = None

    def rotary_tables(self, hidden: torch.Tensor, total):
        """Per layer index, the (cos, sin) [total, head dim / 2] of positions 0 .. total-1, for an attention kernel
        that rotates queries and keys itself; None when the family's rotation is not one it computes."""
        return self.adapter.rotary_tables(self, hidden, total) if self.adapter.rotary_tables else None

    def deferred_rotary(self):
        """A context in which layers leave queries and keys unrotated (see `rotary_tables`)."""
        if self.adapter.deferred_rotary is None:
            raise DyninferError(f"the {self.family} family has no rotary embedding to defer")
        return self.adapter.deferred_rotary(self)

    def layer_index(self, layer: nn.Module) -> int:
        return self._layer_index[id(layer)]

    def scaled_embedding(self, embeds: torch.Tensor) -> torch.Tensor:
        """The token embedding as the model's forward scales it (Gemma: by sqrt(d), in the hidden dtype)."""
        if self.embed_scale is None:
            return embeds
        return embeds * torch.tensor(self.embed_scale, dtype=embeds.dtype, device=embeds.device)

    def attention_input(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """What a decoder layer's attention reads: its pre-norm of the residual stream (the stream itself in
        post-norm layers)."""
        norm = first_child(layer, ATTENTION_INPUT_NORMS)
        return getattr(layer, norm)(hidden) if norm else hidden

    def _mlp_path(self) -> str:
        if self.adapter.recurrent:
            raise DyninferError(f"{self.family} layers have no MLP block to prune; pick an attention model")
        return dict(self.adapter.blocks)["mlp"]

    def mlp(self, index: int) -> nn.Module:
        """Decoder layer `index`'s MLP block (`mlp`, or Mixtral's `block_sparse_moe`)."""
        return self.layers[index].get_submodule(self._mlp_path())

    def set_mlp(self, index: int, module: nn.Module) -> None:
        setattr(self.layers[index], self._mlp_path(), module)

    def mlp_weights(self, index: int) -> MlpWeights:
        return mlp_weights(self.config, self.mlp(index))

    def require_prunable(self) -> None:
        """Refuse MLP pruning unless every layer has a dense MLP it can read (some families mix in experts)."""
        for index in range(self.num_layers):
            self.mlp_weights(index)

    def _residual_out_path(self, index: int) -> str:
        return self.adapter.residual_out or residual_out_path(self.layers[index])

    def residual_out(self, index: int) -> nn.Module:
        """The module whose output decoder layer `index` adds to the residual stream last."""
        return self.layers[index].get_submodule(self._residual_out_path(index))

    def set_residual_out(self, index: int, module: nn.Module) -> None:
        parent, _, name = self._residual_out_path(index).rpartition(".")
        setattr(self.layers[index].get_submodule(parent) if parent else self.layers[index], name, module)

    def blocks(self, index: int) -> list[tuple[str, nn.Module]]:
        """Decoder layer `index`'s profiled blocks: (piece name, module), e.g. attention and MLP."""
        return [(piece, self.layers[index].get_submodule(path)) for piece, path in self.adapter.blocks]

    def cache_bytes(self, cache) -> list[int]:
        """Bytes each layer holds in `cache` (K/V tensors, or Mamba's conv and SSM states)."""
        if hasattr(cache, "layers"):  # transformers' Cache: one object per layer
            return [sum(t.nbytes for t in vars(layer).values() if isinstance(t, torch.Tensor)) for layer in cache.layers]
        return [cache.conv_states[i].nbytes + cache.ssm_states[i].nbytes for i in range(self.num_layers)]

    def cache_rows(self, cache, rows: torch.Tensor, length: int):
        """A copy of a decoding cache holding only `rows`, cut back to its first `length` positions."""
        self._require_croppable(cache)
        other, rows = full_dynamic_cache(self.model, rows.shape[0]), rows.to(self.device)
        for index, layer in enumerate(cache.layers):
            other.update(layer.keys[rows, :, :length].clone(), layer.values[rows, :, :length].clone(), index)
        return other

    def put_cache_rows(self, cache, rows: torch.Tensor, other) -> None:
        """Overwrite `rows` of a decoding cache with `other`'s (as many rows, the same length)."""
        self._require_croppable(cache)
        rows = rows.to(self.device)
        for mine, theirs in zip(cache.layers, other.layers):
            mine.keys[rows], mine.values[rows] = theirs.keys, theirs.values

    def _require_croppable(self, cache) -> None:
        if self.adapter.recurrent or not hasattr(cache, "layers"):
            raise DyninferError("this model's decoding state cannot be cut back to an earlier position (a recurrent state)")

    def propagate(self, index: int, hidden: torch.Tensor, start: int, cache) -> None:
        """Fill layer `index`'s cache entry at `start` from an exit hidden state (CALM)."""
        self.adapter.propagate(self, index, hidden, start, cache)

    def begin(self, input_ids: torch.Tensor, cache=None, attention_mask=None) -> ForwardPass:
        """Embed `input_ids` and prepare what every layer of this forward needs."""
        return self.adapter.prepare(self, input_ids, cache, attention_mask)

    def run_layer(self, fwd: ForwardPass, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Run decoder layer `index` (0-based module index) on `hidden`."""
        layer = self.layers[index]
        out = layer(hidden, *fwd.layer_args(index), **fwd.layer_kwargs(index, layer))
        return out[0] if isinstance(out, tuple) else out

    def _softcapped(self, logits: torch.Tensor) -> torch.Tensor:
        """The family's final logit scale (Granite, Cohere) and softcap (Gemma 2/3); identity for the others."""
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def head(self, normed: torch.Tensor) -> torch.Tensor:
        """LM head on an already normalised hidden state (with Gemma's final softcap)."""
        return self._softcapped(self.lm_head(normed))

    def head_rows(self, normed: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Logits of only `token_ids` (a vocabulary subset): cheap partial head."""
        return self.head_on(token_ids)(normed)

    def head_on(self, token_ids: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """`head_rows` for a fixed vocabulary subset, its weight rows gathered once (a speculative draft head
        scores the same candidates token after token)."""
        if self.lm_head.weight.device.type == "meta":
            return lambda normed: self.head(normed)[..., token_ids]
        rows = self.lm_head.weight[token_ids]
        bias = self.lm_head.bias[token_ids] if getattr(self.lm_head, "bias", None) is not None else None

        def head(normed: torch.Tensor) -> torch.Tensor:
            logits = normed @ rows.T
            return self._softcapped(logits if bias is None else logits + bias)

        return head

    def head_rows_per_row(self, normed: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Logits of a different vocabulary subset per row: normed [B, d], token_ids [B, K]."""
        if self.lm_head.weight.device.type == "meta":
            return torch.gather(self.head(normed), -1, token_ids)
        logits = torch.einsum("bd,bkd->bk", normed, self.lm_head.weight[token_ids])
        if getattr(self.lm_head, "bias", None) is not None:
            logits = logits + self.lm_head.bias[token_ids]
        return self._softcapped(logits)

    def logits_from(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + head: the logit lens on any layer's residual stream."""
        return self.head(self.final_norm(hidden))

    def hidden_states(self, input_ids: torch.Tensor, cache=None, attention_mask=None) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (index, hidden) for the embedding output (0) and each decoder layer."""
        fwd = self.begin(input_ids, cache, attention_mask)
        hidden = fwd.hidden
        yield 0, hidden
        for i in range(self.num_layers):
            hidden = self.run_layer(fwd, i, hidden)
            yield i + 1, hidden

    @torch.no_grad()
    def check_against_forward(self, tokens: int = 8) -> None:
        """Refuse a model whose layer-by-layer run differs from its own forward (a family recognised by
        structure whose forward does something the standard layout does not: a scale, another mask)."""
        ids = torch.arange(tokens, device=self.device)[None] % self.vocab_size
        reference = self.model(ids, use_cache=False).logits.float()
        ours = self.forward_logits(ids).float()
        scale = reference.abs().max().clamp_min(1e-6)
        tolerance = 1e-3 if self.lm_head.weight.dtype == torch.float32 else 5e-2
        if not torch.isfinite(ours).all() or float((ours - reference).abs().max() / scale) > tolerance:
            raise DyninferError(
                f"{self.config.model_type} has the standard decoder layout, but running it layer by "
                "layer does not reproduce its own forward (its forward adds something the layout "
                "does not say); it is not supported yet: `dyninfer models` lists the tested families"
            )

    def forward_logits(self, input_ids: torch.Tensor, cache=None, attention_mask=None) -> torch.Tensor:
        """Full-depth logits computed layer by layer (equals the model's own forward)."""
        hidden = None
        for _, hidden in self.hidden_states(input_ids, cache, attention_mask):  # noqa: B007 - keep the last
            pass
        return self.logits_from(hidden)

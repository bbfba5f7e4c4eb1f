"""Tiny randomly initialised models of every decoder family transformers 4.57 ships in the standard rotary
layout (model.{embed_tokens, layers, norm, rotary_emb} + lm_head), built from each family's own config class.

The shapes are the smallest the families accept; sliding windows are shorter than the test sequences so the
sliding-window masks matter, and mixture-of-experts blocks have a few small experts.
"""

from __future__ import annotations

import inspect

import torch

from dyninfer.core.families import STANDARD_LAYOUT_TESTED

VOCAB = 128
# model_type -> what its tiny config needs beyond the common shape: every standard-layout type that
# `dyninfer models` lists as tested (core/families.py), so the table and these tests cannot drift apart.
_SHAPES: dict[str, dict] = {"deepseek_v2": {"num_key_value_heads": 4}, "deepseek_v3": {"num_key_value_heads": 4}}
FAMILIES: dict[str, dict] = {t: _SHAPES.get(t, {}) for t in STANDARD_LAYOUT_TESTED}
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
    # mixture of experts: a few small experts
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    shared_expert_intermediate_size=16,
    n_shared_experts=1,
    first_k_dense_replace=0,
    n_group=1,
    topk_group=1,
    moe_topk=2,
    moe_num_experts=4,
    moe_k=2,
    # latent attention (DeepSeek): small ranks
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
)
SLIDING_WINDOW = 8


def family_config(model_type: str, layers: int = 3, head_dim: int = 8):
    """`head_dim` 16 or more: ONNX Runtime's attention rotates such heads itself (the export's rotary fusion)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    accepted = inspect.signature(cls.__init__).parameters
    shape = {"num_hidden_layers": layers, "head_dim": head_dim, "hidden_size": 4 * head_dim}
    kw = {k: v for k, v in (COMMON | shape | FAMILIES[model_type]).items() if k in accepted}
    config = cls(**kw)
    if getattr(config, "sliding_window", None):
        config.sliding_window = SLIDING_WINDOW
    if getattr(config, "layer_types", None) and config.sliding_window:  # alternate sliding and full layers
        config.layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    return config


def family_model(model_type: str, seed: int = 0, layers: int = 3, head_dim: int = 8):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(model_type, layers, head_dim), attn_implementation="eager")
    with torch.no_grad():  # random init leaves some norms at zero (Gemma's 1 + w): give every weight some signal
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.normal_(1.0 if p.abs().sum() > 0 else 0.0, 0.1)
    # No end-of-sequence token: greedy references run their full length (with one, `min_new_tokens` would
    # mask it and change the argmax).
    model.generation_config.eos_token_id = None
    return model.eval()

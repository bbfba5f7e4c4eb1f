"""Tiny randomly initialised models, one per supported architecture, for unit tests."""

from __future__ import annotations

import torch

VOCAB = 128
ARCHS = ("llama", "qwen2", "mistral", "gemma3", "gpt2", "mamba")


def tiny_config(arch: str, vocab_size: int = VOCAB, layers: int = 3, head_dim: int = 8):
    """`head_dim` 16 or more: ONNX Runtime's attention rotates such heads itself (the export's rotary fusion)."""
    import transformers as tf

    common = dict(
        vocab_size=vocab_size,
        hidden_size=4 * head_dim,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    if arch == "llama":
        return tf.LlamaConfig(**common)
    if arch == "qwen2":
        return tf.Qwen2Config(**common)
    if arch == "mistral":
        return tf.MistralConfig(**common, sliding_window=8)  # exercises the sliding-window mask
    if arch == "gemma3":
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
        return tf.Gemma3TextConfig(**common, head_dim=head_dim, sliding_window=8, layer_types=types, final_logit_softcapping=30.0)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=vocab_size, n_embd=4 * head_dim, n_layer=layers, n_head=4, n_positions=512)
    if arch == "mamba":
        return tf.MambaConfig(
            vocab_size=vocab_size, hidden_size=4 * head_dim, state_size=8, num_hidden_layers=layers, expand=2, conv_kernel=4
        )
    raise ValueError(arch)


def tiny_model(arch: str, seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **kw), attn_implementation="eager")
    return model.eval()


def mixed_saturation_policy(lm, prompt, kv_mode: str, steps: int, points=(1, 2), min_deep: int = 3):
    """A saturation policy under which some steps exit early and at least `min_deep` (and at most
    steps - min_deep - 1) of the steps after the first run the full depth, and its run.

    More steps run deep as the threshold rises, so bisect on it.
    """
    from dyninfer.core.lenses import LogitLens
    from dyninfer.core.policies import ExitPolicy
    from dyninfer.runtime.dynamic import DynamicModel

    low, high = -1.0, 1.0 + 1e-6
    for _ in range(30):
        threshold = (low + high) / 2
        policy = ExitPolicy("logit", "saturation", list(points), threshold, 0, kv_mode)
        run = DynamicModel(lm, policy, LogitLens(lm)).generate(prompt, steps)
        deep = sum(e == lm.num_layers for e in run.exit_layers[1:])
        if min_deep <= deep <= steps - min_deep - 1:
            return policy, run
        low, high = (threshold, high) if deep < min_deep else (low, threshold)
    raise AssertionError(f"no saturation threshold gives mixed exits for {lm.family}")

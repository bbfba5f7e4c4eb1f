"""A randomly initialised model of a real checkpoint's shape, saved locally, to measure dyninfer at scale.

    python benchmarks/big_model.py --out /tmp/llama-1b
    dyninfer probe /tmp/llama-1b --tokens 256 --seq-len 128 --dtype float32 --json
    dyninfer probe /tmp/llama-1b --tokens 256 --seq-len 128 --dtype bfloat16 --json
    python benchmarks/big_model.py --shape gemma3-270m --dtype float32 --out /tmp/gemma3-270m
    dyninfer audit /tmp/gemma3-270m --out /tmp/audit-gemma    # the larger-vocabulary audit (docs/audit.md)

`--shape gemma3-270m` is Gemma 3 270M's shape instead: 18 layers, hidden 640, intermediate 2048, 4 heads,
1 KV head of 256, sliding-window layers, a tied 262,144-token vocabulary (168M of its 268M parameters).

The shape follows Llama 3.2 1B's (16 layers, hidden 2048, intermediate 8192, 32 heads, 8 KV heads,
vocabulary 128,256, untied head), so the full-vocabulary tensors are 2.6 times the bundled model's
per token. The tokenizer is the bundled model's (its ids fit in the bigger vocabulary); the
weights are random, so the numbers measured are memory and speed, not exit accuracy.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from provenance import provenance_line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=128_256)
    parser.add_argument("--dtype", default="bfloat16", help="the checkpoint's own dtype (what --dtype auto takes on CUDA)")
    parser.add_argument("--shape", choices=("llama", "gemma3-270m"), default="llama", help="llama: the options above; gemma3-270m: fixed")
    args = parser.parse_args()
    print(provenance_line(), flush=True)

    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

    from dyninfer.core.models import load_model

    gemma = Gemma3TextConfig(
        vocab_size=262_144,
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=18,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        sliding_window=512,
        max_position_embeddings=32_768,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    config = (
        gemma
        if args.shape == "gemma3-270m"
        else LlamaConfig(
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            intermediate_size=args.intermediate,
            num_hidden_layers=args.layers,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=8192,
            tie_word_embeddings=False,
            rope_theta=500_000.0,
            bos_token_id=1,
            eos_token_id=2,
        )
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
    out = Path(args.out)
    model.save_pretrained(out, safe_serialization=True)
    load_model("default").tokenizer.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}: {params / 1e9:.2f}B parameters in {args.dtype}")


if __name__ == "__main__":
    main()

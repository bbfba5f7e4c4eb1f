"""Packages side by side through dyninfer's own runtime: the KV layouts (buffers written in place against the
concatenated cache), or any other packages of one model.

Usage: python benchmarks/kv_layouts.py PACKAGE [PACKAGE ...] [--prompts 4] [--new-tokens 64] [--rounds 3] [--out F.json]

Each package decodes the same held-out pydocs prompts of 64 tokens greedily with exits disabled (the layouts
differ in the cache, not in the exits), interleaved prompt by prompt and round by round, after one warm-up
generation each. Reported per package: its KV layout, tokens/s and its ratio to the first package, and the
share of its greedy tokens equal to the first package's at the same position.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from provenance import provenance, provenance_line
from transformers import AutoTokenizer

from dyninfer.core.consistency import token_share
from dyninfer.core.data import load_windows
from dyninfer.runtime.onnx_decoder import OnnxDecoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("packages", type=Path, nargs="+")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    names = [str(p) for p in args.packages]
    if len(set(names)) != len(names):  # rows are keyed by package: a repeat would merge two rows' timings
        parser.error("give each package once")
    print(provenance_line(), flush=True)
    models = {name: OnnxDecoder(path, provider="cpu") for name, path in zip(names, args.packages)}
    tokenizer = AutoTokenizer.from_pretrained(str(models[names[0]].path))
    prompts = load_windows("builtin:pydocs", tokenizer, seq_len=64, seed=1).heldout[: args.prompts].numpy()
    for model in models.values():  # warm-up
        model.generate(prompts[:1], 8, mode="full")
    seconds = dict.fromkeys(names, 0.0)
    outputs: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for prompt in prompts:
            for name, model in models.items():
                started = time.perf_counter()
                outputs[name].append(model.generate(prompt[None], args.new_tokens, mode="full").tokens[0])
                seconds[name] += time.perf_counter() - started
    reference = np.stack(outputs[names[0]])
    rows = {}
    for name, model in models.items():
        tokens = np.stack(outputs[name])
        speed = tokens.size / seconds[name]
        rows[name] = {
            "kv_layout": model.manifest.kv_layout,
            "weights": model.manifest.precision,
            "tokens_per_s": speed,
            "vs_first": speed / (reference.size / seconds[names[0]]),
            "tokens_equal_to_first": float(token_share(tokens, reference).mean()),
        }
        row = rows[name]
        print(
            f"{name:24s} {row['kv_layout']:7s} {row['weights']:5s} {speed:6.1f} tok/s  {row['vs_first']:.3f}x  "
            f"tokens equal to {names[0]}: {row['tokens_equal_to_first']:.1%}",
            flush=True,
        )
    if args.out:
        args.out.write_text(json.dumps({"provenance": provenance(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

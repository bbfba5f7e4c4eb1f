"""Which ONNX Runtime session options decode a package fastest here (how `create_session`'s defaults were chosen).

Usage: python benchmarks/onnx_session_options.py PACKAGE [--prompts 4] [--new-tokens 64] [--rounds 2] [--out F.json]

Every setting decodes the same held-out pydocs prompts with exits disabled, interleaved round by round with
optimum's ORTModelForCausalLM at the package's precision (its baseline/ folder) under ONNX Runtime's defaults, so
load changes hit all alike. Settings: the thread count (intra-op 1, 2 = the cores here, or ORT's default), the
graph optimization level (basic, extended, all), and whether idle worker threads spin. Prints tokens/s per
setting, its ratio to optimum and the share of tokens it decodes as the shipped default does (graph fusions change
float rounding, which int8 activations turn into other tokens); writes the numbers with the commit, versions and command line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from provenance import provenance, provenance_line
from transformers import AutoTokenizer

from dyninfer.core.data import load_windows
from dyninfer.exporters.baseline import load_optimum_baseline
from dyninfer.runtime.onnx_decoder import OnnxDecoder

LEVELS = {
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
SETTINGS = {  # name -> (intra-op threads or None for ORT's default, level, spinning)
    "all, default threads, spinning (the shipped default)": (None, "all", True),
    "all, 2 threads": (2, "all", True),
    "all, 1 thread": (1, "all", True),
    "all, no spinning": (None, "all", False),
    "extended": (None, "extended", True),
    "basic": (None, "basic", True),
}


def session(path: Path, threads: int | None, level: str, spinning: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", type=Path)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    print(provenance_line(), flush=True)
    runtime = OnnxDecoder(args.package, provider="cpu")
    tokenizer = AutoTokenizer.from_pretrained(str(args.package))
    windows = load_windows("builtin:pydocs", tokenizer, seq_len=64, seed=1)
    prompts = windows.heldout[: args.prompts]
    optimum = load_optimum_baseline(args.package, "CPUExecutionProvider")
    sessions = {name: session(args.package / runtime.manifest.model_file, *spec) for name, spec in SETTINGS.items()}
    speeds: dict[str, list[float]] = {name: [] for name in ["optimum (ORT defaults)", *SETTINGS]}
    reference = None
    agreement: dict[str, float] = {}  # fusions change rounding, and with int8 activations (int4 packages) tokens
    for _ in range(args.rounds):
        for name in speeds:
            started = time.perf_counter()
            tokens = []
            for prompt in prompts:
                if name.startswith("optimum"):
                    tokens.append(optimum.greedy(prompt[None], args.new_tokens).numpy())
                else:
                    runtime.session = sessions[name]
                    tokens.append(runtime.generate(prompt[None].numpy(), args.new_tokens, mode="full").tokens)
            speeds[name].append(args.prompts * args.new_tokens / (time.perf_counter() - started))
            if not name.startswith("optimum"):  # how many positions each setting decodes as the shipped default does
                reference = tokens if reference is None else reference
                agreement.setdefault(name, float(np.mean([np.mean(a == b) for a, b in zip(tokens, reference)])))
    base = np.mean(speeds["optimum (ORT defaults)"])
    rows = {
        name: {
            "tokens_per_s": values,
            "mean": float(np.mean(values)),
            "vs_optimum": float(np.mean(values) / base),
            "tokens_as_default": agreement.get(name),
        }
        for name, values in speeds.items()
    }
    for name, row in rows.items():
        same = "" if row["tokens_as_default"] is None else f"  tokens as the default: {row['tokens_as_default']:.1%}"
        print(f"{name:55s} " + " ".join(f"{v:.1f}" for v in row["tokens_per_s"]) + f" tok/s  {row['vs_optimum']:.3f}x{same}", flush=True)
    if args.out:
        record = {"provenance": provenance(), "package": str(args.package), "weights": runtime.manifest.weights, "rows": rows}
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()

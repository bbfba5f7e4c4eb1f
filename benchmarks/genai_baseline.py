"""dyninfer's packages against the plain export a CPU user ships (onnxruntime-genai's builder output), in one
interleaved run, with every row measured the same way.

Usage: python benchmarks/genai_baseline.py ARTIFACT [--package P ...] [--prompts 8] [--new-tokens 64]
                                           [--precisions int4,fp32] [--venv DIR] [--no-memory] [--out F.json]

onnxruntime-genai installs the plain onnxruntime wheel, which must not sit beside onnxruntime-gpu, and its builder
wants a newer transformers than optimum allows: it gets a virtualenv of its own (made once, --venv, default
the user cache's genai-venv), whose Python builds the model's exports (its builder's defaults, CPU, at each of
--precisions) and runs them in a worker process (profilers/genai_worker.py).

Rows, one prompt at a time each, batch 1, greedy (profilers/onnx_bench.compare_rows): transformers fp32 on the
original model (the reference), optimum's exports in the first package's baseline/ (if it has one), onnxruntime-genai
at each precision, and each --package with its exits (when it has a threshold) and with exits disabled. Reported:
decode tokens/s, prefill ms, tokens/s overall, peak RSS (each row alone in a process of its own), fidelity fed the
original model's continuations token by token (same top-1, mean and 99th-percentile KL, perplexity ratio: as
llama.cpp's `llama-perplexity --kl-divergence` reads a quantization), free-running consistency, and the packages'
host time outside ONNX Runtime. The prompts are bench's: held-out windows of the artifact's calibration data.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from provenance import provenance, provenance_line

from dyninfer.core.models import cache_dir
from dyninfer.jobs.bench import bench_prompts
from dyninfer.jobs.configs import BenchConfig
from dyninfer.profilers.bench import ORIGINAL_MODEL
from dyninfer.profilers.genai_row import build_genai, genai_folder, genai_row
from dyninfer.profilers.onnx_bench import compare_rows, optimum_rows, package_rows
from dyninfer.profilers.row_memory import row_peak_memory
from dyninfer.runtime.loader import load_dynamic
from dyninfer.runtime.onnx_decoder import OnnxDecoder

GENAI_VERSION = "0.18.0"
# what onnxruntime-genai's builder imports besides the runtime (torch's exact pin takes the CPU wheel on disk here)
BUILDER_NEEDS = [f"onnxruntime-genai=={GENAI_VERSION}", "torch==2.13.0", "transformers", "onnx", "onnx_ir", "sentencepiece"]


def genai_python(venv: Path) -> str:
    """The virtualenv's Python, made and filled first if it has no onnxruntime-genai."""
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import onnxruntime_genai"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return str(python)
    print(f"making {venv} with {' '.join(BUILDER_NEEDS)} (once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *BUILDER_NEEDS], check=True)
    return str(python)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--package", type=Path, action="append", default=[], help="a dyninfer package (repeat for several)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--precisions", default="int4,fp32", help="onnxruntime-genai exports to build and run")
    parser.add_argument("--venv", type=Path, default=None, help="onnxruntime-genai's virtualenv (default: the cache's genai-venv)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    print(provenance_line(), flush=True)
    python = genai_python(args.venv or cache_dir() / "genai-venv")
    freeze = subprocess.run([python, "-m", "pip", "freeze"], capture_output=True, text=True).stdout.split()

    dyn = load_dynamic(str(args.artifact), require_policy=False)
    config = BenchConfig(prompts=args.prompts, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, backend="onnx")
    _, prompts, new_tokens = bench_prompts(config, dyn)
    lm = dyn.loaded.layered
    rows, workers, builds = [], [], {}
    for precision in args.precisions.split(","):
        folder = genai_folder(dyn.loaded.content_hash, precision)
        print(f"onnxruntime-genai {precision}: building into {folder} (once)", flush=True)
        builds[precision] = build_genai(python, dyn.loaded.pretrained_path, folder, precision)
        row, worker = genai_row(python, folder, f"onnxruntime-genai {precision}", new_tokens, lm.num_layers)
        rows.append(row)
        workers.append(worker)
    runtimes = [OnnxDecoder(path, provider="cpu") for path in args.package]
    with_baseline = next((r for r in runtimes if r.manifest.baseline), None)
    if with_baseline is not None:
        rows = optimum_rows(with_baseline, new_tokens) + rows
    for runtime in runtimes:
        rows += package_rows(runtime, new_tokens, label=f"dyninfer {runtime.path.name}")
    if args.no_memory:
        for row in rows:
            row.memory = None
    original = dyn.loaded.pretrained_path
    probe = None if args.no_memory else (lambda prompt, new: row_peak_memory("transformers", original, prompt, new, "cpu", "full"))

    def progress(what, done, total):
        print(f"{what}: {done}/{total}", flush=True)

    try:
        results = compare_rows(lm, rows, prompts, new_tokens, original_memory=probe, progress=progress)
    finally:
        for worker in workers:
            worker.close()
    reference = {m.mode: m for m in results}.get("onnxruntime-genai int4")
    print(f"\n{prompts.shape[0]} prompts of {prompts.shape[1]} tokens, {new_tokens} new tokens, batch 1, greedy, CPU")
    header = (
        "row | decode tok/s | vs genai int4 | prefill ms | tok/s | peak RSS MiB | same top-1 | mean KL | p99 KL | ppl ratio"
        " | free-running | host"
    )
    print(header)
    table = []
    for m in results:
        fidelity, memory = m.fidelity or {}, m.memory or {}
        entry = {
            "row": m.mode,
            "decode_tokens_per_s": m.decode_tokens_per_s,
            "vs_genai_int4_decode": (m.decode_tokens_per_s / reference.decode_tokens_per_s) if reference else None,
            "prefill_ms": m.prefill_ms,
            "tokens_per_s": m.tokens_per_s,
            "peak_rss_mib": memory.get("peak_rss_mib"),
            **{k: fidelity.get(k) for k in ("same_top1", "mean_kl", "kl_p99", "perplexity_ratio")},
            "free_running_tokens_equal": m.consistency,
            "host_overhead": m.host_overhead,
            "mean_exit_layer": m.mean_exit_layer,
        }
        table.append(entry)
        print(" | ".join(_cell(entry[k]) for k in entry if k != "mean_exit_layer"), flush=True)
    if args.out:
        record = {
            "provenance": provenance(),
            "genai": {"venv_freeze": freeze, "builds": builds},
            "prompts": int(prompts.shape[0]),
            "prompt_tokens": int(prompts.shape[1]),
            "new_tokens": new_tokens,
            "reference": ORIGINAL_MODEL,
            "rows": table,
        }
        args.out.write_text(json.dumps(record, indent=2) + "\n")


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:.4g}"


if __name__ == "__main__":
    main()

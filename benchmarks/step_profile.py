"""Where a package's decoding step spends its time, by ONNX Runtime operator, and how many nodes ONNX Runtime keeps
after its own graph optimizations.

Usage: python benchmarks/step_profile.py PACKAGE [PACKAGE ...] [--prompt-tokens 64] [--new-tokens 64]
                                         [--generations 3] [--out F.json]

Each package decodes held-out pydocs prompts greedily with exits disabled through dyninfer's own runtime
(runtime/onnx_decoder.py: buffers bound in place), in a session with ONNX Runtime's profiler on. Reported per
package: milliseconds per decode step by operator type (the prefill runs are left out), the step's total inside
ONNX Runtime, and the node counts of the optimized graph (main graph, and inside the exits' `If` branches).
An `If` node's kernel time includes the nodes of the branch it ran, which are profiled too: it is listed, and left out
of the step's total. `--graph FILE` (repeatable) also counts the nodes ONNX Runtime keeps of any ONNX file, such as
onnxruntime-genai's export (a graph our runtime does not drive).
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import numpy as np
from provenance import provenance, provenance_line

from dyninfer.core.data import load_windows
from dyninfer.runtime.onnx_decoder import OnnxDecoder


def profiled_session(decoder: OnnxDecoder, folder: Path):
    """The decoder's graph in a session like the runtime's (all optimizations), with the profiler on and the
    optimized graph written out."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = str(folder / "profile")
    options.optimized_model_filepath = str(folder / "optimized.onnx")
    return ort.InferenceSession(str(decoder.path / decoder.manifest.model_file), options, providers=["CPUExecutionProvider"])


def node_counts(path: Path) -> dict:
    """Op types of the optimized graph: the main graph's and those inside `If` branches."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    main, branches = collections.Counter(), collections.Counter()

    def visit(graph, counter):
        for node in graph.node:
            counter[node.op_type] += 1
            for attribute in node.attribute:
                for subgraph in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                    visit(subgraph, branches)

    visit(model.graph, main)
    return {"main": sum(main.values()), "in_branches": sum(branches.values()), "main_by_op": dict(main.most_common())}


def optimized_counts(path: Path) -> dict:
    """`node_counts` of the graph at `path` after ONNX Runtime's optimizations (CPU, all levels)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        options.optimized_model_filepath = str(Path(folder) / "optimized.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return node_counts(Path(folder) / "optimized.onnx")


def step_times(profile: Path, prefill_runs: set[int]) -> tuple[dict[str, float], int]:
    """Microseconds by op type summed over the decode runs (every run but the prefills), and the number of runs."""
    events = json.loads(profile.read_text())
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    decode = [(r["ts"], r["ts"] + r["dur"]) for i, r in enumerate(runs) if i not in prefill_runs]
    by_op: collections.Counter = collections.Counter()
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        if any(start <= event["ts"] <= end for start, end in decode):
            by_op[event["args"].get("op_name", "?")] += event["dur"]
    return dict(by_op), len(decode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("packages", type=Path, nargs="+")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--generations", type=int, default=3)
    parser.add_argument("--graph", type=Path, action="append", default=[], help="an ONNX file whose optimized nodes to count")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    print(provenance_line(), flush=True)
    results = {}
    for graph in args.graph:
        results[str(graph)] = {"nodes": optimized_counts(graph)}
        print(f"{graph}: optimized graph: {results[str(graph)]['nodes']['main']} nodes", flush=True)
    for package in args.packages:
        decoder = OnnxDecoder(package, provider="cpu")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(decoder.path))
        prompts = load_windows("builtin:pydocs", tokenizer, seq_len=args.prompt_tokens, seed=1).heldout[: args.generations].numpy()
        decoder.generate(prompts[:1], 4, mode="full")  # warm-up, outside the profile
        with tempfile.TemporaryDirectory() as folder:
            decoder.session = profiled_session(decoder, Path(folder))
            decoder.generate(prompts[:1], 2, mode="full")  # the profiled session's own warm-up
            decoder.ort_seconds = 0.0
            for prompt in prompts:
                decoder.generate(prompt[None], args.new_tokens, mode="full")
            profile = Path(decoder.session.end_profiling())
            runs_per_generation = args.new_tokens  # a prefill, then new_tokens - 1 decode steps
            warm = 2  # the warm-up generation: a prefill and one step
            prefills = set(range(warm)) | {warm + g * runs_per_generation for g in range(len(prompts))}
            by_op, decode_runs = step_times(profile, prefills)
            counts = node_counts(Path(folder) / "optimized.onnx")
        total = sum(us for op, us in by_op.items() if op != "If")  # an If's time is its branch's nodes, counted already
        row = {
            "weights": decoder.manifest.precision,
            "decode_steps": decode_runs,
            "kernel_ms_per_step": total / decode_runs / 1000,
            "ms_per_step_by_op": {op: us / decode_runs / 1000 for op, us in sorted(by_op.items(), key=lambda kv: -kv[1])},
            "nodes": counts,
        }
        results[str(package)] = row
        print(
            f"{package}: {row['weights']}, {row['kernel_ms_per_step']:.2f} ms of kernels per decode step; "
            f"optimized graph: {counts['main']} nodes + {counts['in_branches']} in branches",
            flush=True,
        )
        for op, ms in row["ms_per_step_by_op"].items():
            print(f"  {op:36s} {ms:7.3f} ms  {ms / row['kernel_ms_per_step']:6.1%}", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"provenance": provenance(), "packages": results}, indent=2) + "\n")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()

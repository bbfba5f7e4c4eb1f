"""How each weight-only quantization setting trades tokens kept for speed, on the plain model (optimum's export).

Usage: python benchmarks/quantization_variants.py FLOAT_EXPORT [--prompts 8] [--new-tokens 64] [--out F.json]

FLOAT_EXPORT: an optimum export of the plain model in fp32 (a quantized package's `baseline-full/`). Each variant
quantizes a copy of it with ONNX Runtime's MatMulNBitsQuantizer (after `exporters.quantize`'s graph preparation)
and decodes the same held-out pydocs prompts greedily through optimum's ORTModelForCausalLM, interleaved with the
fp32 export. Reported per variant: tokens/s and its ratio to fp32, and the consistency of its greedy tokens with
the fp32 export's (tokens at the same position, and the shared prefix), i.e. with the original model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
from provenance import provenance, provenance_line
from transformers import AutoTokenizer

from dyninfer.core.consistency import prefix_share, token_share
from dyninfer.core.data import load_windows
from dyninfer.exporters.baseline import OptimumBaseline
from dyninfer.exporters.quantize import prepare_for_quantization, quiet_quantizer

VARIANTS = {  # name -> (bits, block size, symmetric, quantize the head, accuracy level)
    "int8 sym b32, level 0": (8, 32, True, True, 0),
    "int8 sym b32, level 4 (default)": (8, 32, True, True, 4),
    "int4 sym b32, level 0": (4, 32, True, True, 0),
    "int4 sym b32, level 4 (default)": (4, 32, True, True, 4),
    "int4 sym b32, level 4, head fp32": (4, 32, True, False, 4),
    "int4 asym b32, level 4": (4, 32, False, True, 4),
}


def quantized_copy(source: Path, target: Path, bits: int, block: int, symmetric: bool, head: bool, level: int | None) -> None:
    shutil.copytree(source, target)
    for data in [*target.glob("*.onnx_data"), *target.glob("*.onnx.data")]:
        data.unlink()
    model = onnx.load(str(source / "model.onnx"))
    prepare_for_quantization(model)
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    vocab = max(dims[0] for dims in shapes.values() if len(dims) == 2)
    # the head: the MatMul whose constant weight produces the vocabulary's logits
    excluded = [n.name for n in model.graph.node if n.op_type == "MatMul" and not head and shapes.get(n.input[1], [None])[-1] == vocab]
    with quiet_quantizer():
        quantizer = MatMulNBitsQuantizer(
            model, bits=bits, block_size=block, is_symmetric=symmetric, accuracy_level=level, nodes_to_exclude=excluded
        )
        quantizer.process()
    onnx.save_model(
        quantizer.model.model,
        str(target / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=1024,
    )


def load(folder: Path) -> OptimumBaseline:
    from optimum.onnxruntime import ORTModelForCausalLM

    return OptimumBaseline(ORTModelForCausalLM.from_pretrained(folder, provider="CPUExecutionProvider", use_cache=True), folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("float_export", type=Path)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    print(provenance_line(), flush=True)
    tokenizer = AutoTokenizer.from_pretrained(str(args.float_export))
    prompts = load_windows("builtin:pydocs", tokenizer, seq_len=64, seed=1).heldout[: args.prompts]
    work = Path(tempfile.mkdtemp(prefix="quant-variants-"))
    try:
        models = {"fp32": load(args.float_export)}
        for name, spec in VARIANTS.items():
            quantized_copy(args.float_export, work / str(len(models)), *spec)
            models[name] = load(work / str(len(models)))
            print(f"quantized: {name}", flush=True)
        seconds = dict.fromkeys(models, 0.0)
        outputs: dict[str, list[np.ndarray]] = {name: [] for name in models}
        for model in models.values():  # warm-up
            model.greedy(prompts[:1, :8], 2)
        for prompt in prompts:
            for name, model in models.items():
                started = time.perf_counter()
                outputs[name].append(model.greedy(prompt[None], args.new_tokens).numpy()[0])
                seconds[name] += time.perf_counter() - started
        reference = np.stack(outputs["fp32"])
        rows = {}
        for name in models:
            tokens = np.stack(outputs[name])
            speed = tokens.size / seconds[name]
            rows[name] = {
                "tokens_per_s": speed,
                "vs_fp32": speed / (reference.size / seconds["fp32"]),
                "tokens_consistency": float(token_share(tokens, reference).mean()),
                "prefix_consistency": float(prefix_share(tokens, reference).mean()),
            }
            row = rows[name]
            print(
                f"{name:38s} {speed:6.1f} tok/s  {row['vs_fp32']:.3f}x  tokens {row['tokens_consistency']:.1%}  "
                f"prefix {row['prefix_consistency']:.1%}",
                flush=True,
            )
        if args.out:
            args.out.write_text(json.dumps({"provenance": provenance(), "rows": rows}, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

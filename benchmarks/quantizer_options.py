"""What ONNX Runtime's weight quantizer offers beyond round-to-nearest, on a package's own step: fidelity and speed.

Usage: python benchmarks/quantizer_options.py ARTIFACT FP32_PACKAGE [--prompts 16] [--out F.json]

FP32_PACKAGE: `dyninfer export ARTIFACT --weights full` (the fused fp32 step). Each option quantizes a copy of its
graph (after `exporters.quantize`'s graph preparation) with `MatMulNBitsQuantizer`: symmetric and asymmetric
round-to-nearest at blocks of 32 and 16, HQQ (half-quadratic optimisation of scale and zero point), and int4 with the
head in int8 (mixed precision); k-quant and GPTQ are tried and reported as unavailable when their backend
(Intel Neural Compressor) is not installed. Each variant is then fed the original model's continuations of the
artifact's held-out calibration prompts (certification/fidelity.py: same top-1, mean and 99th-percentile KL,
perplexity ratio) and timed like `export --weights auto`'s candidates (exporters/weights_choice.decode_speed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

import onnx
from onnxruntime.quantization import matmul_nbits_quantizer as nbits
from provenance import provenance, provenance_line

from dyninfer.certification.fidelity import decoder_logits, measure_fidelity
from dyninfer.core import stages
from dyninfer.exporters.quantize import prepare_for_quantization, quiet_quantizer
from dyninfer.exporters.weights_choice import decode_speed
from dyninfer.runtime.loader import load_dynamic
from dyninfer.runtime.onnx_decoder import OnnxDecoder
from dyninfer.runtime.package_format import MODEL_FILE, read_package

LEVEL = 4  # int8 activations, as every package's default


def _rtn(bits: int, block: int, symmetric: bool):
    return lambda model, exclude: nbits.MatMulNBitsQuantizer(
        model, bits=bits, block_size=block, is_symmetric=symmetric, accuracy_level=LEVEL, nodes_to_exclude=exclude
    )


def _hqq(block: int):
    def make(model, exclude):
        config = nbits.HQQWeightOnlyQuantConfig(block_size=block, bits=4)
        return nbits.MatMulNBitsQuantizer(model, block_size=block, accuracy_level=LEVEL, nodes_to_exclude=exclude, algo_config=config)

    return make


def _kquant(model, exclude):
    config = nbits.KQuantWeightOnlyQuantConfig()
    return nbits.MatMulNBitsQuantizer(model, accuracy_level=LEVEL, nodes_to_exclude=exclude, algo_config=config)


OPTIONS = {  # name -> (quantizer for the body, bits of the head: None = as the body)
    "int4 RTN sym b32 (the int4 default)": (_rtn(4, 32, True), None),
    "int4 RTN asym b32": (_rtn(4, 32, False), None),
    "int4 RTN sym b16": (_rtn(4, 16, True), None),
    "int4 RTN asym b16": (_rtn(4, 16, False), None),
    "int4 HQQ b32": (_hqq(32), None),
    "int4 HQQ b16": (_hqq(16), None),
    "int4 RTN sym b32 + head int8": (_rtn(4, 32, True), 8),
    "int4 k-quant": (_kquant, None),
    "int8 RTN sym b32 (the int8 default)": (_rtn(8, 32, True), None),
}


def _head(model) -> str:
    """The name of the MatMul producing the logits (the last MatMul of the main graph whose output is widest)."""
    widths = {t.name: t.dims[-1] for t in model.graph.initializer if len(t.dims) == 2}
    heads = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in widths]
    return max(heads, key=lambda n: widths[n.input[1]]).name


def quantized_copy(package: Path, folder: Path, make, head_bits: int | None) -> None:
    for file in package.iterdir():
        if file.name.startswith(MODEL_FILE):
            shutil.copyfile(file, folder / file.name)
    model = onnx.load(str(folder / MODEL_FILE))
    prepare_for_quantization(model)
    with quiet_quantizer():
        # with a head of its own precision: the body first, leaving the head a MatMul, then the head (the only MatMul of a
        # constant weight left) at its bits
        quantizer = make(model, [_head(model)] if head_bits is not None else [])
        quantizer.process()
        if head_bits is not None:
            quantizer = nbits.MatMulNBitsQuantizer(
                quantizer.model.model, bits=head_bits, block_size=32, is_symmetric=True, accuracy_level=LEVEL
            )
            quantizer.process()
    (folder / (MODEL_FILE + ".data")).unlink()
    onnx.save_model(
        quantizer.model.model, str(folder / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
        location=MODEL_FILE + ".data", size_threshold=1024,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("package", type=Path)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--only", default=None, help="comma-separated option names to run")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    print(provenance_line(), flush=True)
    dyn = load_dynamic(str(args.artifact), require_policy=False)
    group = dyn.artifact.tensors[stages.GENERATION_GROUP]
    held = (group["heldout.prompts"][: args.prompts].numpy(), group["heldout.continuations"][: args.prompts].numpy())
    manifest = read_package(args.package)
    rows = {}
    for name, (make, head_bits) in OPTIONS.items():
        if args.only and name not in args.only.split(","):
            continue
        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(scratch)
            started = time.perf_counter()
            try:
                quantized_copy(args.package, folder, make, head_bits)
            except Exception as exc:  # an option whose backend is not installed: say so and go on
                rows[name] = {"unavailable": f"{type(exc).__name__}: {str(exc)[:200]}"}
                print(f"{name}: unavailable ({rows[name]['unavailable']})", flush=True)
                continue
            seconds = time.perf_counter() - started
            runtime = OnnxDecoder(folder, provider="cpu", manifest=dataclasses.replace(manifest, weights={"format": name}))
            fidelity = measure_fidelity(decoder_logits(runtime), dyn.loaded.layered, held, None).measures()
            speed = decode_speed(runtime)
            size = sum(f.stat().st_size for f in folder.iterdir())
        rows[name] = {"decode_tokens_per_s": speed, "quantize_s": seconds, "bytes": size} | {
            k: fidelity[k] for k in ("same_top1", "mean_kl", "kl_p99", "perplexity_ratio")
        }
        r = rows[name]
        print(
            f"{name}: {speed:.1f} tok/s, same top-1 {r['same_top1']:.4f}, mean KL {r['mean_kl']:.4f}, p99 KL {r['kl_p99']:.3f}, "
            f"ppl ratio {r['perplexity_ratio']:.3f}, {size / 1e6:.0f} MB, quantized in {seconds:.0f} s",
            flush=True,
        )
    if args.out:
        args.out.write_text(json.dumps({"provenance": provenance(), "prompts": args.prompts, "options": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

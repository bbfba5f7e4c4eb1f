"""The quantizer's settings and their checks, light enough for the CLI to validate options before any import of
numpy or ONNX."""

from __future__ import annotations

from dyninfer.core.errors import DyninferError, option

# MatMulNBits' accuracy_level: the precision its CPU kernels compute in (0 the input's, 1 fp32, 2 fp16, 3 bf16,
# 4 int8: activations quantized per block). 4 by measurement: on 2 AVX2 cores an int4 SmolLM2-135M decodes at
# 1.07x of fp32 with level 0 and 1.73x with level 4, int8 at 0.08x and 1.47x (benchmarks/quantization_variants.py,
# the table in docs/export.md). CUDA ignores it.
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = 16, 256
DEFAULT_ACCURACY_LEVEL = 4


def check_accuracy_level(level: int) -> None:
    if isinstance(level, bool) or level not in ACCURACY_LEVELS:
        raise DyninferError(
            f"{option('accuracy_level')} must be one of {', '.join(map(str, ACCURACY_LEVELS))} (ONNX Runtime's MatMulNBits: "
            f"0 the input's precision, 1 fp32, 2 fp16, 3 bf16, 4 int8), got {level}"
        )


def check_block_size(block_size: int) -> None:
    """MatMulNBits' blocks are a power of two from 16 to 256 inputs (ONNX Runtime's kernels take no others)."""
    if (
        isinstance(block_size, bool)
        or not isinstance(block_size, int)
        or not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE
        or block_size & (block_size - 1)
    ):
        raise DyninferError(
            f"{option('block_size')} must be a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE} (e.g. 32, 64, 128), got {block_size}"
        )

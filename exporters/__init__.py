"""Shipping: the dynamic model written as an ONNX Runtime package (reading and running one is `runtime`'s).

- `step`, `ops`, `attention`, `onnx_export`: one decoding step traced with exits as `If` branches, the exit
  decisions as `ai.dyninfer` custom ops (ONNX functions) and the KV cache written in place;
- `graph_tidy`: rewrites that change no result (weights stored transposed, torch's node metadata dropped);
- `quantize`: weight-only int8/int4 with ONNX Runtime's MatMulNBits, the package's and the baseline's alike;
- `baseline`: optimum's export and ORTModelForCausalLM, the reference a package is benchmarked against.

May import: `certification`, `runtime`, `early_exit`, `compressors`, `kernels`, `core`.
"""

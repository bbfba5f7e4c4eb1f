"""Shipping: the dynamic model as an ONNX Runtime package, and running it.

- `step`, `ops`, `onnx_export`: one decoding step traced with exits as `If` branches and the exit
  decisions as `ai.dyninfer` custom ops (ONNX functions);
- `graph_tidy`: rewrites that change no result (weights stored transposed, torch's node metadata dropped);
- `quantize`: weight-only int8/int4 with ONNX Runtime's MatMulNBits, the package's and the baseline's alike;
- `certificate`: the consistency bound a package ships with, and what graph it was computed on;
- `onnx_runtime`: run a package with ONNX Runtime (numpy only; CUDA provider, CPU fallback);
- `baseline`: optimum's ORTModelForCausalLM, the reference a package is benchmarked against.

May import: `runtime`, `early_exit` (its lower half), `compressors`, `kernels`, `core`.
"""

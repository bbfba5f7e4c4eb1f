"""Shipping: the dynamic model as an ONNX Runtime package, and running it.

- `step`, `ops`, `onnx_export`: one decoding step traced with exits as `If` branches and the exit
  decisions as `ai.dyninfer` custom ops (ONNX functions);
- `onnx_runtime`: run a package with ONNX Runtime (numpy only; CUDA provider, CPU fallback);
- `baseline`: optimum's ORTModelForCausalLM, the reference a package is benchmarked against.

May import: `runtime`, `early_exit` (its lower half), `compressors`, `kernels`, `core`.
"""

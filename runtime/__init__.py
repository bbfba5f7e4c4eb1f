"""The dynamic model at run time, on torch or on ONNX Runtime, and how it is loaded.

- `decoding`: generation written once for every backend (`generate`, the `Decoder` protocol, the `Step`
  record, stop rules and probes, `GenerationResult`);
- `dynamic`: `DynamicModel`, the torch decoder: exits per token (CALM; the rule is `early_exit.rule`),
  filling skipped layers' caches by propagation or recompute; `decode_state` its cache; `row_decoding`
  calibration's per-row exits; `self_speculation` lossless LayerSkip drafting; `speculation` the draft layer
  and length planned from measured costs;
- `package_format`: the ONNX package's manifest, IO contract and certificate, declared once;
  `onnx_session`, `onnx_decoder`: a package run through ONNX Runtime (numpy only; CUDA provider, CPU fallback);
- `loader`: `ModelSession` (a loaded model with an artifact's tuning, steering and masks applied),
  `open_workspace` (what the stage jobs start from) and `load_dynamic`.

May import: `early_exit`, `compressors`, `kernels`, `core`.
"""

"""Certification on what runs: guarantees computed on the dynamic model's or the package's own decoding.

- `exits`: early exit certified on the torch dynamic model's greedy continuations (the generation risk);
- `calibrate`: `calibrate_exits`, the one library call for every risk;
- `package`: an exported package certified on its own continuations through ONNX Runtime.

May import: `runtime`, `early_exit`, `compressors`, `kernels`, `core`.
"""

"""The dynamic model at run time, and how it is loaded from an artifact.

- `dynamic`: `DynamicModel`, generation that exits early per token (CALM), or self-speculates
  losslessly (LayerSkip), filling skipped layers' caches by propagation or recompute;
- `loader`: `ModelSession` (a loaded model with an artifact's steering and masks applied),
  `open_workspace` (what the stage jobs start from) and `load_dynamic`.

May import: `core`, `compressors`, `kernels`.
"""

"""The dynamic model at run time, and how it is loaded from an artifact.

- `dynamic`: `DynamicModel`, generation that exits early per token (CALM; the rule is
  `early_exit.rule`), or self-speculates losslessly (LayerSkip), filling skipped layers' caches by
  propagation or recompute; `speculation`: the draft layer and length planned from measured costs;
- `loader`: `ModelSession` (a loaded model with an artifact's tuning, steering and masks applied),
  `open_workspace` (what the stage jobs start from) and `load_dynamic`.

May import: `early_exit` (its lower half: policy, confidence, rule), `compressors`, `kernels`, `core`.
"""

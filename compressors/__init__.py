"""The methods: how a model is made dynamic, as decisions and weight changes.

- early exit: `confidence` (exit measures and the CALM classifier), `ltt` (Learn-then-Test),
  `exit_policy` (exit points, thresholds and the certified `ExitPolicy`);
- pruning: `pruning` (per-token MLP masks: thresholds or predictors, `SparseMLP`);
- steering: `steering` (directions baked into weights), `steer_extract` (finding them),
  `cot_data` (paired long/short chains of thought).

May import: `core`, `kernels`.
"""

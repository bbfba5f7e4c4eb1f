"""The methods other than early exit (which has its own package, `early_exit`): decisions and weight changes.

- `ltt`: Learn-then-Test (fixed-sequence testing, binomial and Hoeffding-Bentkus p-values), used by
  early exit and by any other certified rule;
- stop rules: `stop_obey` (each workload's decision, once, and the stoppers both runtimes call),
  `stop_simulate` (what each candidate threshold does to recorded generations), `stop_certify`
  (Learn-then-Test over the candidates);
- pruning: `pruning` (per-token MLP masks: the plan, thresholds or predictors, `SparseMLP`),
  `pruning_calibration` (calibrating it on the dense model: thresholds, allocation, predictor training);
- steering: `steering` (directions baked into weights), `steer_extract` (finding them),
  `cot_data` (paired long/short chains of thought);
- tune-exits: `exit_tuning` (a LoRA trained with early-exit losses, LayerSkip), `tuning_settings`
  (its options, no torch), `lora` (attaching a LoRA and reading its low-rank delta).

May import: `core`, `kernels`.
"""

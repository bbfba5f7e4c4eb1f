"""Early exit in one place: the policy, its confidence measures, the exit rule, tracing, planning and
certification, for every risk.

The package spans two layers (the import contract in pyproject.toml says which module is where):

- below the runtime, the methods: `policy` (the ExitPolicy contract), `confidence` (the measures and
  CALM's exit classifier), `rule` (which rows leave at which point: the one implementation that the
  runtime, the simulation and the ONNX step share), `trace` (teacher-forced traces and simulation),
  `plan` (exit points, classifier and threshold grid from the fit data) and `certify` (Learn-then-Test
  on teacher-forced windows);
- above the runtime, what needs the dynamic model to generate: `generation` (certification on the
  dynamic model's own greedy continuations) and `calibrate` (`calibrate_exits`, the one library call
  for every risk).

May import: `core`, `compressors` (below); `generation` and `calibrate` also `runtime`.
"""

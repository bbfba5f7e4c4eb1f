"""Early exit's methods: its confidence measures, the exit rule, tracing, planning and teacher-forced certification.

- `confidence` (the measures and CALM's exit classifier), `rule` (which rows leave at which point: the one
  implementation that the runtime, the simulation and the ONNX step share), `trace` (teacher-forced traces
  and simulation), `plan` (exit points, classifier and threshold grid from the fit data) and `certify`
  (Learn-then-Test on teacher-forced windows).

The policy they produce is a record (`core.policies.ExitPolicy`); certification on what the dynamic model
generates needs the runtime and lives above it, in `certification`.

May import: `core`, `kernels`, `compressors`.
"""

"""Measurement: what a model or a dynamic model does, measured on held-out data or this machine.

- `exit_probe`: per-layer exit accuracy, prediction depth and the oracle saving;
- `layer_profile` (with `piece_meters`), `nvml`: per-piece FLOPs, memory and latency; GPU power and energy;
- `bench`: the dynamic model against the full model, side by side; `prune_bench`: dense vs sparse;
- `speculation_cost`: the measured cost of a draft token, a verification and a plain step;
- `steer_sweep`: what a steering direction does to chain-of-thought length at each strength.

May import: `early_exit`, `exporters`, `runtime`, `compressors`, `kernels`, `core`.
"""

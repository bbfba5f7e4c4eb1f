"""Measurement: what a model or a dynamic model does, measured on held-out data or this machine.

- `exit_probe`: per-layer exit accuracy, prediction depth and the oracle saving;
- `layer_profile`, `nvml`: per-piece FLOPs, memory and latency; GPU power and energy;
- `bench`: the dynamic model against the full model, side by side; `prune_bench`: dense vs sparse;
- `steer_sweep`: what a steering direction does to chain-of-thought length at each strength.

May import: `exporters`, `runtime`, `compressors`, `kernels`, `core`.
"""

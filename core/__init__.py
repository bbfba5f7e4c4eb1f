"""Model-level parts every layer builds on (imports nothing else from dyninfer).

- `models`: load a model spec (the bundled model, a folder, a .gguf, a hub id);
- `adapters` (the adapters and what each family declares) and `adapter_forward` (the per-family forward
  code they point to): the one place that knows architectures; `layered`: `LayeredModel`, which runs a
  model layer by layer through its adapter; `families`: the tested model types and the stages each supports;
- `data`: text corpora and the seeded train/held-out token windows;
- `artifacts`: the on-disk dynamic-model package (manifest + safetensors, validated);
  `artifact_files`: its directory transaction (lock, staged copy, swap); `artifact_paths`: file names,
  paths, modes and the cached sha256 of a file; `file_locks`: flock and the writer lock (the three without torch);
- `lenses`: exit heads (logit lens, tuned lens) and tuned-lens training;
- `cost`: the per-layer cost model (FLOPs, or a measured profile's latency);
- `generation`, `consistency`: what a generation run returns, and how two runs' tokens compare;
- `placement`, `distributed`, `memory`: where a model runs, data-parallel ranks, peak memory;
- `choices`: every option's vocabulary (importable without torch);
- `errors`, `progress`, `stages`, `version`: one-line user errors and how they name options, the
  progress callback, the names of stages and tensor groups, the version.
"""

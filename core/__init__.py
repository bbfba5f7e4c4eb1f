"""Model-level parts every layer builds on (imports nothing else from dyninfer).

- `models`: load a model spec (the bundled model, a folder, a .gguf, a hub id);
- `adapters`: the one place that knows architectures (`LayeredModel` runs a model layer by layer);
- `data`: text corpora and the seeded train/held-out token windows;
- `artifacts`: the on-disk dynamic-model package (manifest + safetensors, atomic, validated);
- `lenses`: exit heads (logit lens, tuned lens) and tuned-lens training;
- `cost`: the per-layer cost model (FLOPs, or a measured profile's latency);
- `generation`: what a generation run returns, whichever backend ran it;
- `errors`, `progress`, `stages`, `version`: one-line user errors and how they name options, the
  progress callback, the names of stages and tensor groups, the version.
"""

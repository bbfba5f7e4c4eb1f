"""One module per command: a Report (data, `summary()` for JSON, `files()` for its report folder), `run`
and `save`; the Configs (the options, validated before any work) live together in `configs`, which
imports no torch. Jobs print nothing.

`probe`, `profile`, `calibrate`, `prune`, `tune` (tune-exits), `steer` (extract, sweep, apply),
`export`, `run`, `bench` and `audit` (every stage on one loaded model, writing OUT/). `plots` draws
the report folders' figures; `audit_report` renders the audit as Markdown and self-contained HTML.

May import: every layer below (`profilers`, `early_exit`, `exporters`, `runtime`, `compressors`, `kernels`, `core`).
"""

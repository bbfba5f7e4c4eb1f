"""One module per command: a Config (the options, validated before any work), a Report (data,
`summary()` for JSON, `files()` for its report folder), `run` and `save`. Jobs print nothing.

`probe`, `profile`, `calibrate`, `prune`, `steer` (extract, sweep, apply), `export`, `run`,
`bench` and `audit` (every stage on one loaded model, writing OUT/). `plots` draws the report
folders' figures; `audit_report` renders the audit as Markdown and self-contained HTML.

May import: every layer below (`profilers`, `exporters`, `runtime`, `compressors`, `kernels`, `core`).
"""

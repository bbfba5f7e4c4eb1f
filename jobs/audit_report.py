"""The audit report, as self-contained HTML (plots embedded) and as Markdown (for CI logs and PRs).

Both are rendered from one list of sections, so they always say the same thing. The functions
take a `jobs.audit.AuditReport` (not imported here: `jobs.audit` imports this module to write).
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field

from dyninfer.core.choices import COMPLETION


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass
class Section:
    title: str
    lines: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figure: str | None = None  # key into the figures dict (HTML only)


def _pct(value: float) -> str:
    return f"{value:.1%}"


def _points(points: list[int]) -> str:
    return ", ".join(map(str, points)) or "none"


def _summary_sections(report, summary: dict) -> list[Section]:
    head = summary["headline"]
    model = summary["model"]
    verdict = "PASSED" if report.passed else "FAILED"
    lines = [
        f"Model **{model['spec']}** ({model['architecture']}, {head['num_layers']} layers, {head['params']:,} parameters) "
        f"on **{summary['data']['spec']}**.",
        f"Oracle exit saving ({head['oracle_lens']} lens): **{_pct(head['oracle_flop_saving'])} of FLOPs**, "
        f"{_pct(head['oracle_latency_saving'])} of measured decode time; mean prediction depth "
        f"{head['mean_prediction_depth']:.1f} of {head['num_layers']} layers.",
        f"Certified early exit at target {head['target']:g}: exit points {_points(head['exit_points'])}, held-out "
        f"consistency **{_pct(head['consistency'])}** ({head['consistency_is']}), predicted speedup "
        f"**{head['predicted_speedup']:.3f}×** ({head['speedup_unit']}).",
        f"Decoding on {head['device']}: {head['decode_tokens_per_s']:.1f} tokens/s (batch 1, layer by layer).",
    ]
    if report.gates:
        lines.append(f"CI gates: **{verdict}**.")
    return [Section("Summary", lines)]


def _gate_sections(report, summary: dict) -> list[Section]:
    if not report.gates:
        return []
    rows = [[g.name, f"{g.threshold:g}", f"{g.value:.4g}", "pass" if g.passed else "FAIL", g.measures] for g in report.gates]
    return [Section("CI gates", tables=[Table(["gate", "threshold", "value", "result", "measures"], rows)])]


def _probe_sections(report, summary: dict) -> list[Section]:
    oracle = summary["oracle"]
    probe = report.probe.result
    layer_rows = []
    by_lens = {lens: probe.layers[probe.layers["lens"] == lens].reset_index(drop=True) for lens in oracle}
    for index in range(len(next(iter(by_lens.values())))):
        row = ["embed" if index == 0 else str(index)]
        for lens in oracle:
            r = by_lens[lens].loc[index]
            row += [_pct(r.agreement), _pct(r.accuracy), f"{r.exit_fraction:.1%}"]
        layer_rows.append(row)
    return [
        Section(
            "Exit accuracy per layer (probe)",
            [
                f"{probe.n_tokens} held-out tokens. Agreement: top-1 equals the final layer's; accuracy: equals the true "
                "next token; exits: tokens whose prediction depth is this layer."
            ]
            + [
                f"{lens} lens: mean prediction depth {o['mean_depth']:.1f}, oracle saving {_pct(o['flop_saving'])} of "
                f"FLOPs, {_pct(o['latency_saving'])} of measured time"
                for lens, o in oracle.items()
            ],
            [Table(["layer"] + [f"{lens} {m}" for lens in oracle for m in ("agree", "acc", "exits")], layer_rows)],
            figure="probe",
        ),
        Section("Prediction depth", ["Share of tokens whose top-1 is settled from each layer on."], figure="depth"),
    ]


_TARGET_HEADERS = [
    "target",
    "exit points",
    "threshold",
    "certified ≥",
    "achieved",
    "simulated",
    "predicted speedup",
    "mean exit layer",
    "in artifact",
]


def _target_row(t: dict) -> list[str]:
    return [
        f"{t['target']:g}",
        _points(t["exit_points"]),
        "never exits" if t["threshold"] is None else f"{t['threshold']:.6g}",
        _pct(t["certified_bound"]),
        _pct(t["consistency"]),
        _pct(t["simulated_consistency"]),
        f"{t['predicted_speedup']:.3f}×",
        f"{t['mean_exit_layer']:.1f}",
        "yes" if t["kept_in_artifact"] else "",
    ]


def _calibration_sections(report, summary: dict) -> list[Section]:
    cal = summary["calibration"]
    lines = [
        f"{cal['lens']} lens, {cal['measure']} confidence, ε = {cal['epsilon']:g}, risk **{cal['risk']}** "
        f"(LTT examples: {cal['units']}); exit points chosen with the {summary['headline']['speedup_unit']} cost model. "
        f"{cal['statement']}",
        "certified: the bound LTT guarantees; achieved: "
        + "; ".join(sorted({t["consistency_is"] for t in summary["targets"]}))
        + "; simulated: teacher-forced token consistency on held-out windows.",
    ] + [f"note: {n}" for n in cal["notes"]]
    table = Table(_TARGET_HEADERS, [_target_row(t) for t in summary["targets"]])
    return [Section("Calibrated early exit (speedup vs consistency)", lines, [table], figure="curve")]


def _gpu_lines(gpu) -> list[str]:
    if not gpu.available:
        return [f"GPU: {gpu.reason}"]
    d = gpu.device
    return [f"GPU {d.index}: {d.name}, driver {d.driver}, power {d.power_w} W"] + [
        f"{e.label}: {'n/a' if e.joules_per_token is None else f'{e.joules_per_token * 1000:.2f} mJ/token'} ({e.source}, {e.seconds:.1f} s)"
        for e in gpu.energy
    ]


def _cost_sections(report, summary: dict) -> list[Section]:
    profile = report.profile.profile
    totals = profile.totals()
    cost_rows = []
    for name, rows in profile.grouped():
        total = rows.sum(numeric_only=True)
        cost_rows.append(
            [
                name,
                f"{int(total.params):,}",
                f"{total.decode_flops / 1e6:.2f}",
                f"{total.decode_ms:.3f}",
                f"{total.prefill_ms:.2f}",
                f"{total.weight_bytes / 2**20:.2f}",
                f"{total.cache_bytes / 1024:.0f}",
            ]
        )
    return [
        Section(
            "Cost per layer (profile)",
            [
                f"{profile.device}, {profile.dtype}, context {profile.context}, median of {profile.repeats} runs. Decode step "
                f"{profile.decode_step_ms['median']:.2f} ms ({totals['decode_tokens_per_s']:.1f} tokens/s); prefill "
                f"{profile.prefill_ms['median']:.1f} ms ({totals['prefill_tokens_per_s']:.0f} tokens/s); the LM head is "
                f"{_pct(totals['head_share_of_decode_ms'])} of a decode step. Weights "
                f"{totals['weight_bytes'] / 2**20:.1f} MiB, KV cache {totals['cache_bytes'] / 2**20:.2f} MiB."
            ]
            + _gpu_lines(report.profile.gpu),
            [Table(["piece", "params", "decode MFLOPs", "decode ms", "prefill ms", "weights MiB", "KV KiB"], cost_rows)],
            figure="cost",
        )
    ]


def _prune_sections(report, summary: dict) -> list[Section]:
    if report.prune is None:
        return []
    main = report.prune.main.to_dict()
    return [
        Section(
            "Pruning",
            [
                f"{report.prune.config.method} at {report.prune.config.sparsity:.0%} MLP sparsity: held-out perplexity "
                f"{report.prune.dense_perplexity:.3f} → {main['perplexity']:.3f} ({main['perplexity_change']:+.2%}), "
                f"next-token agreement {_pct(main['agreement'])}, MLP FLOPs saved {_pct(main['flops_saved'])}."
            ],
        )
    ]


def _steer_sections(report, summary: dict) -> list[Section]:
    steer = summary["steer"]
    if steer is None:
        return []
    rows = [
        [
            f"{p['alpha']:g}",
            f"{p['mean_length']:.1f}",
            f"{p['length_change']:+.1%}",
            _pct(p["truncated"]),
            _pct(p["accuracy"]),
            _pct(p["agreement"]),
        ]
        for p in steer["points"]
    ]
    return [
        Section(
            f"Steering of chain-of-thought length ({steer['method']})",
            [
                f"{steer['questions']} held-out arithmetic questions, greedy, at most {steer['max_new_tokens']} new "
                f"tokens. Spearman ρ(α, length) = {steer['spearman']:.2f}; shortest α keeping {steer['keep']:.0%} of the "
                f"unsteered answers: {steer['best'] if steer['best'] is not None else 'none'}."
            ],
            [Table(["α", "mean length", "Δ length", "hit the limit", "accuracy", "same answer as α = 0"], rows)],
            figure="steer",
        )
    ]


def _stop_sections(report, summary: dict) -> list[Section]:
    return [] if summary["stop"] is None else [stop_section(summary["stop"])]


def _export_sections(report, summary: dict) -> list[Section]:
    if report.export is None:
        return []
    e = report.export
    return [
        Section(
            "ONNX export",
            [
                f"{e['path']} ({e['dtype']}, {e['provider']}): exits after layers {_points(e['exit_points'])}, "
                f"verified against torch with max |logit difference| {e['verify_max_abs_diff']:.2g}, "
                f"{e['model_bytes'] / 1e6:.0f} MB, {e['seconds']:.0f} s."
            ],
        )
    ]


def _other_stage_sections(report, summary: dict) -> list[Section]:
    """Stages other commands recorded in the artifact, unless a section above already reports them."""
    reported = {"prune": report.prune is not None, "steer": summary["steer"] is not None, "stop": summary["stop"] is not None}
    return [
        Section(f"Stage already in the artifact: {name}", [f"{key}: {value}" for key, value in brief.items()] or ["recorded"])
        for name, brief in summary["other_stages"].items()
        if not reported.get(name, False)
    ]


def _run_time_sections(report, summary: dict) -> list[Section]:
    timings = summary["timings"]
    lines = [", ".join(f"{k.removesuffix('_s')} {v:.0f} s" for k, v in timings.items())]
    if report.expected:
        expected = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in report.expected.items())
        lines.append(f"Expected before the run (jobs/estimate.py): {expected}, {sum(report.expected.values()):.0f} s in all")
    return [Section("Run time", lines)]


# Each builder takes the report and its summary() and returns its sections (none when its stage did not run).
_SECTION_BUILDERS = (
    _summary_sections,
    _gate_sections,
    _probe_sections,
    _calibration_sections,
    _cost_sections,
    _prune_sections,
    _steer_sections,
    _stop_sections,
    _export_sections,
    _other_stage_sections,
    _run_time_sections,
)


def sections(report) -> list[Section]:
    """The report's sections, in order."""
    summary = report.summary()
    return [section for build in _SECTION_BUILDERS for section in build(report, summary)]


def stop_section(stop: dict) -> Section:
    policy, held, never = stop["policy"], stop["heldout"], stop["heldout_never"]
    completion = policy["workload"] == COMPLETION
    units = "prompts" if completion else "problems"
    rule = "never stops" if policy["threshold"] is None else f"{policy['signal']} threshold {policy['threshold']:.4g}"
    if completion:
        header = ["rule", "tokens saved", "value kept", "mean share kept", "precision of shown tokens"]
        keys = ("tokens_saved", "value_kept", "mean_share_kept", "precision_shown")
    else:
        header = ["rule", "chain tokens saved (probes included)", "accuracy", "right answers kept"]
        keys = ("tokens_saved", "accuracy", "right_kept")
    rows = [[name, *[_pct(h[k]) for k in keys]] for name, h in (("certified rule", held), ("no rule", never))]
    return Section(
        f"Stop rule ({policy['workload']})",
        [f"{stop['data']['spec']}: {rule}, certified on the {policy['mode']} mode.", stop["statement"], f"Held-out {units}:"],
        [Table(header, rows)],
    )


# --------------------------------------------------------------------------- Markdown


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def markdown(report) -> str:
    parts = [f"# dyninfer audit: {report.probe.base_model['spec']}", ""]
    for section in sections(report):
        parts.append(f"## {section.title}")
        parts += [""] + [f"- {line}" if len(section.lines) > 1 else line for line in section.lines]
        for table in section.tables:
            parts.append("")
            parts.append("| " + " | ".join(map(_md_cell, table.headers)) + " |")
            parts.append("|" + "---|" * len(table.headers))
            parts += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in table.rows]
        parts.append("")
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------- HTML

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0; }
th, td { padding: 0.2rem 0.6rem; border-bottom: 1px solid #eee; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.fail { color: #b00; font-weight: bold; } .pass { color: #070; font-weight: bold; }
figure img { max-width: 100%; } details { margin: 0.5rem 0; }
"""


def _inline(text: str) -> str:
    """Escape, then turn **bold** into <strong>."""
    escaped = html.escape(text)
    pieces = escaped.split("**")
    return "".join(f"<strong>{p}</strong>" if i % 2 else p for i, p in enumerate(pieces))


def html_page(report, figures: dict[str, bytes]) -> str:
    """A self-contained page: every figure is an embedded PNG (data URI)."""
    spec = html.escape(report.probe.base_model["spec"])
    body = [f"<h1>dyninfer audit: {spec}</h1>"]
    for section in sections(report):
        body.append(f"<section><h2>{html.escape(section.title)}</h2>")
        body += [f"<p>{_inline(line)}</p>" for line in section.lines]
        if section.figure is not None:
            data = base64.b64encode(figures[section.figure]).decode()
            body.append(
                f'<figure id="figure-{section.figure}"><img alt="{html.escape(section.title)}" src="data:image/png;base64,{data}"></figure>'
            )
        for table in section.tables:
            long = len(table.rows) > 12
            if long:
                body.append(f"<details><summary>{len(table.rows)} rows</summary>")
            body.append("<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in table.headers) + "</tr></thead><tbody>")
            for row in table.rows:
                cells = []
                for cell in row:
                    css = ' class="fail"' if cell == "FAIL" else ' class="pass"' if cell == "pass" else ""
                    cells.append(f"<td{css}>{html.escape(str(cell))}</td>")
                body.append("<tr>" + "".join(cells) + "</tr>")
            body.append("</tbody></table>" + ("</details>" if long else ""))
        body.append("</section>")
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>dyninfer audit: {spec}</title>'
        f"<style>{_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )

"""`dyninfer bench`: the dynamic model against the full model, side by side, with CI gates."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.table import Table

from dyninfer.cli import options as opt
from dyninfer.cli.output import gates_failed, handle_errors, notes, print_json, progress_reporter, stdout
from dyninfer.core.choices import COMPLETION
from dyninfer.jobs.configs import BenchConfig

if TYPE_CHECKING:  # the jobs load torch: a command imports its job when it runs (fast --help)
    from dyninfer.profilers.bench import BenchResult
    from dyninfer.profilers.stop_bench import StopBenchResult

DEFAULTS = BenchConfig()

HELP = """Benchmark the artifact's dynamic model against the full model in one run (batch 1, greedy).

Same prompts for every mode: the starts of held-out windows of the calibration's own split (never text it calibrated on), with its prompt and continuation lengths when it certified generations. the full model through transformers with its KV cache (the baseline), the calibrated early exit, lossless self-speculation, and the dynamic code path with exits disabled. Reports tokens/s, speedup, consistency with the baseline (tokens, shared prefix, ROUGE-L; the certified bound beside the calibration's measure), perplexity of the output under the full model, and realized vs predicted speedup.

With --backend onnx the rows are: transformers on the original model (the reference for consistency and perplexity), optimum's ORTModelForCausalLM in fp32 and, for a quantized package, at its precision (the package's baseline exports), the package with its exits and with exits disabled, and onnxruntime-genai's int4 export of the same model (its builder's defaults, run by its own runtime) where onnxruntime-genai is at hand (--genai-python, or importable here; else a note says how). Every row reports tokens/s, the prefill's time and the decode's tokens/s apart, and its fidelity fed the original model's continuations (same top-1, mean and 99th-percentile KL, perplexity ratio). Speedups (and --min-speedup) are against optimum at the package's precision; every row is also given against each optimum row, with its perplexity change and its peak RSS (each row measured alone, in a process that imports only its runtime; --no-memory skips it). The bound shown is the package's own certificate (`export --certify`) or, marked as such, calibration's on the torch model.

Exit codes: 0 pass, 1 a gate (--min-speedup, --min-consistency) failed, 2 bad input.

Examples:

    dyninfer bench audit/

    dyninfer bench audit/ --prompts 16 --new-tokens 128 --json

    dyninfer bench audit/ --min-speedup 1.1 --min-consistency 0.9    (CI gate)

    dyninfer bench audit/ --backend onnx    (after `dyninfer export audit/`: vs optimum's ORTModelForCausalLM)

    dyninfer bench audit/ --backend onnx --package audit-int4/ --json    (an int4 package vs optimum fp32 and int4)

    dyninfer bench audit/ --backend onnx --genai-python ~/genai-venv/bin/python    (and onnxruntime-genai's int4 export)

    dyninfer bench audit/ --stop completion --prompts 32 --min-speedup 1.5    (after `dyninfer stop`: seconds per request, value kept)
"""  # noqa: E501 (help paragraphs are one line each: Typer keeps line breaks)


def _maybe(value, form: str) -> str:
    return "-" if value is None else form.format(value)


def render(result: BenchResult) -> None:
    title = f"{result.prompts} prompts × {result.new_tokens} new tokens, batch 1, KV of skipped layers: {result.kv_mode}"
    table = Table(box=box.SIMPLE_HEAD, title=title, title_justify="left")
    ratios = list(result.modes[0].ratios)  # the ONNX bench: each row against every optimum row
    memory = any(m.memory for m in result.modes)
    fidelity = any(m.fidelity for m in result.modes)
    speedup = f"speedup vs {result.speedup_reference}" if result.speedup_reference else "speedup"
    columns = ["mode", "tokens/s", "prefill ms", "decode tok/s", speedup, *[r for r in ratios if r != f"vs {result.speedup_reference}"]]
    columns += ["consistency", "shared prefix", "rougeL", "perplexity", *(["Δ perplexity"] if ratios else [])]
    columns += ["same top-1", "mean KL", "KL p99", "ppl ratio"] if fidelity else []
    columns += ["mean exit layer", *(["peak RSS (model)"] if memory else []), *([] if ratios else ["draft acceptance"])]
    for name in columns:
        table.add_column(name, justify="left" if name == "mode" else "right")
    for m in result.modes:
        row = [
            m.mode,
            f"{m.tokens_per_s:.1f}",
            _maybe(m.prefill_ms, "{:.0f}"),
            _maybe(m.decode_tokens_per_s, "{:.1f}"),
            f"{m.speedup:.3f}x",
        ]
        row += [f"{m.ratios[r]:.3f}x" for r in ratios if r != f"vs {result.speedup_reference}"]
        row += [f"{m.consistency:.1%}", f"{m.prefix_agreement:.1%}", f"{m.rouge_l:.1%}", f"{m.perplexity:.3g}"]
        row += [f"{m.perplexity_change:+.1%}"] if ratios else []
        if fidelity:
            f = m.fidelity or {}
            row += [_maybe(f.get("same_top1"), "{:.1%}"), _maybe(f.get("mean_kl"), "{:.4f}"), _maybe(f.get("kl_p99"), "{:.3f}")]
            row += [_maybe(f.get("perplexity_ratio"), "{:.4f}")]
        row += [f"{m.mean_exit_layer:.1f}"]
        if memory:
            row += ["-" if not m.memory else f"{m.memory['peak_rss_mib']:.0f} MiB ({m.memory['model_rss_mib']:.0f})"]
        row += [] if ratios else ["-" if m.acceptance is None else f"{m.acceptance:.1%}"]
        table.add_row(*row)
    stdout.print(table)
    c = result.certified
    if c and c.get("bound") is not None:
        where = c.get("computed_on")
        where = "by calibrate" if where is None else ("on the package" if where == "package" else f"on {where}")
        what = "same top-1 as the original model" if c["measure"] == "top1" else f"{c['measure']} consistency"
        stdout.print(
            f"certified {where} ({c['risk']} risk): {what} >= {c['bound']:g} with "
            f"probability >= {1 - c['epsilon']:g}; measured here ({c['mode']}): {c['measured']:.1%}"
        )
    overhead = [f"{m.mode} {m.host_overhead:.1%}" for m in result.modes if m.host_overhead is not None]
    if overhead:
        stdout.print(f"decoding time outside ONNX Runtime (Python, binding, checks): {', '.join(overhead)}")
    if result.predicted_speedup:
        early = result.gated
        stdout.print(
            f"{early.mode}: realized {early.speedup:.3f}x vs predicted {result.predicted_speedup:.3f}x "
            f"({result.predicted_unit} model) = {early.speedup / result.predicted_speedup:.2f}"
        )
    notes(result.notes)


def render_stop(result: StopBenchResult) -> None:
    title = f"{result.workload} stop rule: {result.prompts} held-out requests, up to {result.new_tokens} new tokens, batch 1, greedy"
    table = Table(box=box.SIMPLE_HEAD, title=title, title_justify="left")
    quality = ("value_kept", "mean_share_kept", "precision_shown") if result.workload == COMPLETION else ("accuracy", "right_kept")
    for name in (
        "runner",
        "s/request",
        "vs baseline",
        "tokens/request",
        "tokens saved",
        *[q.replace("_", " ") for q in quality],
        "ended by",
    ):
        table.add_column(name, justify="left" if name in ("runner", "ended by") else "right")
    for r in [result.baseline, *result.runners]:
        ended = ", ".join(f"{k} {v}" for k, v in r.ended.items()) or "-"
        table.add_row(
            r.name,
            f"{r.seconds_per_request:.3f}",
            f"{r.request_speedup:.2f}x",
            f"{r.tokens_per_request:.1f}",
            f"{r.tokens_saved:.1%}",
            *[f"{r.quality[q]:.1%}" for q in quality],
            ended,
        )
    stdout.print(table)
    notes(result.notes)


@handle_errors
def bench(
    artifact: opt.ArtifactDir,
    data: Annotated[str | None, typer.Option("--data", "-d", help="Prompt source (default: the calibration's data).")] = DEFAULTS.data,
    field: opt.TextField = DEFAULTS.field,
    prompts: opt.Prompts = DEFAULTS.prompts,
    prompt_tokens: Annotated[
        int | None, typer.Option("--prompt-tokens", help="Tokens per prompt (default: the calibration's, else 64).")
    ] = DEFAULTS.prompt_tokens,
    new_tokens: Annotated[
        int | None, typer.Option("--new-tokens", help="Tokens generated per prompt (default: the calibration's, else 64).")
    ] = DEFAULTS.new_tokens,
    seed: opt.Seed = DEFAULTS.seed,
    model: opt.ModelOverride = DEFAULTS.model,
    kv_mode: opt.KvMode = DEFAULTS.kv_mode,
    draft_layer: opt.DraftLayer = DEFAULTS.draft_layer,
    draft_threshold: opt.DraftThreshold = DEFAULTS.draft_threshold,
    min_speedup: Annotated[
        float | None, typer.Option("--min-speedup", help="Gate: early-exit speedup at least this.")
    ] = DEFAULTS.min_speedup,
    min_consistency: Annotated[
        float | None, typer.Option("--min-consistency", help="Gate: early-exit token consistency at least this.")
    ] = DEFAULTS.min_consistency,
    backend: Annotated[
        str, typer.Option("--backend", help="torch, or onnx: the exported package vs optimum's ORT model.")
    ] = DEFAULTS.backend,
    package: Annotated[Path | None, typer.Option("--package", help="ONNX backend: the exported package (default: ARTIFACT/onnx).")] = None,
    memory: Annotated[
        bool, typer.Option("--memory/--no-memory", help="ONNX backend: each row's peak RSS, measured in a process of its own.")
    ] = DEFAULTS.memory,
    provider: opt.Provider = DEFAULTS.provider,
    genai_python: Annotated[
        str | None,
        typer.Option(
            "--genai-python",
            help="ONNX backend: the Python of a virtualenv with onnxruntime-genai; its builder's int4 export of the model "
            "becomes a row (default: this Python when onnxruntime-genai is importable here).",
        ),
    ] = DEFAULTS.genai_python,
    stop: Annotated[
        str | None,
        typer.Option(
            "--stop",
            help="Benchmark the artifact's stop rule (completion or reasoning) on its held-out units: time per request, value kept.",
        ),
    ] = DEFAULTS.stop,
    device: opt.Device = DEFAULTS.device,
    dtype: opt.Dtype = DEFAULTS.dtype,
    device_map: opt.DeviceMap = DEFAULTS.device_map,
    max_memory: opt.MaxMemory = DEFAULTS.max_memory,
    as_json: opt.Json = False,
) -> None:
    from dyninfer.jobs import bench as job

    config = opt.config_from(BenchConfig, locals())
    with progress_reporter() as progress:
        report = job.run(config, artifact, progress=progress)
    if as_json:
        print_json(report.summary())
    elif config.stop is not None:
        render_stop(report.result)
    else:
        render(report.result)
    gates_failed(report.gates_failed)

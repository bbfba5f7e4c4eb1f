"""`dyninfer profile`: what each layer costs on this machine."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from dyninfer.cli import options as opt
from dyninfer.cli.output import handle_errors, notes, run_and_save, stdout
from dyninfer.jobs.configs import ProfileConfig

if TYPE_CHECKING:  # the jobs load torch: a command imports its job when it runs (fast --help)
    from dyninfer.jobs import profile as job

DEFAULTS = ProfileConfig()

HELP = """Per-layer cost on this machine: parameters, FLOPs, memory, latency, GPU power and energy.

For the embedding, each decoder layer's attention and MLP (Mamba: mixer) and the rest of the layer (norms, residual adds), the final norm and the LM head: parameters and weight bytes; FLOPs per token of a prefill and of one decode step at --context tokens of cache (torch.utils.flop_counter: matmuls and attention); the KV cache each layer holds; the peak activation bytes allocated inside each piece during the prefill; and latency, prefill and decode separately (warm-up, then median and 10th-90th percentiles over repeats, batch 1).

On a GPU (--device cuda) it adds, through NVML: device, driver, memory used, utilization, instant and average power, and energy per token from the total-energy counter over windows of --energy-seconds. Without a GPU or NVML it says why and still gives the CPU figures.

With --out, the measured decode cost goes into the artifact: `calibrate` on it then chooses exit points by this machine's latency instead of FLOPs.

Examples:

    dyninfer profile    (bundled model, CPU or the GPU when there is one)

    dyninfer profile --device cuda --energy-seconds 5 --out audit/

    dyninfer profile ./my-model --context 1024 --repeats 50 --json
"""  # noqa: E501 (help paragraphs are one line each: Typer keeps line breaks)


def _mb(n: float) -> str:
    return f"{n / 2**20:.2f}"


def render(report: job.ProfileReport) -> None:
    p = report.profile
    pieces = p.pieces
    blocks = [b for b in pieces.loc[pieces["layer"] >= 0, "piece"].unique() if b != "rest"]
    table = Table(
        title=f"Profile: {escape(report.base_model['spec'])} on {p.device} ({p.dtype}), context {p.context}, "
        f"median of {p.repeats} after {p.warmup} warm-up",
        title_justify="left",
        box=box.SIMPLE_HEAD,
    )
    table.add_column("piece")
    table.add_column("params", justify="right")
    table.add_column("weights MiB", justify="right")
    for block in blocks:
        table.add_column(f"{block} MFLOP", justify="right")
    table.add_column("decode MFLOP", justify="right")
    table.add_column("KV KiB", justify="right")
    table.add_column("act. KiB", justify="right")
    for block in blocks:
        table.add_column(f"{block} ms", justify="right")
    table.add_column("decode ms (p10-p90)", justify="right")
    table.add_column("prefill ms", justify="right")

    def add(name: str, rows) -> None:
        total = rows.sum(numeric_only=True)
        spread = "" if len(rows) > 1 else f" ({rows.iloc[0].decode_ms_p10:.3f}-{rows.iloc[0].decode_ms_p90:.3f})"
        cells = [name, f"{int(total.params):,}", _mb(total.weight_bytes)]
        cells += [f"{rows.loc[rows.piece == b, 'decode_flops'].sum() / 1e6:.3f}" for b in blocks]
        cells += [f"{total.decode_flops / 1e6:.3f}", f"{total.cache_bytes / 1024:.0f}", f"{rows['activation_bytes'].max() / 1024:.0f}"]
        cells += [f"{rows.loc[rows.piece == b, 'decode_ms'].sum():.3f}" for b in blocks]
        cells += [f"{total.decode_ms:.3f}{spread}", f"{total.prefill_ms:.2f}"]
        table.add_row(*cells)

    for name, rows in p.grouped():
        add(name, rows)
    stdout.print(table)
    t = p.totals()
    stdout.print(
        f"whole model: {t['params']:,} parameters, {_mb(t['weight_bytes'])} MiB of weights, "
        f"{t['decode_flops'] / 1e6:.1f} MFLOPs per decoded token, KV cache {t['cache_bytes'] / 2**20:.2f} MiB "
        f"at {p.context} tokens"
    )
    stdout.print(
        f"decode step {p.decode_step_ms['median']:.2f} ms (p10-p90 {p.decode_step_ms['p10']:.2f}-"
        f"{p.decode_step_ms['p90']:.2f}) = {t['decode_tokens_per_s']:.1f} tokens/s; prefill of {p.context} "
        f"tokens {p.prefill_ms['median']:.1f} ms = {t['prefill_tokens_per_s']:.0f} tokens/s; the LM head is "
        f"{t['head_share_of_decode_ms']:.1%} of a decode step"
    )
    gpu = report.gpu
    if not gpu.available:
        stdout.print(f"GPU: {gpu.reason}")
    else:
        d = gpu.device
        memory = f"{d.memory_used_bytes / 2**30:.1f}/{d.memory_total_bytes / 2**30:.1f} GiB" if d.memory_total_bytes else "?"
        stdout.print(
            f"GPU {d.index}: {d.name}, driver {d.driver}, memory {memory}, utilization {d.utilization_percent}%, power {d.power_w} W"
        )
        for e in gpu.energy:
            per_token = "n/a" if e.joules_per_token is None else f"{e.joules_per_token * 1000:.2f} mJ/token"
            average = "n/a" if e.average_power_w is None else f"{e.average_power_w:.0f} W average"
            stdout.print(f"  {e.label}: {per_token}, {average} over {e.seconds:.1f} s ({e.tokens} tokens; {e.source})")
    notes(p.notes)


@handle_errors
def profile(
    model: opt.Model = DEFAULTS.model,
    data: Annotated[str, typer.Option("--data", "-d", help="Where the prompt comes from (see `dyninfer probe --help`).")] = DEFAULTS.data,
    field: opt.TextField = DEFAULTS.field,
    context: Annotated[
        int, typer.Option("--context", "-c", help="Prompt tokens of the prefill, and cached tokens before the decode step.")
    ] = DEFAULTS.context,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed runs before timing.")] = DEFAULTS.warmup,
    repeats: Annotated[int, typer.Option("--repeats", "-r", help="Timed runs (median and 10th-90th percentiles).")] = DEFAULTS.repeats,
    energy_seconds: opt.EnergySeconds = DEFAULTS.energy_seconds,
    seed: opt.Seed = DEFAULTS.seed,
    out: opt.out_dir(
        "Artifact dir to write/extend (measured cost for calibrate) plus profile/ (pieces.csv, .parquet, summary.json, profile.png)."
    ) = None,
    device: opt.Device = DEFAULTS.device,
    dtype: opt.Dtype = DEFAULTS.dtype,
    device_map: opt.DeviceMap = DEFAULTS.device_map,
    max_memory: opt.MaxMemory = DEFAULTS.max_memory,
    as_json: opt.Json = False,
) -> None:
    from dyninfer.jobs import profile as job

    config = opt.config_from(ProfileConfig, locals())
    run_and_save(
        config,
        job.run,
        job.save,
        render,
        out=out,
        as_json=as_json,
        wrote=lambda target, _: f"wrote {target} (measured cost in dyninfer.json) and {target / job.REPORT_DIR}/",
    )

"""`dyninfer stop`: a stop rule for completions or chains of thought, certified by Learn-then-Test."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from dyninfer.cli import options as opt
from dyninfer.cli.output import handle_errors, notes, run_and_save, stdout
from dyninfer.core.choices import COMPLETION
from dyninfer.jobs.configs import StopConfig

if TYPE_CHECKING:
    from dyninfer.jobs import stop as job

DEFAULTS = StopConfig()

HELP = """Stop generating what nobody will use: a stop rule for completions or chains of thought, certified by Learn-then-Test.

completion: prompts are the starts of corpus windows and the reference is the text that really follows. A completion's value is its longest prefix matching the reference (--value-unit tokens, characters or lines). The rule stops before the first generated token whose score falls below a threshold: the final layer's max probability (confidence) or the product of those so far (prefix). The guarantee: the rule keeps at least TARGET of each valuable completion's value on average (--condition valued; all: averaged over every prompt), with probability at least 1 - EPSILON.

reasoning: problems with known answers (builtin:arithmetic[:K], or a .jsonl with question and answer). At each step boundary of the chain a probe forces "The answer is" and reads the trial answer; the rule stops at the first probe confident enough (confidence), or confident and equal to the previous one (stable), and answers. The guarantee: it keeps at least TARGET of the full chain's right answers. The probes' tokens count in the cost.

Fit, calibration and held-out units are disjoint and drawn at random; the fit units choose the signal (--signal auto) and the candidate thresholds, the calibration units certify one, the held-out units report tokens saved, value kept and precision. The rule is certified on the model the artifact describes (its steering, pruning and tuning baked in); `run` and `bench` obey it.

Examples:

    dyninfer stop --out audit/    (bundled model, completions of builtin:stdlib-code, 64 + 64 tokens)

    dyninfer stop --data builtin:pydocs --value-unit characters --target 0.9 --out audit/

    dyninfer stop --workload reasoning --data builtin:arithmetic:1 --prompts 400 --out audit/

    dyninfer steer apply audit/ --alpha 0.2 && dyninfer stop --workload reasoning --out audit/    (the valve and the stop together)
"""  # noqa: E501 (help paragraphs are one line each: Typer keeps line breaks)


def render(report: job.StopReport) -> None:
    cert, policy = report.certificate, report.policy
    units = "prompts" if policy.workload == COMPLETION else "problems"
    stdout.print(f"[bold]Stop rule ({policy.workload})[/]: {escape(report.base_model['spec'])} on {escape(report.data['spec'])}")
    stdout.print(escape(policy.describe()))
    stdout.print(escape(cert.statement()))
    fit = ", ".join(f"{s}: {f['tokens_saved']:.1%} saved" for s, f in report.fit.items())
    stdout.print(f"[dim]signal chosen on the fit {units} ({fit}); {len(cert.ltt.lambdas)} candidates tested in fixed sequence.[/]")
    table = Table(box=box.SIMPLE_HEAD, title=f"held-out {units}, with and without the rule", title_justify="left")
    if policy.workload == COMPLETION:
        columns = ("rule", "tokens saved", "value kept", "mean share kept", "precision of shown tokens")
        keys = ("tokens_saved", "value_kept", "mean_share_kept", "precision_shown")
    else:
        columns = ("rule", "chain tokens saved (probes included)", "accuracy", "right answers kept", "tokens per problem")
        keys = ("tokens_saved", "accuracy", "right_kept", "mean_tokens_spent")
    for name in columns:
        table.add_column(name, justify="left" if name == "rule" else "right")
    for name, held in (("certified rule", cert.heldout), ("no rule", cert.heldout_never)):
        table.add_row(name, *[f"{held[k]:.1f}" if k == "mean_tokens_spent" else f"{held[k]:.2%}" for k in keys])
    stdout.print(table)
    notes(report.notes)


@handle_errors
def stop(
    model: opt.Model = DEFAULTS.model,
    workload: Annotated[
        str, typer.Option("--workload", "-w", help="completion (corpus prefixes) or reasoning (problems with answers).")
    ] = DEFAULTS.workload,
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            "-d",
            help="completion: builtin:stdlib-code (default), builtin:pydocs, a text file, hf:...; "
            "reasoning: builtin:arithmetic[:K] (default 2-4 operations) or a .jsonl with question and answer.",
        ),
    ] = DEFAULTS.data,
    field: opt.TextField = DEFAULTS.field,
    signal: Annotated[
        str,
        typer.Option(
            "--signal", help="auto (the one that saves most on the fit units), confidence, prefix (completion), stable (reasoning)."
        ),
    ] = DEFAULTS.signal,
    target: Annotated[
        float, typer.Option("--target", "-t", help="Share of the value (completion) or of the right answers (reasoning) to keep.")
    ] = DEFAULTS.target,
    epsilon: opt.Epsilon = DEFAULTS.epsilon,
    condition: Annotated[
        str, typer.Option("--condition", help="valued: the guarantee is about units with something to lose; all: about every unit.")
    ] = DEFAULTS.condition,
    value_unit: Annotated[
        str, typer.Option("--value-unit", help="completion value: matching prefix in tokens, characters or lines.")
    ] = DEFAULTS.value_unit,
    prompt_tokens: opt.PromptTokens = DEFAULTS.prompt_tokens,
    new_tokens: Annotated[int, typer.Option("--new-tokens", help="completion: tokens per completion.")] = DEFAULTS.new_tokens,
    fit_prompts: Annotated[int, typer.Option("--fit-prompts", help="Units that choose the signal and thresholds.")] = DEFAULTS.fit_prompts,
    prompts: Annotated[int, typer.Option("--prompts", help="Calibration units (Learn-then-Test's examples).")] = DEFAULTS.prompts,
    heldout_prompts: Annotated[
        int, typer.Option("--heldout-prompts", help="Held-out units that report what the rule does.")
    ] = DEFAULTS.heldout_prompts,
    mode: Annotated[
        str, typer.Option("--mode", help="The generation to certify on: full, or early-exit (the artifact's exits).")
    ] = DEFAULTS.mode,
    chain_tokens: Annotated[int, typer.Option("--chain-tokens", help="reasoning: the chain's token budget.")] = DEFAULTS.chain_tokens,
    probe_tokens: Annotated[int, typer.Option("--probe-tokens", help="reasoning: tokens a trial answer may take.")] = DEFAULTS.probe_tokens,
    shots: Annotated[int, typer.Option("--shots", help="reasoning: worked examples in each prompt.")] = DEFAULTS.shots,
    probe_at: Annotated[
        str,
        typer.Option("--probe-at", help="reasoning: probe at sentence or line ends (auto: the one that saves most on the fit units)."),
    ] = DEFAULTS.probe_at,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Prompts generated together in the full mode (each as it would be alone).")
    ] = DEFAULTS.batch_size,
    seed: opt.Seed = DEFAULTS.seed,
    out: opt.out_dir("Artifact dir to write/extend (the rule in dyninfer.json, and stop-WORKLOAD/ with the curve).") = None,
    device: opt.Device = DEFAULTS.device,
    dtype: opt.Dtype = DEFAULTS.dtype,
    device_map: opt.DeviceMap = DEFAULTS.device_map,
    max_memory: opt.MaxMemory = DEFAULTS.max_memory,
    as_json: opt.Json = False,
) -> None:
    from dyninfer.jobs import stop as job

    config = opt.config_from(StopConfig, locals())
    run_and_save(
        config,
        job.run,
        job.save,
        render,
        out=out,
        as_json=as_json,
        wrote=lambda target, report: (
            f"wrote {target} (stop rule in dyninfer.json) and {target / (job.REPORT_DIR + '-' + report.policy.workload)}/"
        ),
    )

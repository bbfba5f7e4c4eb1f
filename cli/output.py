"""Shared CLI plumbing: consoles, progress bars, JSON output, one-line errors with the command's flags."""

from __future__ import annotations

import contextvars
import functools
import json
import sys
import time
import typing
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import MappingProxyType
from typing import Any

import typer
from rich.console import Console
from rich.errors import MarkupError
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from typer.models import ArgumentInfo, OptionInfo

from dyninfer.core.artifact_files import check_output_dir
from dyninfer.core.errors import OPTION_REFERENCE, DyninferError
from dyninfer.core.progress import ProgressFn, silent
from dyninfer.jobs import writer as jobs_writer

EXIT_OK, EXIT_GATE_FAILED, EXIT_BAD_INPUT = 0, 1, 2
_BLOCKS = " ▁▂▃▄▅▆▇█"


class _Console(Console):
    """A rich console that never lets the text it shows rewrite itself: no emoji codes (`:a:` in a path), and a
    line whose user-given part reads as broken markup (`[/]` in a path) is shown as written instead of crashing."""

    def __init__(self, **kwargs):
        super().__init__(emoji=False, **kwargs)

    def print(self, *objects, **kwargs):
        try:
            super().print(*objects, **kwargs)
        except MarkupError:
            super().print(*objects, **{**kwargs, "markup": False})


# Off a terminal (CI logs, files) rich would assume 80 columns and squeeze wide tables.
stdout = _Console(soft_wrap=True, width=None if sys.stdout.isatty() else 140)
stderr = _Console(stderr=True, soft_wrap=True)
# The running command's field -> flag names (set by `handle_errors`), for messages from the library.
_command_flags: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar("command_flags", default=MappingProxyType({}))


def flag_names(command: Callable) -> dict[str, str]:
    """Config field name -> the command's flag (`fit_tokens` -> --fit-tokens, `no_verify` -> --no-verify).

    Read from the command's parameters: a parameter named like a field maps by its name, and by
    its flag's own spelling (`tokens` for --tokens), so a nested stage's field reaches the flag the
    command gives it. Arguments map to their metavar (`artifact` -> ARTIFACT).
    """
    mapping: dict[str, str] = {}
    for name, hint in typing.get_type_hints(command, include_extras=True).items():
        for info in getattr(hint, "__metadata__", ()):
            if isinstance(info, ArgumentInfo):
                mapping[name] = name.upper()
            elif isinstance(info, OptionInfo):
                # In `Annotated`, typer.Option's first argument (its `default` slot) is the first flag.
                decls = [info.default, *(info.param_decls or ())] if isinstance(info.default, str) else list(info.param_decls or ())
                spellings = [part for decl in decls for part in decl.split("/") if part.startswith("--")] or [f"--{name.replace('_', '-')}"]
                for spelling in spellings:
                    mapping[spelling[2:].replace("-", "_")] = spelling
                mapping[name] = spellings[0]
    return mapping


def with_flags(message: str) -> str:
    """A library message with each named field shown as the flag the running command gives it."""
    names = _command_flags.get()
    return OPTION_REFERENCE.sub(lambda m: names.get(m.group(1), m.group(0)), message)


def fail(message: str) -> None:
    """Print a one-line error on stderr and exit with the bad-input code."""
    first_line = " ".join(with_flags(str(message)).split())
    stderr.print(f"[bold red]error:[/] {escape(first_line)}", highlight=False, markup=True)
    raise typer.Exit(EXIT_BAD_INPUT)


def handle_errors(command: Callable) -> Callable:
    """Turn DyninferError (anything the user can fix) into a one-line error and exit 2."""

    names = flag_names(command)

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        token = _command_flags.set(names)
        try:
            return command(*args, **kwargs)
        except DyninferError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            stderr.print("interrupted")
            raise typer.Exit(130) from None
        finally:
            _command_flags.reset(token)

    return wrapper


def gates_failed(failures: list[str]) -> None:
    """Name each failed CI gate on stderr and exit with the gate code (nothing when all passed)."""
    for failure in failures:
        stderr.print(f"[bold red]gate failed:[/] {escape(with_flags(failure))}", highlight=False)
    if failures:
        raise typer.Exit(EXIT_GATE_FAILED)


def notes(lines: list[str], console: Console = stdout) -> None:
    for line in lines:
        console.print(f"[yellow]note:[/] {escape(with_flags(line))}")


def time_left(elapsed: float, done: int, total: int) -> str:
    """The suffix of a progress line: ", 12 s elapsed, about 30 s left" at the pace so far; nothing before the first
    step; once done, how long it took."""
    if done <= 0 or total <= 0:
        return ""
    if done >= total:
        return f", {duration(elapsed)}"
    return f", {duration(elapsed)} elapsed, about {duration(elapsed * (total - done) / done)} left"


def duration(seconds: float) -> str:
    """ "42 s" or "3 min 5 s"."""
    seconds = max(0, round(seconds))
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"


@contextmanager
def progress_reporter(enabled: bool = True) -> Iterator[ProgressFn]:
    """A `progress(description, done, total)` callback for long work, drawn on stderr.

    On a terminal: transient progress bars with the time elapsed and an estimate of the time left.
    Otherwise (CI logs, pipes): one plain line when a stage starts, at each further tenth (with the
    time elapsed and, at the pace so far, the time left), and when it ends. A description "task — state"
    is one task whose state changes (a training loss): its bar, or its next line, shows the latest.
    """
    if not enabled:
        yield silent
        return
    if not stderr.is_terminal:
        last_tenth: dict[str, int] = {}
        started: dict[str, float] = {}
        last_done: dict[str, int] = {}
        last_report = [time.monotonic()]

        def log_line(description: str, done: int, total: int) -> None:
            tenth = (10 * done) // max(total, 1)
            task = description.partition(" — ")[0]
            now = time.monotonic()
            # A task heard of anew (or starting over: the same words for the next target) with work already done
            # started when the work before it ended.
            if task not in started or done < last_done[task]:
                started[task] = now if done == 0 else last_report[0]
                last_tenth.pop(task, None)
            last_done[task], last_report[0] = done, now
            if last_tenth.get(task) != tenth:
                last_tenth[task] = tenth
                timing = time_left(now - started[task], done, total)
                stderr.print(f"{description}: {done}/{total}{timing}", highlight=False, markup=False)

        yield log_line
        return
    bars = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
        console=stderr,
        transient=True,
    )
    tasks: dict[str, int] = {}

    def report(description: str, done: int, total: int) -> None:
        task = description.partition(" — ")[0]
        if task not in tasks:
            tasks[task] = bars.add_task(description, total=total)
        bars.update(tasks[task], completed=done, total=total, description=description)

    with bars:
        yield report


def check_out_dir(out) -> None:
    """Refuse an --out that cannot become an artifact before any long work (the save checks again)."""
    if out is not None:
        check_output_dir(out)


def run_and_save(config, run: Callable, save: Callable, render: Callable, *, out, as_json: bool, wrote: Callable[[Path, Any], str]):
    """How a command that writes an artifact ends: the options and `--out` checked before any work, the job run
    with progress (extending the artifact at `out`), the artifact saved (saying what was written, `wrote(target,
    report)`), then the summary as JSON or rendered. Returns the report."""
    config.validate()
    check_out_dir(out)
    with progress_reporter() as progress:
        report, target = jobs_writer.run_and_save(run, save, config, out, progress=progress, on_wait=waiting(out))
    if target is not None:
        stderr.print(wrote(Path(target), report), markup=False, highlight=False)
    if as_json:
        print_json(report.summary())
    else:
        render(report)
    return report


def writing(out):
    """The artifact at `out` is this command's from before it is read until it is saved (`jobs.writer.writing`):
    another command writing it waits, and says so."""
    return jobs_writer.writing(out, on_wait=waiting(out))


def waiting(out) -> Callable[[], None]:
    """What a save says when another dyninfer process is writing the same artifact and it waits."""
    return lambda: stderr.print(f"waiting: another dyninfer process is writing {out}", highlight=False, markup=False)


def print_json(data) -> None:
    """Machine output: JSON on stdout and nothing else there."""
    sys.stdout.write(json.dumps(data, indent=2, default=_jsonable) + "\n")
    sys.stdout.flush()


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def sparkline(values, low: float = 0.0, high: float = 1.0) -> str:
    """One character per value, scaled between low and high."""
    span = (high - low) or 1.0
    out = []
    for v in values:
        level = int(round((min(max(v, low), high) - low) / span * (len(_BLOCKS) - 1)))
        out.append(_BLOCKS[level])
    return "".join(out)


def memory_line(placement: dict | None, memory: dict | None) -> str:
    """Where the model ran and the process's peak memory, for a report's last lines."""
    where = f"{placement['device']}, {placement['dtype']}" if placement else "?"
    if not memory:
        return f"model on {where}"
    cuda = f", peak CUDA {memory['peak_cuda_mib']:.0f} MiB" if memory.get("peak_cuda_mib") is not None else ""
    return f"model on {where}: weights {memory.get('weights_mib', 0):.0f} MiB, peak RSS {memory['peak_rss_mib']:.0f} MiB{cuda}"

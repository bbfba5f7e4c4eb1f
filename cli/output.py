"""Shared CLI plumbing: consoles, progress bars, JSON output and one-line errors."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dyninfer.errors import DyninferError

EXIT_OK, EXIT_GATE_FAILED, EXIT_BAD_INPUT = 0, 1, 2

# Off a terminal (CI logs, files) rich would assume 80 columns and squeeze wide tables.
stdout = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 140)
stderr = Console(stderr=True, soft_wrap=True)


def fail(message: str) -> None:
    """Print a one-line error on stderr and exit with the bad-input code."""
    first_line = " ".join(str(message).split())
    stderr.print(f"[bold red]error:[/] {first_line}", highlight=False, markup=True)
    raise typer.Exit(EXIT_BAD_INPUT)


def handle_errors(command: Callable) -> Callable:
    """Turn DyninferError (anything the user can fix) into a one-line error and exit 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except DyninferError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            stderr.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


@contextmanager
def progress_reporter(enabled: bool = True) -> Iterator[Callable[[str, int, int], None]]:
    """A `progress(description, done, total)` callback for long work, drawn on stderr.

    On a terminal: transient progress bars. Otherwise (CI logs, pipes): one plain line
    when a stage starts, at each further tenth, and when it ends.
    """
    if not enabled:
        yield lambda *a: None
        return
    if not stderr.is_terminal:
        last_tenth: dict[str, int] = {}

        def log_line(description: str, done: int, total: int) -> None:
            tenth = (10 * done) // max(total, 1)
            if last_tenth.get(description) != tenth:
                last_tenth[description] = tenth
                stderr.print(f"{description}: {done}/{total}", highlight=False, markup=False)

        yield log_line
        return
    bars = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=stderr, transient=True,
    )
    tasks: dict[str, int] = {}

    def report(description: str, done: int, total: int) -> None:
        if description not in tasks:
            tasks[description] = bars.add_task(description, total=total)
        bars.update(tasks[description], completed=done, total=total)

    with bars:
        yield report


def artifact_dir_option(out) -> str | None:
    """Validate an --out artifact directory before any long work; None when not given."""
    if out is None:
        return None
    if out.exists() and not out.is_dir():
        raise DyninferError(f"--out '{out}' is a file; pass a directory")
    return str(out)


def number_list(text: str | None, option: str, kind=float, example: str = "0.25,0.4,0.5") -> list:
    """Comma-separated numbers of an option ("0.25,0.4,0.5"); [] when not given."""
    if not text:
        return []
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DyninferError(f"{option} takes comma-separated numbers like {example}, got '{text}'") from None


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

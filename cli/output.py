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

stdout = Console(soft_wrap=True)
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
    """A `progress(description, done, total)` callback drawing bars on stderr (terminals only)."""
    show = enabled and stderr.is_terminal
    bars = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=stderr, transient=True, disable=not show,
    )
    tasks: dict[str, int] = {}

    def report(description: str, done: int, total: int) -> None:
        if description not in tasks:
            tasks[description] = bars.add_task(description, total=total)
        bars.update(tasks[description], completed=done, total=total)

    with bars:
        yield report


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

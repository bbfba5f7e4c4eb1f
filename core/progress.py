"""Progress reporting: long work calls `progress(description, done, total)`; the CLI draws it."""

from __future__ import annotations

from collections.abc import Callable

ProgressFn = Callable[[str, int, int], None]


def silent(description: str, done: int, total: int) -> None:
    """The progress callback of a caller that does not watch."""

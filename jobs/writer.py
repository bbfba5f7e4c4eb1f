"""One writer at a time: a job that extends an artifact holds its writer lock from before it reads the artifact
until its result is saved, so concurrent writers (commands or library calls) queue, and each extends the version
the last one saved (core/file_locks.py). Torch-free: the CLI takes it before a job loads."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from dyninfer.core.file_locks import writer_lock
from dyninfer.core.progress import ProgressFn


@contextmanager
def writing(out, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """The artifact at `out` (None: nothing is written) is this process's until the block ends; `on_wait` is called
    when another writer holds it. Under a launcher only rank 0, the one that saves, takes it (read from the
    launcher's environment: the process group may not be started yet)."""
    if out is None or os.environ.get("RANK", "0") != "0":
        yield
        return
    with writer_lock(out, on_wait=on_wait):
        yield


def run_and_save(run: Callable, save: Callable, config, out, *, progress: ProgressFn | None = None, on_wait=None) -> tuple:
    """Run a job (`run(config, progress=..., existing=out)`) extending the artifact at `out`, and save it there
    (`save(report, out, on_wait)`), as the artifact's one writer. Returns (the report, the saved path or None)."""
    with writing(out, on_wait):
        report = run(config, progress=progress, existing=str(out) if out else None)
        target = save(report, out, on_wait) if out is not None else None
    return report, target

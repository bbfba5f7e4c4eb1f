"""Advisory file locks (flock, POSIX; nothing is locked elsewhere), importable without torch.

The primitives the directory transaction (core/artifact_files.py) builds on, and the writer lock a command
that writes an artifact holds from before it reads it until it saved.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
from collections.abc import Callable, Iterator

try:
    import fcntl
except ImportError:  # not POSIX: no advisory locks
    fcntl = None

from dyninfer.core.artifact_paths import artifact_exists, file_mode

WRITER_LOCK_SUFFIX = ".lock"


def lock_fd(path: pathlib.Path, kind: int) -> int | None:
    """An fd on *path* holding flock *kind* (non-blocking); None if it is held elsewhere or cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def lock_free(path: pathlib.Path) -> bool:
    """True if nobody holds a lock on *path* (a staged folder or writer lock whose process is gone)."""
    fd = lock_fd(path, fcntl.LOCK_EX)
    if fd is None:
        return False
    os.close(fd)
    return True


@contextlib.contextmanager
def writer_lock(path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Held by a command that writes the artifact at *path*, from before it reads the artifact until after it
    saves: writers of one artifact run one after the other, each starting from the version the previous one
    saved, so none loses another's stages. Readers do not take it (they only wait for a swap, `artifact_lock`).

    It is an flock on an empty file beside the artifact (`.NAME.lock`) that the holder removes when done; a
    writer that locked a file removed meanwhile locks the new one instead. Artifacts side by side have their
    own. No fcntl: nothing to lock.
    """
    target = pathlib.Path(os.path.realpath(path))
    if fcntl is None or not target.name or not target.parent.is_dir():
        yield
        return
    lock_file = target.parent / f".{target.name}{WRITER_LOCK_SUFFIX}"
    said = False
    while True:
        try:
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, file_mode())
        except OSError:
            yield  # a place this user cannot write: the save will say so
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None and not said:
                on_wait()
                said = True
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(lock_file).st_ino == os.fstat(fd).st_ino:
                break  # still the file at that name: ours
        except FileNotFoundError:
            pass
        os.close(fd)  # the previous holder removed it after we opened it: lock the new one
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_file)
        os.close(fd)


def stale_writer_lock(directory: pathlib.Path, entry: str) -> bool:
    """`.NAME.lock` beside the artifact NAME (never another tool's file), held by nobody."""
    if not (entry.startswith(".") and entry.endswith(WRITER_LOCK_SUFFIX)):
        return False
    name = entry[1 : -len(WRITER_LOCK_SUFFIX)]
    if not name or not artifact_exists(directory / name):
        return False
    return lock_free(directory / entry)

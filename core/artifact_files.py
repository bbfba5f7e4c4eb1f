"""An artifact's directory on disk: the files it owns, its advisory lock, and the staged copy swapped in.

The filesystem half of an artifact, apart from its schema (core/artifacts.py), and importable
without torch: the CLI checks an output path before any work. A save builds the new version in
a hidden sibling folder, then swaps it in by rename under the artifact's lock, with Ctrl-C and
SIGTERM held for the few renames; files a command does not own (report folders, `onnx/`) are
carried over.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import secrets
import shutil
import signal
import threading
from collections.abc import Callable, Iterator

try:
    import fcntl
except ImportError:  # not POSIX: no advisory locks
    fcntl = None

from dyninfer.core.errors import DyninferError

MANIFEST_NAME = "dyninfer.json"
TENSOR_SUFFIX = ".safetensors"
GROUP_NAME = re.compile(r"[a-z0-9_]+")


def one_line_error(message: str) -> DyninferError:
    """A DyninferError whose message is guaranteed to be a single line."""
    return DyninferError(" ".join(str(message).split()))


def group_of_file(name: str) -> str | None:
    """'exits.safetensors' -> 'exits'; None if *name* is not a group file name."""
    if not name.endswith(TENSOR_SUFFIX):
        return None
    stem = name[: -len(TENSOR_SUFFIX)]
    return stem if GROUP_NAME.fullmatch(stem) else None


def fsync_path(path: pathlib.Path) -> None:
    """Flush a file or directory to disk; best effort (not every filesystem allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def make_temp_dir(parent: pathlib.Path, name: str) -> pathlib.Path:
    # os.mkdir (not tempfile.mkdtemp) so the directory gets the usual umask-based mode,
    # not 0o700: it becomes the artifact directory.
    for _ in range(100):
        tmp = parent / f".{name}.tmp-{secrets.token_hex(6)}"
        try:
            os.mkdir(tmp)
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"could not create a unique temporary directory in {parent}")


def _free_name(parent: pathlib.Path, name: str, kind: str) -> pathlib.Path:
    for _ in range(100):
        p = parent / f".{name}.{kind}-{secrets.token_hex(6)}"
        if not os.path.lexists(p):
            return p
    raise FileExistsError(f"could not find a free {kind} name in {parent}")


def _owned_names(directory: pathlib.Path) -> set[str]:
    """Top-level entries of an existing artifact that the artifact itself owns."""
    owned = {MANIFEST_NAME}
    try:
        manifest = json.loads((directory / MANIFEST_NAME).read_text(encoding="utf-8"))
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if isinstance(files, dict):
            owned.update(str(k) for k in files)
    except (OSError, ValueError):
        pass  # a damaged manifest: fall back to the naming rule below
    for entry in os.listdir(directory):
        if group_of_file(entry) is not None:
            owned.add(entry)
    return owned


def artifact_exists(path) -> bool:
    """True if *path* is a directory containing a dyninfer manifest."""
    p = pathlib.Path(path)
    return p.is_dir() and (p / MANIFEST_NAME).is_file()


def check_output_dir(path, on_wait: Callable[[], None] | None = None, *, locked: bool = False) -> None:
    """Refuse, before any work, an output path that cannot become an artifact: a file, a non-empty
    folder that is not an artifact, a path under a file, or a place this user cannot write.

    It looks under the shared lock (never while another process swaps the directory in), unless
    the caller already holds the lock (`locked`).
    """
    if not locked:
        with artifact_lock(path, shared=True, on_wait=on_wait):
            return check_output_dir(path, locked=True)
    given = pathlib.Path(path)
    shown = str(given)
    if os.path.lexists(given) and not given.is_dir():
        raise one_line_error(
            f"output path {shown!r} exists and is a file, not a dyninfer artifact; choose another output path or remove the file"
        )
    if given.is_dir() and not artifact_exists(given) and any(True for _ in os.scandir(given)):
        raise one_line_error(
            f"output directory {shown!r} is not empty and is not a dyninfer artifact; choose another output path or empty it"
        )
    # The swap renames the target inside its parent: the nearest existing folder above it must be writable.
    above = pathlib.Path(os.path.abspath(given)).parent
    while not os.path.lexists(above):
        above = above.parent
    if not above.is_dir():
        raise one_line_error(f"output path {shown!r} is under {str(above)!r}, which is a file; choose another output path")
    if not os.access(above, os.W_OK | os.X_OK):
        raise one_line_error(f"cannot write into {str(above)!r} (permission denied or read-only); choose another output path")


@contextlib.contextmanager
def artifact_lock(path, *, shared: bool = False, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """An advisory lock for the artifact (or package) at *path*: writers hold it exclusively while they
    swap a new version in, readers shared while they read, so no reader sees a half-swapped directory
    and concurrent writers queue (`on_wait` is called when this one has to wait).

    The lock is on the folder that holds the directory (fcntl.flock, POSIX): it needs no file of its
    own, and the directory itself is replaced by each swap. Saves of artifacts side by side in one
    folder queue only for the moments of their swaps. No folder yet, or no fcntl: nothing to lock.
    """
    parent = pathlib.Path(os.path.realpath(path)).parent
    try:
        fd = os.open(parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if fcntl is not None else None
    except OSError:
        fd = None
    if fd is None:
        yield
        return
    try:
        kind = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, kind)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block is done, then act (in the main thread; elsewhere, as is)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {number: signal.signal(number, lambda number, frame: received.append(number)) for number in held}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if received:
            signal.raise_signal(received[0])


def swap_in(tmp: pathlib.Path, target: pathlib.Path, replaced: set[str] | None) -> None:
    """Make *tmp* the directory at *target* in one rename.

    With `replaced` (a set of relative paths), the entries of an existing *target* that its manifest
    does not own and that `replaced` does not name are carried over into *tmp* first (a folder both
    have is merged); with None, *target* is replaced whole. Any failure or interrupt (BaseException)
    undoes every rename, so *target* is as it was.
    """
    moves: list[tuple[pathlib.Path, pathlib.Path]] = []
    backup = None
    try:
        if os.path.isdir(target):
            if replaced is not None:
                _carry(target, tmp, "", _owned_names(target), replaced, moves)
                with contextlib.suppress(OSError):
                    shutil.copymode(target, tmp)
            backup = _free_name(target.parent, target.name, "bak")
            os.rename(target, backup)
        os.rename(tmp, target)
    except BaseException:
        if backup is not None and not os.path.lexists(target):
            os.rename(backup, target)
            backup = None
        for source, moved_to in reversed(moves):
            with contextlib.suppress(OSError):
                os.rename(moved_to, source)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def _carry(
    old: pathlib.Path, new: pathlib.Path, prefix: str, owned: set[str], replaced: set[str], moves: list[tuple[pathlib.Path, pathlib.Path]]
) -> None:
    """Move *old*'s entries that the new version keeps into *new* (recording each move)."""
    for entry in sorted(os.listdir(old)):
        relative = prefix + entry
        if entry in owned or relative in replaced:
            continue
        source, destination = old / entry, new / entry
        if os.path.lexists(destination):
            if _plain_dir(source) and _plain_dir(destination):  # e.g. steer/ around a new sweep folder
                _carry(source, destination, relative + "/", set(), replaced, moves)
            continue  # the new version's entry wins
        os.rename(source, destination)
        moves.append((source, destination))


def _plain_dir(path: pathlib.Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def relative_folder(name: str) -> str:
    """A report path inside the artifact: relative, no `..`; ValueError otherwise (a programming error)."""
    parts = pathlib.PurePosixPath(name).parts
    if not parts or name.startswith("/") or any(part in ("..", ".") for part in parts) or parts[0] == MANIFEST_NAME:
        raise ValueError(f"report paths are relative paths inside the artifact, got {name!r}")
    return str(pathlib.PurePosixPath(*parts))


def file_mode() -> int:
    """The mode the user's umask gives a new file (0644 under the usual umask 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_file(path: pathlib.Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


@contextlib.contextmanager
def staged_directory(target, lock: bool = True, on_wait: Callable[[], None] | None = None) -> Iterator[pathlib.Path]:
    """Build a directory in a temporary sibling; it replaces `target` whole, in one rename, only if the
    block succeeds. An interrupted or failed build leaves `target` as it was and removes the partial one.

    Inside an artifact (an ONNX package in ARTIFACT/onnx) the swap holds the artifact's lock, so it
    cannot interleave with a save of the artifact around it. `lock=False`: a directory built inside a
    staged copy that no other process can see yet.
    """
    target = pathlib.Path(target)
    tmp = make_temp_dir(target.parent, target.name)
    try:
        yield tmp
        locked = target.parent if artifact_exists(target.parent) else target
        with artifact_lock(locked, on_wait=on_wait) if lock else contextlib.nullcontext(), interrupts_held():
            swap_in(tmp, target, None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

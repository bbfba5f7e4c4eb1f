"""An artifact's directory on disk: the files it owns, its swap lock, and the staged copy swapped in.

The filesystem half of an artifact, apart from its schema (core/artifacts.py), and importable
without torch: the CLI checks an output path before any work. A save builds the new version in a
hidden sibling folder, then swaps it in (`swap_in`: one rename for a new artifact; a journal, the
commit point, and a few renames to replace one) under the artifact's swap lock, with Ctrl-C and
SIGTERM held meanwhile; files a command does not own (report folders, `onnx/`) are carried over.
The next open completes a swap a killed process left and clears its leftovers. A command that
writes holds the artifact's `writer_lock` (core/file_locks.py) from before it reads it until it
saved; names, paths, modes and digests of the files are in core/artifact_paths.py.
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

from safetensors import SafetensorError

from dyninfer.core.artifact_paths import MANIFEST_NAME, artifact_exists, group_of_file, relative_inside
from dyninfer.core.errors import DyninferError
from dyninfer.core.file_locks import WRITER_LOCK_SUFFIX, lock_fd, lock_free, stale_writer_lock


def one_line_error(message: str) -> DyninferError:
    """A DyninferError whose message is guaranteed to be a single line."""
    return DyninferError(" ".join(str(message).split()))


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


@contextlib.contextmanager
def staging_dir(parent: pathlib.Path, name: str) -> Iterator[pathlib.Path]:
    """A hidden sibling folder `.NAME.tmp-*` to build a new version in, removed afterwards unless swapped in.

    The folder is locked (flock) while this process builds in it, so a later open can tell a folder left by
    a killed process (unlocked: removed by `stale_entries`' caller) from one another process still fills.
    """
    # os.mkdir (not tempfile.mkdtemp) so the directory gets the usual umask-based mode, not 0o700: it
    # becomes the artifact directory.
    with artifact_lock(lock_target(parent / name), shared=True):  # so no other process takes it for a leftover meanwhile
        for _ in range(100):
            tmp = parent / f".{name}.tmp-{secrets.token_hex(6)}"
            try:
                os.mkdir(tmp)
            except FileExistsError:
                continue
            break
        else:
            raise FileExistsError(f"could not create a unique temporary directory in {parent}")
        fd = lock_fd(tmp, fcntl.LOCK_EX) if fcntl is not None else None
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after a swap; the aborted copy otherwise
        if fd is not None:
            os.close(fd)


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
        # A swap a killed process left, or its leftovers, beside the artifact or inside it (ARTIFACT/onnx): finish, clear.
        untidy = [d for d in (parent, pathlib.Path(os.path.realpath(path))) if d.is_dir() and (pending_swaps(d) or stale_entries(d))]
        if untidy:
            if shared:
                fcntl.flock(fd, fcntl.LOCK_EX)
            for directory in untidy:
                _tidy(directory)
            if shared:
                fcntl.flock(fd, fcntl.LOCK_SH)
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


_STAGED = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|bak)-[0-9a-f]{12}")
_JOURNAL_SUFFIX = ".swap"
_JOURNAL_DRAFT = re.compile(r"\..+\.swap-[0-9a-f]{12}")


def _journal_path(parent: pathlib.Path, name: str) -> pathlib.Path:
    return parent / f".{name}{_JOURNAL_SUFFIX}"


def swap_in(tmp: pathlib.Path, target: pathlib.Path, replaced: set[str] | None) -> None:
    """Make *tmp* the directory at *target*, surviving a kill at any instruction.

    With `replaced` (a set of relative paths), the entries of an existing *target* that its manifest
    does not own and that `replaced` does not name are carried over into *tmp* first (a folder both
    have is merged); with None, *target* is replaced whole.

    A new *target* is one rename. Replacing one takes several (the carried entries, the old version
    aside, the new one in), so the plan is first written to a journal beside it (`.NAME.swap`, made
    durable by one atomic rename): the journal is the commit point. A failure or interrupt in this
    process undoes the renames; a process killed after the commit leaves the journal, and the next
    process that opens the artifact (`recover`, under its lock) completes the swap. Before the commit,
    *target* is untouched and the staged folder is a leftover the next save clears.
    """
    parent, name = target.parent, target.name
    if not os.path.isdir(target):
        os.rename(tmp, target)
        return
    carry: list[str] = []
    if replaced is not None:
        _plan_carry(target, tmp, "", _owned_names(target), replaced, carry)
    journal = {"staged": tmp.name, "backup": _free_name(parent, name, "bak").name, "carry": carry}
    _write_journal(parent, name, journal)
    try:
        _roll_forward(parent, name, journal)
    except BaseException:
        if _roll_back(parent, name, journal):
            with contextlib.suppress(OSError):
                os.unlink(_journal_path(parent, name))
        raise


def _write_journal(parent: pathlib.Path, name: str, journal: dict) -> None:
    path = _journal_path(parent, name)
    draft = parent / f".{name}.swap-{secrets.token_hex(6)}"
    try:
        with open(draft, "w", encoding="utf-8") as f:
            json.dump(journal, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(draft, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(draft)
        raise
    fsync_path(parent)


def _roll_forward(parent: pathlib.Path, name: str, journal: dict) -> None:
    """Carry out the journal's swap from wherever a killed process left it (every step is idempotent)."""
    target, staged, backup = parent / name, parent / journal["staged"], parent / journal["backup"]
    if os.path.isdir(staged):  # the new version is not in yet
        old = target if os.path.lexists(target) else backup
        for relative in journal["carry"]:
            source, destination = old / relative, staged / relative
            if os.path.lexists(source) and not os.path.lexists(destination):
                os.rename(source, destination)
        if os.path.lexists(target):
            with contextlib.suppress(OSError):
                shutil.copymode(target, staged)
            os.rename(target, backup)
        os.rename(staged, target)
        fsync_path(parent)
    elif not os.path.lexists(target) and os.path.isdir(backup):  # nothing staged to put in: keep the old one
        os.rename(backup, target)
    shutil.rmtree(backup, ignore_errors=True)
    with contextlib.suppress(OSError):  # the new version is in: a journal that stays is finished again, harmlessly
        os.unlink(_journal_path(parent, name))
    fsync_path(parent)


def _roll_back(parent: pathlib.Path, name: str, journal: dict) -> bool:
    """Undo a swap this process started and failed in; False if the new version was already in."""
    target, staged, backup = parent / name, parent / journal["staged"], parent / journal["backup"]
    if not os.path.isdir(staged):
        return False
    try:
        if not os.path.lexists(target) and os.path.isdir(backup):
            os.rename(backup, target)
        for relative in reversed(journal["carry"]):
            source, moved_to = target / relative, staged / relative
            if os.path.lexists(moved_to) and not os.path.lexists(source):
                os.rename(moved_to, source)
    except OSError:
        return False  # the journal stays: the next open completes the swap
    return True


def _valid_journal(name: str, journal) -> bool:
    """A journal names only this artifact's own staged and backup folders, and relative paths inside it."""
    if not isinstance(journal, dict) or not isinstance(journal.get("carry"), list):
        return False
    for key, kind in (("staged", "tmp"), ("backup", "bak")):
        found = _STAGED.fullmatch(str(journal.get(key, "")))
        if found is None or found["name"] != name or found["kind"] != kind:
            return False
    return all(isinstance(r, str) and relative_inside(r) for r in journal["carry"])


def _journaled(entries) -> set[str]:
    """The names of the artifacts whose swap has a journal among *entries* (`.NAME.swap`)."""
    return {e[1 : -len(_JOURNAL_SUFFIX)] for e in entries if e.startswith(".") and e.endswith(_JOURNAL_SUFFIX)}


def recover(directory: pathlib.Path) -> list[str]:
    """Complete every swap in *directory* that a killed process left (its journal); return the names completed.

    Call with the lock of the artifacts in *directory* held exclusively.
    """
    completed = []
    try:
        entries = os.listdir(directory)
    except OSError:
        return completed
    for name in _journaled(entries):
        path = _journal_path(directory, name)
        try:
            journal = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            journal = None
        if not _valid_journal(name, journal):
            continue  # not ours, or damaged: never act on it
        _roll_forward(directory, name, journal)
        completed.append(name)
    return completed


def pending_swaps(directory: pathlib.Path) -> bool:
    try:
        return bool(_journaled(os.listdir(directory)))
    except OSError:
        return False


def stale_entries(directory: pathlib.Path) -> list[pathlib.Path]:
    """What killed processes left in *directory*: staged folders no live process holds (`.NAME.tmp-*`), and,
    where no swap is pending, backups (`.NAME.bak-*`) and journal drafts. Remove them only with the lock of
    the artifacts in *directory* held exclusively (staged folders are made under it held shared)."""
    if fcntl is None:
        return []
    try:
        entries = os.listdir(directory)
    except OSError:
        return []
    pending = _journaled(entries)
    stale = []
    for entry in entries:
        found = _STAGED.fullmatch(entry)
        if found is not None and found["name"] not in pending:
            if found["kind"] == "tmp" and not lock_free(directory / entry):
                continue  # a live process is building in it
            stale.append(directory / entry)
        elif _JOURNAL_DRAFT.fullmatch(entry) and entry.split(".swap-")[0][1:] not in pending:
            stale.append(directory / entry)
        elif stale_writer_lock(directory, entry):
            stale.append(directory / entry)  # a writer lock its killed holder could not remove
    return stale


def lock_target(path) -> pathlib.Path:
    """The path whose `artifact_lock` guards *path*: the artifact around a folder inside one (ARTIFACT/onnx),
    else *path* itself."""
    path = pathlib.Path(path)
    return path.parent if artifact_exists(path.parent) else path


def _tidy(directory: pathlib.Path) -> None:
    """Complete pending swaps and remove leftovers in *directory* (its lock held exclusively)."""
    recover(directory)
    for path in stale_entries(directory):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.name.endswith(WRITER_LOCK_SUFFIX):
            # Removed while held, as its holders do: a writer that opened it meanwhile sees it gone and locks anew.
            fd = lock_fd(path, fcntl.LOCK_EX)
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.unlink(path)
                os.close(fd)
        else:
            with contextlib.suppress(OSError):
                os.unlink(path)


def _plan_carry(old: pathlib.Path, new: pathlib.Path, prefix: str, owned: set[str], replaced: set[str], carry: list[str]) -> None:
    """The relative paths of *old*'s entries the new version keeps (moved into *new* by the swap)."""
    for entry in sorted(os.listdir(old)):
        relative = prefix + entry
        if entry in owned or relative in replaced or _STAGED.fullmatch(entry) or entry.endswith(_JOURNAL_SUFFIX):
            continue  # a staged folder or journal of a nested swap is never part of a version
        source, destination = old / entry, new / entry
        if os.path.lexists(destination):
            if _plain_dir(source) and _plain_dir(destination):  # e.g. steer/ around a new sweep folder
                _plan_carry(source, destination, relative + "/", set(), replaced, carry)
            continue  # the new version's entry wins
        carry.append(relative)


def _plain_dir(path: pathlib.Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def write_file(path: pathlib.Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


@contextlib.contextmanager
def staged_directory(target, lock: bool = True, on_wait: Callable[[], None] | None = None) -> Iterator[pathlib.Path]:
    """Build a directory in a temporary sibling; it replaces `target` whole (`swap_in`) only if the block
    succeeds. An interrupted or failed build leaves `target` as it was and removes the partial one.

    Inside an artifact (an ONNX package in ARTIFACT/onnx) the swap holds the artifact's lock, so it
    cannot interleave with a save of the artifact around it. `lock=False`: a directory built inside a
    staged copy that no other process can see yet.
    """
    target = pathlib.Path(target)
    try:
        with staging_dir(target.parent, target.name) as tmp:
            yield tmp
            with artifact_lock(lock_target(target), on_wait=on_wait) if lock else contextlib.nullcontext(), interrupts_held():
                swap_in(tmp, target, None)
    except (OSError, SafetensorError) as e:  # safetensors raises its own error type on a full disk
        reason = getattr(e, "strerror", None) or " ".join(str(e).split())[:160]
        raise one_line_error(
            f"cannot write {str(target)!r} ({reason}); check free disk space and permissions there; nothing was changed"
        ) from e

"""The dyninfer artifact: a "dynamic model package" directory.

Every dyninfer command reads an artifact, adds what it decided or measured, and writes
it back. On disk an artifact is a directory holding

* ``dyninfer.json``: the manifest (schema version, the base model it was made for,
  tool versions, one JSON record per stage, and the sha256 of every tensor file), and
* zero or more ``<group>.safetensors`` files (``exits``, ``masks``, ``steering``, ...).

Other files in the directory (a ``probe/`` report folder, an ``onnx/`` export) are not
owned by the artifact; saving over an existing artifact carries them over untouched.

Saving is atomic: everything is written into a temporary directory next to the target,
the manifest last, and only then swapped into place, so an interrupted save never
leaves a half-written package at the target path. Loading is validated: a missing,
damaged, too-new or mismatched artifact raises a one-line `DyninferError`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import pathlib
import platform
import re
import secrets
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import safetensors.torch
import torch

try:
    import fcntl
except ImportError:  # not POSIX: no advisory locks
    fcntl = None

from dyninfer.core import distributed
from dyninfer.core.errors import DyninferError
from dyninfer.core.version import __version__

__all__ = [
    "SCHEMA_VERSION",
    "MANIFEST_NAME",
    "BaseModelInfo",
    "Artifact",
    "artifact_exists",
    "artifact_lock",
    "check_output_dir",
    "staged_directory",
]

SCHEMA_VERSION = 1
MANIFEST_NAME = "dyninfer.json"

_TENSOR_SUFFIX = ".safetensors"
_GROUP_RE = re.compile(r"[a-z0-9_]+")
_HASH_SHOWN = 12  # characters of a content hash shown in messages


# --------------------------------------------------------------------------- helpers


def _error(message: str) -> DyninferError:
    """A DyninferError whose message is guaranteed to be a single line."""
    return DyninferError(" ".join(str(message).split()))


def _short_hash(h: str) -> str:
    h = str(h)
    return h if len(h) <= _HASH_SHOWN else h[:_HASH_SHOWN] + "…"


def _tool_versions() -> dict:
    """Versions of the tools that wrote an artifact (transformers is optional: None)."""
    return {
        "dyninfer": __version__,
        "torch": str(torch.__version__),
        "transformers": _transformers_version(),
        "python": platform.python_version(),
    }


def _transformers_version() -> str | None:
    # Importing transformers costs seconds; use it if it is already loaded, otherwise
    # read the installed distribution's metadata. Missing entirely -> None.
    mod = sys.modules.get("transformers")
    if mod is not None and getattr(mod, "__version__", None):
        return str(mod.__version__)
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover - stdlib since 3.8
        return None
    try:
        return version("transformers")
    except PackageNotFoundError:
        return None
    except Exception:  # broken metadata must never stop an artifact from being made
        return None


def _check_group(group: Any) -> str:
    if not isinstance(group, str) or not _GROUP_RE.fullmatch(group):
        raise ValueError(
            f"tensor group name must be a simple name matching [a-z0-9_]+, got {group!r}"
        )
    return group


def _group_of_file(name: str) -> str | None:
    """'exits.safetensors' -> 'exits'; None if *name* is not a group file name."""
    if not name.endswith(_TENSOR_SUFFIX):
        return None
    stem = name[: -len(_TENSOR_SUFFIX)]
    return stem if _GROUP_RE.fullmatch(stem) else None


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_path(path: pathlib.Path) -> None:
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


def _prepare_for_save(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors; tensors that share storage get their own copy."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        out[name] = t.detach().to("cpu").contiguous()
    # safetensors refuses tensors that share memory (e.g. tied weights, views of one
    # buffer). Give every tensor in a shared storage its own copy.
    by_storage: dict[int, list[str]] = {}
    for name, t in out.items():
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr == 0 or storage.nbytes() == 0:
            continue
        by_storage.setdefault(ptr, []).append(name)
    for names in by_storage.values():
        if len(names) > 1:
            for name in names:
                out[name] = out[name].clone()
    return out


def _make_temp_dir(parent: pathlib.Path, name: str) -> pathlib.Path:
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
        if _group_of_file(entry) is not None:
            owned.add(entry)
    return owned


# --------------------------------------------------------------------------- model info


@dataclass
class BaseModelInfo:
    """Identity of the model an artifact was made for."""

    spec: str
    content_hash: str
    architecture: str
    num_layers: int
    hidden_size: int
    vocab_size: int

    _STR_FIELDS = ("spec", "content_hash", "architecture")
    _INT_FIELDS = ("num_layers", "hidden_size", "vocab_size")

    def to_dict(self) -> dict:
        return {
            "spec": self.spec,
            "content_hash": self.content_hash,
            "architecture": self.architecture,
            "num_layers": int(self.num_layers),
            "hidden_size": int(self.hidden_size),
            "vocab_size": int(self.vocab_size),
        }

    @classmethod
    def from_dict(cls, d: dict) -> BaseModelInfo:
        """Build from a manifest dict; ValueError naming the missing/invalid field."""
        if not isinstance(d, dict):
            raise ValueError(f"base_model must be an object, got {type(d).__name__}")
        missing = [k for k in cls._STR_FIELDS + cls._INT_FIELDS if k not in d]
        if missing:
            raise ValueError(f"base_model is missing field(s) {', '.join(missing)}")
        for k in cls._STR_FIELDS:
            if not isinstance(d[k], str):
                raise ValueError(f"base_model.{k} must be a string, got {d[k]!r}")
        for k in cls._INT_FIELDS:
            if not isinstance(d[k], int) or isinstance(d[k], bool):
                raise ValueError(f"base_model.{k} must be an integer, got {d[k]!r}")
        return cls(**{k: d[k] for k in cls._STR_FIELDS + cls._INT_FIELDS})


# --------------------------------------------------------------------------- artifact


@dataclass(eq=False)  # tensors make field-wise == ambiguous; compare explicitly instead
class Artifact:
    """A dynamic model package: manifest data plus named groups of tensors."""

    base_model: BaseModelInfo
    stages: dict[str, dict] = field(default_factory=dict)
    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    tokenizer: str | None = None
    created_with: dict = field(default_factory=_tool_versions)
    # Where this artifact was loaded from / last saved to (None for a new one).
    path: pathlib.Path | None = field(default=None, init=False, repr=False)

    # ---- editing

    def set_stage(self, name: str, record: dict) -> None:
        """Record what stage *name* decided/measured. TypeError if not JSON-serialisable.

        The stored record is the JSON-normalised copy (tuples become lists, keys become
        strings), i.e. exactly what `load` will give back.
        """
        if not isinstance(name, str) or not name:
            raise TypeError(f"stage name must be a non-empty string, got {name!r}")
        if not isinstance(record, dict):
            raise TypeError(f"stage record for {name!r} must be a dict, got {type(record).__name__}")
        try:
            text = json.dumps(record)
        except (TypeError, ValueError) as e:
            raise TypeError(f"stage record for {name!r} is not JSON-serialisable: {e}") from e
        self.stages[name] = json.loads(text)

    def put_tensors(self, group: str, tensors: dict[str, torch.Tensor]) -> None:
        """Replace tensor group *group* (a name matching [a-z0-9_]+) with *tensors*."""
        _check_group(group)
        if not isinstance(tensors, dict):
            raise TypeError(f"tensors for group {group!r} must be a dict, got {type(tensors).__name__}")
        for k, v in tensors.items():
            if not isinstance(k, str) or not k:
                raise TypeError(f"tensor names in group {group!r} must be non-empty strings, got {k!r}")
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"tensor {group}/{k} must be a torch.Tensor, got {type(v).__name__}")
        self.tensors[group] = dict(tensors)

    # ---- identity

    def check_base_model(self, content_hash: str, spec: str | None = None) -> None:
        """DyninferError unless this artifact was made for the model with *content_hash*."""
        if content_hash == self.base_model.content_hash:
            return
        where = f" {str(self.path)!r}" if self.path is not None else ""
        this = f"{spec} (hash {_short_hash(content_hash)})" if spec else f"this model (hash {_short_hash(content_hash)})"
        raise _error(
            f"artifact{where} was made for model {self.base_model.spec} "
            f"(hash {_short_hash(self.base_model.content_hash)}), not for {this}; "
            "re-run the command for this model or pass the matching model"
        )

    # ---- manifest

    def _manifest(self, files: dict[str, str]) -> dict:
        manifest: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "base_model": self.base_model.to_dict(),
        }
        if self.tokenizer is not None:
            manifest["tokenizer"] = self.tokenizer
        manifest["created_with"] = dict(self.created_with)
        manifest["stages"] = self.stages
        manifest["files"] = files
        return manifest

    # ---- save

    def save(
        self,
        path,
        *,
        reports: Mapping[str, Mapping[str, bytes]] | None = None,
        build: Callable[[pathlib.Path], None] | None = None,
        on_wait: Callable[[], None] | None = None,
    ) -> pathlib.Path:
        """Write the artifact, with its reports, to directory *path* in one swap; return the path.

        - `reports`: report folder (relative, e.g. ``calibrate`` or ``steer/sweep-valve``) ->
          {file name: bytes}; each replaces the folder of that name.
        - `build(staged)`: called with the staged directory once the manifest is in it, to add
          more files (the audit's report pages and ONNX package, a control vector).
        - `on_wait()`: called when another process is writing this artifact and this one waits.

        Foreign entries of an existing artifact (other reports, ``onnx/``, the user's files) are
        carried over (what the new version writes wins). Everything is written aside, then swapped
        in under an advisory lock that concurrent writers queue on, with Ctrl-C and SIGTERM held
        off until the swap is done; any failure rolls back, so *path* holds either the old
        artifact or the new one, whole.

        In a data-parallel run only rank 0 writes; the other ranks, which hold the same artifact,
        return the path without touching it.
        """
        given = pathlib.Path(path)
        if not distributed.current().is_main:
            return pathlib.Path(os.path.realpath(given))
        target = pathlib.Path(os.path.realpath(given))  # a symlinked target: write through it
        if not target.name:
            raise _error(f"cannot save an artifact to {str(given)!r}; pass a directory path such as out/model.dyn")
        if on_wait is not None:  # said once, whichever of the two locks below has to wait
            on_wait = functools.cache(on_wait)
        check_output_dir(given, on_wait)  # refuse to clobber anything that is not ours, before writing a byte
        replaced = {_relative_folder(folder) for folder in (reports or {})}
        # Validate everything that could fail for programming reasons up front.
        groups = sorted(self.tensors)
        for g in groups:
            _check_group(g)
        json.dumps(self.stages)  # TypeError now rather than half-way through

        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = _make_temp_dir(target.parent, target.name)
        except OSError as e:
            raise _error(
                f"cannot write output directory {str(given)!r} ({e.strerror or e}); choose a writable location"
            ) from e
        try:
            self._write(tmp, groups)
            for folder, contents in (reports or {}).items():
                for name, data in contents.items():
                    _write_file(tmp / folder / name, data)
            if build is not None:
                build(tmp)
            _fsync_path(tmp)
            with artifact_lock(target, on_wait=on_wait), _interrupts_held():
                check_output_dir(given, locked=True)  # again: something may have been put there meanwhile
                _swap_in(tmp, target, replaced)
        except OSError as e:
            raise _error(
                f"cannot write artifact to {str(given)!r} ({e.strerror or e}); "
                "check free disk space and permissions of the output directory; nothing was changed"
            ) from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone after a swap; the aborted copy otherwise
        _fsync_path(target.parent)
        self.path = given
        return given

    def _write(self, directory: pathlib.Path, groups: list[str]) -> None:
        """The tensor files, then the manifest (a directory with a manifest is a complete artifact)."""
        hashes: dict[str, str] = {}
        for g in groups:
            fname = g + _TENSOR_SUFFIX
            fpath = directory / fname
            safetensors.torch.save_file(_prepare_for_save(self.tensors[g]), str(fpath),
                                        metadata={"format": "pt", "dyninfer_group": g})
            os.chmod(fpath, _file_mode())  # safetensors writes 0600; files get the user's usual mode
            _fsync_path(fpath)
            hashes[fname] = _sha256(fpath)
        text = json.dumps(self._manifest(hashes), indent=2, ensure_ascii=False) + "\n"
        _write_file(directory / MANIFEST_NAME, text.encode("utf-8"))
        _fsync_path(directory / MANIFEST_NAME)

    # ---- load

    @classmethod
    def load(cls, path, *, expect_model_hash: str | None = None) -> Artifact:
        """Read and validate the artifact at *path* (under the shared lock: never while a writer swaps)."""
        with artifact_lock(path, shared=True):
            return cls._read(pathlib.Path(path), expect_model_hash)

    @classmethod
    def _read(cls, given: pathlib.Path, expect_model_hash: str | None) -> Artifact:
        shown = str(given)
        if not os.path.exists(given):
            raise _error(
                f"artifact {shown!r} does not exist; check the path, or run the dyninfer "
                "command that creates it first"
            )
        if not given.is_dir():
            raise _error(
                f"{shown!r} is not a dyninfer artifact (it is a file, not a directory); "
                "pass the artifact directory"
            )
        manifest_path = given / MANIFEST_NAME
        if not manifest_path.is_file():
            raise _error(
                f"{shown!r} is not a dyninfer artifact (no {MANIFEST_NAME}); "
                "pass a directory written by dyninfer"
            )
        try:
            text = manifest_path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise _error(
                f"artifact {shown!r} is corrupt: {MANIFEST_NAME} is not valid JSON (not UTF-8 text); "
                "re-create the artifact"
            ) from None
        except OSError as e:
            raise _error(
                f"cannot read {str(manifest_path)!r} ({e.strerror or e}); check its permissions"
            ) from e
        try:
            manifest = json.loads(text)
        except json.JSONDecodeError as e:
            raise _error(
                f"artifact {shown!r} is corrupt: {MANIFEST_NAME} is not valid JSON "
                f"({e.msg} at line {e.lineno}); re-create the artifact"
            ) from None

        def corrupt(what: str) -> DyninferError:
            return _error(f"artifact {shown!r} has an invalid {MANIFEST_NAME}: {what}; re-create the artifact")

        if not isinstance(manifest, dict):
            raise corrupt("the top level is not a JSON object")
        if "schema_version" not in manifest:
            raise corrupt("schema_version is missing")
        version = manifest["schema_version"]
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise corrupt(f"schema_version {version!r} is not a positive integer")
        if version > SCHEMA_VERSION:
            raise _error(
                f"artifact {shown!r} was made by a newer dyninfer (schema version {version}, "
                f"this dyninfer reads up to {SCHEMA_VERSION}); upgrade dyninfer (pip install -U dyninfer)"
            )
        if "base_model" not in manifest:
            raise corrupt("required field base_model is missing")
        try:
            base_model = BaseModelInfo.from_dict(manifest["base_model"])
        except ValueError as e:
            raise corrupt(str(e)) from None

        stages = manifest.get("stages", {})
        if not isinstance(stages, dict) or not all(isinstance(v, dict) for v in stages.values()):
            raise corrupt("stages must be an object of objects")
        files = manifest.get("files", {})
        if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
            raise corrupt("files must be an object of file name -> sha256")
        tokenizer = manifest.get("tokenizer")
        if tokenizer is not None and not isinstance(tokenizer, str):
            raise corrupt("tokenizer must be a string")
        created_with = manifest.get("created_with", {})
        if not isinstance(created_with, dict):
            raise corrupt("created_with must be an object")

        tensors: dict[str, dict[str, torch.Tensor]] = {}
        for fname in sorted(files):
            group = _group_of_file(fname)
            if group is None:  # also keeps a hostile manifest from naming ../ paths
                raise corrupt(f"{fname!r} is not a valid tensor file name")
            fpath = given / fname
            if not fpath.is_file():
                raise _error(
                    f"artifact {shown!r} is incomplete: {fname} is missing; re-create the artifact"
                )
            try:
                digest = _sha256(fpath)
            except OSError as e:
                raise _error(
                    f"cannot read {str(fpath)!r} ({e.strerror or e}); check its permissions"
                ) from e
            if digest != files[fname].lower():
                raise _error(
                    f"artifact {shown!r} is corrupt: {fname} does not match its checksum; "
                    "re-create the artifact"
                )
            try:
                tensors[group] = safetensors.torch.load_file(str(fpath), device="cpu")
            except Exception as e:
                raise _error(
                    f"artifact {shown!r} is corrupt: {fname} cannot be read as safetensors ({e}); "
                    "re-create the artifact"
                ) from e

        art = cls(
            base_model=base_model,
            stages=stages,
            tensors=tensors,
            tokenizer=tokenizer,
            created_with=created_with,
        )
        art.path = given
        if expect_model_hash is not None:
            art.check_base_model(expect_model_hash)
        return art


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
        raise _error(f"output path {shown!r} exists and is a file, not a dyninfer artifact; "
                     "choose another output path or remove the file")
    if given.is_dir() and not artifact_exists(given) and any(True for _ in os.scandir(given)):
        raise _error(f"output directory {shown!r} is not empty and is not a dyninfer artifact; "
                     "choose another output path or empty it")
    # The swap renames the target inside its parent: the nearest existing folder above it must be writable.
    above = pathlib.Path(os.path.abspath(given)).parent
    while not os.path.lexists(above):
        above = above.parent
    if not above.is_dir():
        raise _error(f"output path {shown!r} is under {str(above)!r}, which is a file; choose another output path")
    if not os.access(above, os.W_OK | os.X_OK):
        raise _error(f"cannot write into {str(above)!r} (permission denied or read-only); choose another output path")


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
def _interrupts_held() -> Iterator[None]:
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


def _swap_in(tmp: pathlib.Path, target: pathlib.Path, replaced: set[str] | None) -> None:
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


def _carry(old: pathlib.Path, new: pathlib.Path, prefix: str, owned: set[str], replaced: set[str],
           moves: list[tuple[pathlib.Path, pathlib.Path]]) -> None:
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


def _relative_folder(name: str) -> str:
    """A report path inside the artifact: relative, no `..`; ValueError otherwise (a programming error)."""
    parts = pathlib.PurePosixPath(name).parts
    if not parts or name.startswith("/") or any(part in ("..", ".") for part in parts) or parts[0] == MANIFEST_NAME:
        raise ValueError(f"report paths are relative paths inside the artifact, got {name!r}")
    return str(pathlib.PurePosixPath(*parts))


def _file_mode() -> int:
    """The mode the user's umask gives a new file (0644 under the usual umask 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _write_file(path: pathlib.Path, data: bytes) -> None:
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
    tmp = _make_temp_dir(target.parent, target.name)
    try:
        yield tmp
        locked = target.parent if artifact_exists(target.parent) else target
        with artifact_lock(locked, on_wait=on_wait) if lock else contextlib.nullcontext(), _interrupts_held():
            _swap_in(tmp, target, None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

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
import hashlib
import json
import os
import pathlib
import platform
import re
import secrets
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import safetensors.torch
import torch

from dyninfer.core.errors import DyninferError
from dyninfer.core.version import __version__

__all__ = [
    "SCHEMA_VERSION",
    "MANIFEST_NAME",
    "BaseModelInfo",
    "Artifact",
    "artifact_exists",
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

    def save(self, path) -> pathlib.Path:
        """Write the artifact to directory *path* atomically; return the path."""
        given = pathlib.Path(path)
        target = pathlib.Path(os.path.realpath(given))  # a symlinked target: write through it
        name = target.name
        if not name:
            raise _error(f"cannot save an artifact to {str(given)!r}; pass a directory path such as out/model.dyn")
        parent = target.parent

        # Refuse to clobber anything that is not ours, before writing a byte.
        replacing = False
        if os.path.lexists(target):
            if not target.is_dir():
                raise _error(
                    f"output path {str(given)!r} exists and is a file, not a dyninfer artifact; "
                    "choose another output path or remove the file"
                )
            if artifact_exists(target):
                replacing = True
            elif any(True for _ in os.scandir(target)):
                raise _error(
                    f"output directory {str(given)!r} is not empty and is not a dyninfer artifact; "
                    "choose another output path or empty it"
                )

        # Validate everything that could fail for programming reasons up front.
        groups = sorted(self.tensors)
        for g in groups:
            _check_group(g)
        json.dumps(self.stages)  # TypeError now rather than half-way through

        try:
            parent.mkdir(parents=True, exist_ok=True)
            tmp = _make_temp_dir(parent, name)
        except OSError as e:
            raise _error(
                f"cannot write output directory {str(given)!r} ({e.strerror or e}); "
                "choose a writable location"
            ) from e

        try:
            files: dict[str, str] = {}
            for g in groups:
                fname = g + _TENSOR_SUFFIX
                fpath = tmp / fname
                safetensors.torch.save_file(
                    _prepare_for_save(self.tensors[g]),
                    str(fpath),
                    metadata={"format": "pt", "dyninfer_group": g},
                )
                _fsync_path(fpath)
                files[fname] = _sha256(fpath)
            # The manifest goes last: a directory with a manifest is a complete artifact.
            manifest_path = tmp / MANIFEST_NAME
            text = json.dumps(self._manifest(files), indent=2, ensure_ascii=False) + "\n"
            with open(manifest_path, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            _fsync_path(tmp)
            if replacing:
                try:
                    shutil.copymode(target, tmp)
                except OSError:
                    pass
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise _error(
                f"cannot write artifact to {str(given)!r} ({e.strerror or e}); "
                "check free disk space and permissions of the output directory"
            ) from e
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

        try:
            if replacing:
                self._swap_in(tmp, target)
            else:
                if os.path.isdir(target):  # an empty directory: replace it
                    os.rmdir(target)
                os.rename(tmp, target)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise _error(
                f"cannot write output directory {str(given)!r} ({e.strerror or e}); "
                "choose a writable location"
            ) from e
        _fsync_path(parent)
        self.path = given
        return given

    @staticmethod
    def _swap_in(tmp: pathlib.Path, target: pathlib.Path) -> None:
        """Replace artifact directory *target* by *tmp*, carrying over foreign entries.

        On failure everything is put back as it was (target intact) and OSError raised;
        the caller removes *tmp*.
        """
        owned = _owned_names(target)
        moved: list[str] = []

        def move_back() -> None:
            for entry in reversed(moved):
                try:
                    os.rename(tmp / entry, target / entry)
                except OSError:
                    pass

        try:
            for entry in sorted(os.listdir(target)):
                if entry in owned:
                    continue
                os.rename(target / entry, tmp / entry)
                moved.append(entry)
            backup = _free_name(target.parent, target.name, "bak")
            os.rename(target, backup)
        except OSError:
            move_back()
            raise
        try:
            os.rename(tmp, target)
        except OSError:
            os.rename(backup, target)
            move_back()
            raise
        shutil.rmtree(backup, ignore_errors=True)

    # ---- load

    @classmethod
    def load(cls, path, *, expect_model_hash: str | None = None) -> Artifact:
        """Read and validate the artifact at *path*."""
        given = pathlib.Path(path)
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


@contextlib.contextmanager
def staged_directory(target) -> Iterator[pathlib.Path]:
    """Build a directory in a temporary sibling; it replaces `target` only if the block succeeds.

    An interrupted or failed build leaves `target` as it was and removes the partial one.
    """
    target = pathlib.Path(target)
    tmp = _make_temp_dir(target.parent, target.name)
    try:
        yield tmp
        if target.exists():
            backup = _free_name(target.parent, target.name, "bak")
            os.rename(target, backup)
            try:
                os.rename(tmp, target)
            except OSError:
                os.rename(backup, target)
                raise
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_report_dir(target: pathlib.Path, files: dict[str, bytes]) -> pathlib.Path:
    """Replace the report folder `target` (inside an artifact; `a/b` makes `a` too) with `files`, atomically."""
    pathlib.Path(target).parent.mkdir(parents=True, exist_ok=True)
    with staged_directory(target) as tmp:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
    return pathlib.Path(target)


def save_with_report(artifact: Artifact, out, folder: str, files: dict[str, bytes]) -> pathlib.Path:
    """Save `artifact` to `out`, then replace its report folder `folder` with `files`; returns the path."""
    target = pathlib.Path(artifact.save(out))
    write_report_dir(target / folder, files)
    return target

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

import functools
import hashlib
import json
import os
import pathlib
import platform
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import safetensors.torch
import torch

try:
    import fcntl
except ImportError:  # not POSIX: no advisory locks
    fcntl = None

from dyninfer.core import distributed
from dyninfer.core.artifact_files import (
    artifact_lock,
    check_output_dir,
    fsync_path,
    interrupts_held,
    one_line_error,
    staging_dir,
    swap_in,
    write_file,
)
from dyninfer.core.artifact_paths import (
    GROUP_NAME,
    MANIFEST_NAME,
    TENSOR_SUFFIX,
    file_sha256,
    group_of_file,
    inside,
    manifest_digest,
    relative_folder,
)
from dyninfer.core.errors import DyninferError
from dyninfer.core.version import __version__

__all__ = ["SCHEMA_VERSION", "BaseModelInfo", "Artifact"]

SCHEMA_VERSION = 1

_HASH_SHOWN = 12  # characters of a content hash shown in messages


# --------------------------------------------------------------------------- helpers


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
    if not isinstance(group, str) or not GROUP_NAME.fullmatch(group):
        raise ValueError(f"tensor group name must be a simple name matching [a-z0-9_]+, got {group!r}")
    return group


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
    # (where it was read from, that manifest's sha256): a save there refuses if the manifest changed since.
    _read_version: tuple[pathlib.Path | None, str | None] = field(default=(None, None), init=False, repr=False)

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
        raise one_line_error(
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
            raise one_line_error(f"cannot save an artifact to {str(given)!r}; pass a directory path such as out/model.dyn")
        if on_wait is not None:  # said once, whichever of the two locks below has to wait
            on_wait = functools.cache(on_wait)
        check_output_dir(given, on_wait)  # refuse to clobber anything that is not ours, before writing a byte
        replaced = {relative_folder(folder) for folder in (reports or {})}
        # Validate everything that could fail for programming reasons up front.
        groups = sorted(self.tensors)
        for g in groups:
            _check_group(g)
        json.dumps(self.stages)  # TypeError now rather than half-way through
        for g in groups:
            for name, tensor in self.tensors[g].items():
                if tensor.is_floating_point() and bool(torch.isnan(tensor).any()):
                    raise one_line_error(
                        f"the result {g}/{name} holds NaN values, so the computation that made it diverged (the model's own "
                        "outputs are NaN or inf on this data, or an option is out of range); nothing was saved"
                    )

        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with staging_dir(target.parent, target.name) as tmp:
                written = self._write(tmp, groups)
                for folder, contents in (reports or {}).items():
                    for name, data in contents.items():
                        write_file(tmp / folder / name, data)
                if build is not None:
                    build(tmp)
                fsync_path(tmp)
                with artifact_lock(target, on_wait=on_wait), interrupts_held():
                    check_output_dir(given, locked=True)  # again: something may have been put there meanwhile
                    self._check_unchanged(target)
                    swap_in(tmp, target, replaced)
        except OSError as e:
            raise one_line_error(
                f"cannot write artifact to {str(given)!r} ({e.strerror or e}); "
                "check free disk space and permissions of the output directory; nothing was changed"
            ) from e
        fsync_path(target.parent)
        self.path = given
        self._read_version = (target, written)
        return given

    def _check_unchanged(self, target: pathlib.Path) -> None:
        """Refuse to save over a version of the artifact this one was not read from (another process saved meanwhile):
        its stages would be lost. Commands run from the CLI never meet this: they hold the artifact's writer lock from
        before they read it until they save (`writer_lock`)."""
        read_from, digest = self._read_version
        if read_from == target and manifest_digest(target) != digest:
            raise one_line_error(
                f"artifact {str(self.path)!r} was changed by another process after this one read it; nothing was changed "
                "(saving would lose that process's stages); run the command again, or run commands on one artifact one after the other"
            )

    def _write(self, directory: pathlib.Path, groups: list[str]) -> str:
        """The tensor files, then the manifest (a directory with a manifest is a complete artifact); the manifest's
        sha256 (this version's stamp)."""
        hashes: dict[str, str] = {}
        for g in groups:
            fname = g + TENSOR_SUFFIX
            fpath = directory / fname
            # Serialised here and written by us: a full disk is then an OSError (safetensors' writer raises its own
            # error type), and the file gets the user's usual mode (safetensors writes 0600).
            data = safetensors.torch.save(_prepare_for_save(self.tensors[g]), metadata={"format": "pt", "dyninfer_group": g})
            write_file(fpath, data)
            fsync_path(fpath)
            hashes[fname] = hashlib.sha256(data).hexdigest()
        text = json.dumps(self._manifest(hashes), indent=2, ensure_ascii=False) + "\n"
        data = text.encode("utf-8")
        write_file(directory / MANIFEST_NAME, data)
        fsync_path(directory / MANIFEST_NAME)
        return hashlib.sha256(data).hexdigest()

    # ---- load

    @classmethod
    def load(cls, path, *, expect_model_hash: str | None = None) -> Artifact:
        """Read and validate the artifact at *path* (under the shared lock: never while a writer swaps)."""
        with artifact_lock(path, shared=True):
            return cls._read(pathlib.Path(path), expect_model_hash)

    @classmethod
    def _read(cls, given: pathlib.Path, expect_model_hash: str | None) -> Artifact:
        raw, manifest = _read_manifest(given)
        fields, files = _manifest_fields(manifest, str(given))
        art = cls(**fields, tensors=_read_tensor_files(given, files))
        art.path = given
        art._read_version = (pathlib.Path(os.path.realpath(given)), hashlib.sha256(raw).hexdigest())
        if expect_model_hash is not None:
            art.check_base_model(expect_model_hash)
        return art


# --------------------------------------------------------------------------- reading an artifact


def _read_manifest(given: pathlib.Path) -> tuple[bytes, Any]:
    """The manifest's bytes and its JSON; a one-line error when *given* is no artifact or its manifest is unreadable."""
    shown = str(given)
    if not os.path.exists(given):
        raise one_line_error(f"artifact {shown!r} does not exist; check the path, or run the dyninfer command that creates it first")
    if not given.is_dir():
        raise one_line_error(f"{shown!r} is not a dyninfer artifact (it is a file, not a directory); pass the artifact directory")
    manifest_path = given / MANIFEST_NAME
    if not manifest_path.is_file():
        raise one_line_error(f"{shown!r} is not a dyninfer artifact (no {MANIFEST_NAME}); pass a directory written by dyninfer")
    try:
        raw = manifest_path.read_bytes()
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise one_line_error(
            f"artifact {shown!r} is corrupt: {MANIFEST_NAME} is not valid JSON (not UTF-8 text); re-create the artifact"
        ) from None
    except OSError as e:
        raise one_line_error(f"cannot read {str(manifest_path)!r} ({e.strerror or e}); check its permissions") from e
    try:
        return raw, json.loads(text)
    except json.JSONDecodeError as e:
        raise one_line_error(
            f"artifact {shown!r} is corrupt: {MANIFEST_NAME} is not valid JSON ({e.msg} at line {e.lineno}); re-create the artifact"
        ) from None


def _invalid_manifest(shown: str, what: str) -> DyninferError:
    return one_line_error(f"artifact {shown!r} has an invalid {MANIFEST_NAME}: {what}; re-create the artifact")


def _manifest_fields(manifest: Any, shown: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The validated manifest: the Artifact's fields read from it (all but its tensors), and its files (name -> sha256)."""
    if not isinstance(manifest, dict):
        raise _invalid_manifest(shown, "the top level is not a JSON object")
    _check_schema_version(manifest, shown)
    if "base_model" not in manifest:
        raise _invalid_manifest(shown, "required field base_model is missing")
    try:
        base_model = BaseModelInfo.from_dict(manifest["base_model"])
    except ValueError as e:
        raise _invalid_manifest(shown, str(e)) from None

    stages = manifest.get("stages", {})
    if not isinstance(stages, dict) or not all(isinstance(v, dict) for v in stages.values()):
        raise _invalid_manifest(shown, "stages must be an object of objects")
    files = manifest.get("files", {})
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise _invalid_manifest(shown, "files must be an object of file name -> sha256")
    tokenizer = manifest.get("tokenizer")
    if tokenizer is not None and not isinstance(tokenizer, str):
        raise _invalid_manifest(shown, "tokenizer must be a string")
    created_with = manifest.get("created_with", {})
    if not isinstance(created_with, dict):
        raise _invalid_manifest(shown, "created_with must be an object")
    return {"base_model": base_model, "stages": stages, "tokenizer": tokenizer, "created_with": created_with}, files


def _check_schema_version(manifest: dict, shown: str) -> None:
    if "schema_version" not in manifest:
        raise _invalid_manifest(shown, "schema_version is missing")
    version = manifest["schema_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _invalid_manifest(shown, f"schema_version {version!r} is not a positive integer")
    if version > SCHEMA_VERSION:
        raise one_line_error(
            f"artifact {shown!r} was made by a newer dyninfer (schema version {version}, "
            f"this dyninfer reads up to {SCHEMA_VERSION}); upgrade dyninfer (pip install -U dyninfer)"
        )


def _read_tensor_files(given: pathlib.Path, files: dict[str, str]) -> dict[str, dict[str, torch.Tensor]]:
    """Each tensor group the manifest names, after checking its file is inside the artifact and matches its sha256."""
    shown = str(given)
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for fname in sorted(files):
        group = group_of_file(fname)
        if group is None:  # also keeps a hostile manifest from naming ../ paths
            raise _invalid_manifest(shown, f"{fname!r} is not a valid tensor file name")
        fpath = given / fname
        if not inside(given, fpath):
            raise one_line_error(
                f"artifact {shown!r} is unsafe: {fname} is a link to a file outside it; copy the file into the artifact or re-create it"
            )
        if not fpath.is_file():
            raise one_line_error(f"artifact {shown!r} is incomplete: {fname} is missing; re-create the artifact")
        try:
            digest = file_sha256(fpath)
        except OSError as e:
            raise one_line_error(f"cannot read {str(fpath)!r} ({e.strerror or e}); check its permissions") from e
        if digest != files[fname].lower():
            raise one_line_error(f"artifact {shown!r} is corrupt: {fname} does not match its checksum; re-create the artifact")
        try:
            tensors[group] = safetensors.torch.load_file(str(fpath), device="cpu")
        except Exception as e:
            raise one_line_error(
                f"artifact {shown!r} is corrupt: {fname} cannot be read as safetensors ({e}); re-create the artifact"
            ) from e
    return tensors

"""What the files of an artifact (or an exported package) are called, where they may be, and their digests.

Names (the manifest, tensor group files), checks that a named file stays inside its folder, the mode
the user's umask gives new files, and the sha256 of a file, remembered per version of the file: every
file core/ hashes goes through `file_sha256`. Importable without torch.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pathlib
import re

MANIFEST_NAME = "dyninfer.json"
TENSOR_SUFFIX = ".safetensors"
GROUP_NAME = re.compile(r"[a-z0-9_]+")


def group_of_file(name: str) -> str | None:
    """'exits.safetensors' -> 'exits'; None if *name* is not a group file name."""
    if not name.endswith(TENSOR_SUFFIX):
        return None
    stem = name[: -len(TENSOR_SUFFIX)]
    return stem if GROUP_NAME.fullmatch(stem) else None


def artifact_exists(path) -> bool:
    """True if *path* is a directory containing a dyninfer manifest."""
    p = pathlib.Path(path)
    return p.is_dir() and (p / MANIFEST_NAME).is_file()


def inside(root, path) -> bool:
    """True if *path* (links followed) resolves inside the folder *root*: what a file named by an artifact or
    package must do, so that a hostile manifest or a planted link cannot make a command read elsewhere."""
    base = os.path.realpath(root)
    return os.path.commonpath([base, os.path.realpath(path)]) == base


def relative_inside(name: str) -> bool:
    """True for a relative path that stays inside the folder it is relative to (no absolute path, no `..`)."""
    if not name or "\x00" in name or "\\" in name:
        return False
    path = pathlib.PurePosixPath(name)
    return not path.is_absolute() and ".." not in path.parts


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


def give_usual_modes(directory: pathlib.Path) -> None:
    """Every file under *directory* gets the mode the user's umask gives new files (writers such as safetensors and
    onnx's external data make them 0600)."""
    mode = file_mode()
    for path in pathlib.Path(directory).rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)


def file_sha256(path) -> str:
    # Remembered per version of the file (its inode, size and modification time) for the process: reading the
    # tokenizer alone before the weights checks the same files the model's load then checks.
    stat = os.stat(path)
    return _sha256_of(os.path.realpath(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _sha256_of(path: str, inode: int, size: int, modified_ns: int, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def manifest_digest(directory) -> str | None:
    """sha256 of the artifact's manifest as it is on disk now (None: no manifest): a version stamp."""
    try:
        return file_sha256(pathlib.Path(directory) / MANIFEST_NAME)
    except OSError:
        return None

"""What a measurement's numbers belong to: the commit, the package versions, the command line and the machine.

Every script in benchmarks/ puts `provenance()` into its output (the JSON it writes, or the first
line it prints), and so do the measuring commands' reports (`bench`, `stop`), so a number in the docs
can be traced to the code and the command that made it. Versions are read from the installed
distributions' metadata: nothing heavy is imported here.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PACKAGES = (
    "dyninfer",
    "torch",
    "transformers",
    "optimum-onnx",
    "onnxruntime-gpu",
    "onnx",
    "numpy",
    "scipy",
    "peft",
    "accelerate",
    "triton",
    "numba",
)
ROOT = Path(__file__).resolve().parents[1]  # the checkout (outside one, the commit is unknown)


def _commit() -> str:
    """HEAD's hash, with `+dirty` when the work tree has uncommitted changes; `unknown` outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def provenance() -> dict:
    return {
        "commit": _commit(),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "packages": {name: v for name in PACKAGES if (v := _version(name)) is not None},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.machine()},
    }


def provenance_line() -> str:
    """One line for scripts whose output is text."""
    return "# provenance: " + json.dumps(provenance(), separators=(",", ":"))

"""`steer apply` SIGKILLed at each rename it makes (strace fault injection), then the artifact opened again.

    python benchmarks/kill_matrix.py

For the k-th rename system call of the command (k = 1, 2, ... until one completes), strace kills the
process just before the call runs. The script then loads the artifact (the next open, which completes
or clears what the kill left) and reports which version it holds (the old α or the new one), whether
the user's files beside the manifest are intact, and what hidden leftovers remain. Run it against
another checkout (PYTHONPATH) to compare versions. Needs strace.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from provenance import provenance_line

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from conftest import save_tiny

RENAMES = "rename,renameat,renameat2"


def steered(root: Path) -> Path:
    model = save_tiny("llama", root / "model")
    artifact = root / "steered"
    command = [sys.executable, "-m", "dyninfer", "steer", "extract", str(model), "--examples", "4", "--heldout", "2"]
    subprocess.run([*command, "--layers", "1", "--out", str(artifact)], check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "dyninfer", "steer", "apply", str(artifact), "--alpha", "0.25"], check=True, capture_output=True)
    (artifact / "probe").mkdir()
    (artifact / "probe" / "layers.csv").write_text("mine")
    (artifact / "report.md").write_text("# an audit")
    return artifact


def opened(artifact: Path) -> dict:
    """Load the artifact in a fresh process (the next open) and describe what it holds."""
    code = (
        "import sys, json\n"
        "from dyninfer.core.artifacts import Artifact\n"
        "try:\n"
        "    a = Artifact.load(sys.argv[1]); print(json.dumps(a.stages.get('steer', {}).get('applied')))\n"
        "except Exception as e:\n"
        "    print(json.dumps({'error': str(e)[:120]}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(artifact)], capture_output=True, text=True)
    applied = json.loads(done.stdout.strip().splitlines()[-1]) if done.stdout.strip() else {"error": done.stderr[-200:]}
    intact = (artifact / "probe" / "layers.csv").is_file() and (artifact / "report.md").is_file()
    leftovers = (
        sorted(p.name for p in artifact.parent.iterdir() if p.name.startswith("."))
        + sorted(p.name for p in artifact.iterdir() if p.name.startswith("."))
        if artifact.is_dir()
        else sorted(p.name for p in artifact.parent.iterdir() if p.name.startswith("."))
    )
    return {"applied": applied, "user files intact": intact, "artifact exists": artifact.is_dir(), "leftovers": leftovers}


def main() -> None:
    print(provenance_line(), flush=True)
    if shutil.which("strace") is None:
        sys.exit("needs strace (apt-get install strace)")
    import dyninfer

    print(f"dyninfer from {Path(dyninfer.__file__).parent}")
    root = Path(tempfile.mkdtemp())
    original = steered(root)
    for k in range(1, 30):
        case = root / f"k{k}"
        case.mkdir()
        artifact = case / "steered"
        shutil.copytree(original, artifact)
        inject = f"inject={RENAMES}:signal=KILL:when={k}"
        command = [sys.executable, "-m", "dyninfer", "steer", "apply", str(artifact), "--alpha", "0.5"]
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}  # no .pyc renames among the command's own
        strace = ["strace", "-f", "-qq", "-o", "/dev/null", "-e", f"trace={RENAMES}", "-e", inject]
        done = subprocess.run([*strace, *command], capture_output=True, env=env)
        killed = done.returncode in (-9, 137)
        state = opened(artifact)
        print(f"rename {k}: {'killed' if killed else f'completed (exit {done.returncode})'}; {json.dumps(state)}", flush=True)
        if not killed:
            break


if __name__ == "__main__":
    main()

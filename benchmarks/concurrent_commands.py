"""Two dyninfer commands started together on one artifact: which stages survive, over several trials.

    python benchmarks/concurrent_commands.py --trials 3

Each trial starts `probe --lens tuned --out A` and `calibrate --out A` at the same moment (two processes,
on a tiny random Llama and random words), waits for both, and reads A: a stage is lost when its command
exited 0 but its record (or, for the probe, its tuned lens and report folder) is not in A. Run it against
another checkout (PYTHONPATH) to compare versions.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import provenance_line

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from conftest import CALIBRATE_ARGS

PROBE = ["--lens", "tuned", "--tokens", "128", "--seq-len", "32", "--lens-train-tokens", "256", "--lens-steps", "5"]


def workspace(root: Path) -> tuple[Path, Path]:
    from conftest import random_text, save_tiny  # the test suite's tiny models and words

    model = save_tiny("llama", root / "model")
    data = root / "words.txt"
    data.write_text(random_text(20_000, seed=3))
    return model, data


def lost_stages(artifact: Path, codes: dict[str, int]) -> list[str]:
    """The stages whose command exited 0 but whose results are not in the artifact."""
    try:
        manifest = json.loads((artifact / "dyninfer.json").read_text())
    except (OSError, ValueError):
        manifest = {"stages": {}, "files": {}}
    stages, files = manifest.get("stages", {}), manifest.get("files", {})
    lost = []
    if codes["probe"] == 0:
        if "probe" not in stages or not (artifact / "probe" / "summary.json").is_file():
            lost.append("probe")
        if "lens" not in stages or "exits.safetensors" not in files:
            lost.append("tuned lens")
    if codes["calibrate"] == 0 and ("calibrate" not in stages or not (artifact / "calibrate" / "summary.json").is_file()):
        lost.append("calibrate")
    return lost


def trial(model: Path, data: Path, root: Path, number: int) -> tuple[list[str], dict[str, int], float]:
    artifact = root / f"trial{number}" / "A"
    artifact.parent.mkdir()
    commands = {
        "probe": ["probe", str(model), "--data", str(data), *PROBE, "--out", str(artifact)],
        "calibrate": ["calibrate", str(model), "--data", str(data), *CALIBRATE_ARGS, "--out", str(artifact)],
    }
    started = time.perf_counter()
    processes = {
        name: subprocess.Popen([sys.executable, "-m", "dyninfer", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for name, args in commands.items()
    }
    codes = {}
    for name, process in processes.items():
        _, err = process.communicate(timeout=900)
        codes[name] = process.returncode
        if process.returncode != 0:
            print(f"  {name} exited {process.returncode}: {err.strip().splitlines()[-1] if err.strip() else ''}")
    return lost_stages(artifact, codes), codes, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    print(provenance_line(), flush=True)
    import dyninfer

    print(f"dyninfer from {os.path.dirname(dyninfer.__file__)}")
    root = Path(tempfile.mkdtemp())
    model, data = workspace(root)
    total = 0
    for number in range(args.trials):
        lost, codes, seconds = trial(model, data, root, number)
        total += len(lost)
        print(f"trial {number + 1}: exit codes {codes}, stages lost {len(lost)} {lost} ({seconds:.0f} s)", flush=True)
    print(f"stages lost in {args.trials} trials: {total}")


if __name__ == "__main__":
    main()

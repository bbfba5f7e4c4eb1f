"""How long `dyninfer` takes to start: the wall clock of commands that load no model.

    python benchmarks/startup.py --repeats 5 --out startup.json

Each command runs `--repeats` times in a fresh interpreter (`python -m dyninfer ...`, output
discarded); the best and the median wall-clock seconds are reported. The best is the start-up
cost on an idle machine; the median shows how much other work on the machine adds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from provenance import provenance

COMMANDS = (
    ["--help"],
    ["--version"],
    ["probe", "--help"],
    ["calibrate", "--help"],
    ["audit", "--help"],
    ["steer", "extract", "--help"],
    ["models"],
    ["models", "--json"],
)


def wall_clock(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dyninfer", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    for command in COMMANDS:
        times = [wall_clock(command) for _ in range(args.repeats)]
        rows.append(
            {"command": "dyninfer " + " ".join(command), "best_s": round(min(times), 3), "median_s": round(statistics.median(times), 3)}
        )
        print(f"{rows[-1]['command']:32s} best {rows[-1]['best_s']:.2f} s, median {rows[-1]['median_s']:.2f} s", flush=True)
    result = {"provenance": provenance(), "repeats": args.repeats, "commands": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

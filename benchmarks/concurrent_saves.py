"""Concurrent writers and readers on one artifact: files lost and errors seen, over several trials.

    python benchmarks/concurrent_saves.py --writers 3 --saves 40 --trials 3

Each writer process saves a new version (a stage record, a tensor file and a report folder) `saves`
times; reader processes load the artifact in a loop and check that its tensors match its manifest.
The artifact starts with foreign entries (`probe/`, `report.md`) that every save must carry over.
`--no-lock` runs the same without the advisory lock, to show what it prevents.
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
from pathlib import Path

import torch
from provenance import provenance_line

from dyninfer.core import artifacts
from dyninfer.core.artifacts import Artifact, BaseModelInfo


def versioned_artifact(version: int) -> Artifact:
    """An artifact whose stage record and tensor both hold `version` (a reader can check they match)."""
    art = Artifact(BaseModelInfo("tiny", "f" * 64, "llama", 2, 4, 8))
    art.set_stage("calibrate", {"version": version})
    art.put_tensors("exits", {"w": torch.full((4,), float(version))})
    return art


def _writer(path: str, worker: int, saves: int, errors) -> None:
    try:
        for n in range(saves):
            art = versioned_artifact(1000 * worker + n)
            art.save(path, reports={"calibrate": {"summary.json": f"{worker}-{n}".encode()}})
    except BaseException as exc:
        errors.put(f"writer {worker}: {type(exc).__name__}: {exc}")


def _reader(path: str, stop, errors) -> None:
    while not stop.is_set():
        try:
            art = Artifact.load(path)
            version = art.stages["calibrate"]["version"]
            if float(art.tensors["exits"]["w"][0]) != version:
                errors.put(f"reader: tensors of version {float(art.tensors['exits']['w'][0])}, manifest {version}")
        except BaseException as exc:
            errors.put(f"reader: {type(exc).__name__}: {exc}")


def concurrent_saves(path: Path, writers: int = 3, saves: int = 10, readers: int = 1) -> list[str]:
    """Writers each saving `saves` times to one artifact while readers load it; the errors any of them saw."""
    context = multiprocessing.get_context("fork")
    errors, stop = context.Queue(), context.Event()
    reading = [context.Process(target=_reader, args=(str(path), stop, errors)) for _ in range(readers)]
    writing = [context.Process(target=_writer, args=(str(path), w, saves, errors)) for w in range(writers)]
    for process in reading + writing:
        process.start()
    for process in writing:
        process.join(120)
    stop.set()
    for process in reading:
        process.join(30)
    found = []
    while not errors.empty():
        found.append(errors.get())
    return found


def trial(writers: int, saves: int, readers: int) -> tuple[list[str], list[str]]:
    """(files lost, errors seen) of one trial on a fresh artifact."""
    path = Path(tempfile.mkdtemp()) / "art"
    versioned_artifact(0).save(path, reports={"calibrate": {"summary.json": b"0-0"}})
    (path / "probe").mkdir()
    (path / "probe" / "layers.csv").write_text("mine")
    (path / "report.md").write_text("# an audit")
    errors = concurrent_saves(path, writers, saves, readers)
    lost = [name for name in ("probe/layers.csv", "report.md") if not (path / name).is_file()]
    return lost, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--writers", type=int, default=3)
    parser.add_argument("--saves", type=int, default=40)
    parser.add_argument("--readers", type=int, default=2)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--no-lock", action="store_true", help="disable the advisory lock (to show its effect)")
    args = parser.parse_args()
    print(provenance_line(), flush=True)
    if args.no_lock:
        artifacts.fcntl = None
    print(f"{args.writers} writers x {args.saves} saves, {args.readers} readers, lock {'off' if args.no_lock else 'on'}")
    for number in range(args.trials):
        lost, errors = trial(args.writers, args.saves, args.readers)
        print(f"trial {number + 1}: files lost {len(lost)} {lost}, errors {len(errors)}" + (f" (first: {errors[0]})" if errors else ""))


if __name__ == "__main__":
    main()

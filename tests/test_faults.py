"""Faults while an artifact is written: a process killed at every rename of a save and at random points in its
code, commands racing on one artifact, and a real full disk (a small tmpfs where this user may mount one).

After any of them the artifact must read as the old version or the new one, whole (manifest, tensors and
report folders agreeing, the user's own files kept), and the next open must leave no staged folder,
backup or journal behind.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tree_state

from dyninfer.core import artifact_files, artifact_paths, file_locks
from dyninfer.core.artifacts import Artifact
from dyninfer.core.errors import DyninferError

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from concurrent_saves import versioned_artifact

REPORTS = {
    1: {"calibrate": {"summary.json": b"1"}, "steer/sweep-valve": {"sweep.json": b"1"}},
    2: {"calibrate": {"summary.json": b"2"}, "steer/sweep-valve": {"sweep.json": b"2"}},
}


def _existing(path: Path) -> Path:
    """Version 1 with the user's files and another command's reports beside it (what a save must carry)."""
    versioned_artifact(1).save(path, reports=REPORTS[1])
    (path / "probe").mkdir()
    (path / "probe" / "layers.csv").write_text("mine")
    (path / "report.md").write_text("# an audit")
    (path / "steer" / "sweep-activation").mkdir()
    (path / "steer" / "sweep-activation" / "sweep.json").write_text("activation")
    return path


def _litter(parent: Path) -> list[str]:
    return sorted(
        str(p.relative_to(parent)) for p in parent.rglob(".*") if any(mark in p.name for mark in (".tmp-", ".bak-", ".swap", ".lock"))
    )


def _version_whole(path: Path) -> int:
    """The version the artifact at `path` holds, checking that every part of it agrees and nothing was lost."""
    art = Artifact.load(path)  # the open: completes a swap a killed process left, clears its leftovers
    version = art.stages["calibrate"]["version"]
    assert float(art.tensors["exits"]["w"][0]) == version
    assert (path / "calibrate" / "summary.json").read_text() == str(version)
    assert (path / "steer" / "sweep-valve" / "sweep.json").read_text() == str(version)
    assert (path / "probe" / "layers.csv").read_text() == "mine"
    assert (path / "report.md").read_text() == "# an audit"
    assert (path / "steer" / "sweep-activation" / "sweep.json").read_text() == "activation"
    return version


def _killed_save(path: Path, kill_at, counted: Path | None = None) -> int:
    """Save version 2 over `path` in a forked process that SIGKILLs itself where `kill_at(kind, count)` says;
    returns the child's exit signal (0: it finished, and wrote its counts of each kind to `counted`)."""

    def child() -> None:
        counts: dict[str, int] = {}

        def hit(kind: str) -> None:
            counts[kind] = counts.get(kind, 0) + 1
            if kill_at(kind, counts[kind]):
                os.kill(os.getpid(), signal.SIGKILL)

        real_rename, real_replace = os.rename, os.replace
        os.rename = lambda a, b: (hit("rename"), real_rename(a, b))[1]
        os.replace = lambda a, b: (hit("rename"), real_replace(a, b))[1]

        save_code = {m.__file__ for m in (artifact_files, artifact_paths, file_locks, sys.modules["dyninfer.core.artifacts"])}

        def tracer(frame, event, arg):
            if frame.f_code.co_filename in save_code:
                if event == "line":
                    hit("line")
                return tracer
            return None

        sys.settrace(tracer)
        versioned_artifact(2).save(path, reports=REPORTS[2])
        sys.settrace(None)
        if counted is not None:
            counted.write_text(json.dumps(counts))
        os._exit(0)

    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join(120)
    return -process.exitcode if process.exitcode and process.exitcode < 0 else 0


def _events_of_a_save(tmp_path: Path) -> dict[str, int]:
    counted = tmp_path / "counts.json"
    # Each save in a folder of its own: the work of a save (lines run) depends on what else its folder holds.
    assert _killed_save(_existing(tmp_path / "counting" / "art"), lambda kind, n: False, counted) == 0
    return json.loads(counted.read_text())


def test_a_kill_at_every_rename_leaves_the_old_or_the_new_version_whole(tmp_path):
    renames = _events_of_a_save(tmp_path)["rename"]
    # The journal (the commit), then the carried entries (probe/, report.md, steer/sweep-activation), the old
    # version aside and the new one in.
    assert renames == 6, renames
    outcomes = []
    for rename in range(1, renames + 1):
        path = _existing(tmp_path / f"{rename}" / "art")
        assert _killed_save(path, lambda kind, n, rename=rename: kind == "rename" and n == rename) == signal.SIGKILL
        outcomes.append(_version_whole(path))
        assert _litter(tmp_path) == [], f"rename {rename}"
    # Killed before the journal's rename the old version stays; after it, the next open lands the new one.
    assert outcomes == [1, 2, 2, 2, 2, 2], outcomes


def test_a_kill_at_random_points_of_a_save_leaves_a_whole_version(tmp_path):
    lines = _events_of_a_save(tmp_path)["line"]
    generator = random.Random(29)
    seen = set()
    for trial, point in enumerate(sorted(generator.sample(range(1, lines + 1), 16))):
        path = _existing(tmp_path / f"{trial}" / "art")
        assert _killed_save(path, lambda kind, n, point=point: kind == "line" and n == point) == signal.SIGKILL
        seen.add(_version_whole(path))
        assert _litter(tmp_path) == [], f"line event {point} of {lines}"
    assert seen == {1, 2}, seen  # points both before and after the commit were hit


def test_leftovers_of_a_process_still_writing_are_kept(tmp_path):
    """A staged folder another live process is filling is not taken for a leftover."""
    path = _existing(tmp_path / "art")
    with artifact_files.staging_dir(tmp_path, "art") as staged:
        (staged / "half.bin").write_bytes(b"x")
        Artifact.load(path)
        assert staged.is_dir() and (staged / "half.bin").is_file()
    assert _litter(tmp_path) == []


# --------------------------------------------------------------------------- a full disk, for real


def _small_filesystem(tmp_path: Path, size: str) -> Path:
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); the simulated full-disk tests cover it")
    return mount


@pytest.fixture
def small_disk(tmp_path):
    mount = _small_filesystem(tmp_path, "256k")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(mount: Path, leave: int) -> None:
    """Fill the filesystem at `mount` until about `leave` bytes are free."""
    free = shutil.disk_usage(mount).free
    with open(mount / "filler", "wb") as f:
        try:
            f.write(b"\0" * max(free - leave, 0))
        except OSError:
            pass


def test_a_real_full_disk_during_a_save_changes_nothing(small_disk):
    path = _existing(small_disk / "art")
    big = versioned_artifact(2)
    import torch

    big.put_tensors("masks", {"m": torch.zeros(40_000)})  # 160 kB: more than the disk has left
    _fill(small_disk, 60_000)
    before = tree_state(small_disk)
    with pytest.raises(DyninferError, match=r"No space left on device.*nothing was changed"):
        big.save(path, reports=REPORTS[2])
    assert tree_state(small_disk) == before and _version_whole(path) == 1


def test_a_real_full_disk_under_the_cli_is_one_error_line(small_disk, tiny_llama_dir):
    from typer.testing import CliRunner

    from dyninfer.cli.app import app

    _fill(small_disk, 8_000)
    before = tree_state(small_disk)
    text = small_disk.parent / "text.txt"
    text.write_text(" ".join(f"word{i % 50}" for i in range(3000)))
    result = CliRunner().invoke(
        app, ["probe", str(tiny_llama_dir), "--data", str(text), "--tokens", "64", "--seq-len", "32", "--out", str(small_disk / "art")]
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "No space left" in errors[0], result.output
    assert "Traceback" not in result.output
    assert tree_state(small_disk) == before


def test_json_to_a_full_stdout_is_one_error_line():
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "dyninfer", "models", "--json"], stdout=full, stderr=subprocess.PIPE, text=True)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().startswith("error:") and "No space left" in done.stderr and "Traceback" not in done.stderr


def test_a_simulated_full_disk_at_each_write_changes_nothing(tmp_path, monkeypatch):
    """Where no tmpfs can be mounted: the error a full disk raises, at each file a save writes in turn."""
    path = _existing(tmp_path / "art")
    before = tree_state(tmp_path)
    real = artifact_files.write_file
    failing = 0
    while True:
        failing += 1
        calls = []

        def write(target, data, failing=failing, calls=calls):
            calls.append(target)
            if len(calls) == failing:
                raise OSError(errno.ENOSPC, "No space left on device")
            real(target, data)

        monkeypatch.setattr("dyninfer.core.artifacts.write_file", write)
        try:
            versioned_artifact(2).save(path, reports=REPORTS[2])
        except DyninferError as exc:
            assert "No space left on device" in str(exc) and "nothing was changed" in str(exc)
            assert tree_state(tmp_path) == before, failing
            continue
        break
    # The tensor file, the manifest and the two report files each failed once; the save after them succeeded.
    assert failing == 5 and _version_whole(path) == 2


# --------------------------------------------------------------------------- commands racing on one artifact


@pytest.mark.slow  # two CLI processes, each importing torch and running a stage
def test_a_probe_and_a_calibration_started_together_both_keep_their_stages(tmp_path, tiny_llama_dir):
    """`probe --lens tuned --out A` and `calibrate --out A` at the same moment: the second to reach A waits for the
    first to save, then starts from that version, so both stages (and the tuned lens) are in A."""
    from concurrent_commands import trial
    from conftest import random_text

    data = tmp_path / "words.txt"
    data.write_text(random_text(20_000, seed=3))
    lost, codes, _ = trial(tiny_llama_dir, data, tmp_path, 0)
    assert codes == {"probe": 0, "calibrate": 0} and lost == []
    assert _litter(tmp_path) == []


@pytest.mark.integration
def test_converting_the_bundled_model_into_a_full_cache_is_one_error_line(tmp_path):
    mount = _small_filesystem(tmp_path, "64m")  # the float32 weights need about 540 MB
    try:
        env = {**os.environ, "DYNINFER_CACHE": str(mount)}
        done = subprocess.run([sys.executable, "-m", "dyninfer", "probe", "--tokens", "8"], env=env, capture_output=True, text=True)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == 2 and lines[-1].startswith("error:") and "nothing was changed" in lines[-1], done.stderr[-2000:]
        assert "Traceback" not in done.stderr
        assert _litter(mount) == [] and not any(p.is_file() for p in mount.rglob("*"))
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


# --------------------------------------------------------------------------- files named by a package


@pytest.mark.parametrize("named", ["/etc/hostname", "../outside.onnx", "linked.onnx"], ids=["absolute", "dot-dot", "link-out"])
def test_a_package_naming_a_file_outside_it_is_refused(tmp_path, named):
    from dyninfer.runtime.package_format import PACKAGE_FORMAT, PACKAGE_MANIFEST, read_package

    package = tmp_path / "pkg"
    package.mkdir()
    (tmp_path / "outside.onnx").write_bytes(b"graph")
    (package / "linked.onnx").symlink_to(tmp_path / "outside.onnx")
    (package / "model.onnx").write_bytes(b"graph")
    manifest = {"format": PACKAGE_FORMAT, "version": 3, "model_file": "model.onnx", "files": {"model.onnx": 5}, "provider": "cpu"}
    manifest |= {"dtype": "fp32", "family": "llama", "num_layers": 1, "vocab_size": 8, "kv_geometry": [[1, 4]], "policy": None}
    (package / PACKAGE_MANIFEST).write_text(json.dumps(manifest))
    assert read_package(package).model_file == "model.onnx"  # the same package, naming its own file: accepted
    manifest["model_file"] = named
    (package / PACKAGE_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DyninferError, match="not a file inside the package"):
        read_package(package)


def test_a_writer_lock_its_killed_holder_left_is_cleared_and_a_held_one_kept(tmp_path):
    path = _existing(tmp_path / "art")
    with file_locks.writer_lock(path):
        Artifact.load(path)
        assert (tmp_path / ".art.lock").is_file()  # held by a live writer (this one)
    (tmp_path / ".art.lock").write_text("")  # as a writer killed while holding it leaves it
    (tmp_path / ".other.lock").write_text("")  # not beside an artifact: another tool's, never touched
    Artifact.load(path)
    assert not (tmp_path / ".art.lock").exists() and (tmp_path / ".other.lock").exists()


def test_a_graph_reading_weights_from_outside_its_folder_is_refused(tmp_path):
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from dyninfer.runtime.onnx_session import check_external_data

    weights = numpy_helper.from_array(np.ones((4, 4), dtype=np.float32), name="w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
        initializer=[weights],
    )
    package = tmp_path / "pkg"
    package.mkdir()
    model = helper.make_model(graph)
    onnx.save(model, str(package / "model.onnx"), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    check_external_data(package / "model.onnx")  # its own data file: fine
    proto = onnx.load(str(package / "model.onnx"), load_external_data=False)
    for entry in proto.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../stolen.data"
    onnx.save(proto, str(package / "model.onnx"))
    with pytest.raises(DyninferError, match="outside its folder"):
        check_external_data(package / "model.onnx")


def test_a_library_save_over_a_version_it_did_not_read_is_refused(tmp_path):
    """Code that does not hold the writer lock: an artifact loaded from A refuses to save over a newer A."""
    path = _existing(tmp_path / "art")
    mine = Artifact.load(path)
    mine.set_stage("probe", {"mine": True})
    mine.save(path)  # nothing changed since it was read: saved
    mine.set_stage("profile", {"mine": True})
    mine.save(path)  # its own save is the version it now holds: saved again
    versioned_artifact(3).save(path, reports=REPORTS[2])  # another process's version
    before = tree_state(tmp_path)
    mine.set_stage("prune", {"mine": True})
    with pytest.raises(DyninferError, match="was changed by another process after this one read it; nothing was changed"):
        mine.save(path)
    assert tree_state(tmp_path) == before and Artifact.load(path).stages["calibrate"] == {"version": 3}

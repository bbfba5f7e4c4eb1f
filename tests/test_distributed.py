"""Data-parallel runs (#17): `torchrun --nproc-per-node 2 -m dyninfer …` on gloo against one process over the
same windows and prompts: the same numbers and the same artifact, apart from timings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CALIBRATE_ARGS, random_text, save_tiny

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("distributed")]

# Whatever measures time or speed differs between runs; everything else must not.
TIMED = {"timings", "throughput", "seconds", "calibrate_s", "tokens_per_s", "memory"}


def _dyninfer(args: list[str], processes: int, cwd: Path) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                "--master-port", str(29500 + os.getpid() % 1000)] if processes > 1 else [sys.executable]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.run([*launcher, "-m", "dyninfer", *args, "--json"], capture_output=True, text=True, cwd=cwd,
                          env=env)


def _untimed(value):
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if k not in TIMED}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    save_tiny("llama", root / "model")
    (root / "text.txt").write_text(random_text(20000))
    return root


def test_two_gloo_processes_probe_and_calibrate_like_one(workspace):
    base = [str(workspace / "model"), "--data", str(workspace / "text.txt")]
    stages = [
        ["probe", *base, "--seq-len", "32", "--tokens", "256", "--lens", "tuned", "--lens-train-tokens", "512",
         "--lens-steps", "3"],
        ["calibrate", *base, *CALIBRATE_ARGS],
    ]
    outputs = {}
    for processes in (1, 2):
        out = workspace / f"artifact-{processes}"
        outputs[processes] = []
        for args in stages:
            done = _dyninfer([*args, "--out", str(out)], processes, workspace)
            assert done.returncode == 0, done.stderr[-3000:]
            outputs[processes].append(json.loads(done.stdout))  # rank 0's summary alone: other ranks are silent
    for one, two in zip(outputs[1], outputs[2]):
        assert _close(_untimed(two), _untimed(one))
    # The artifact: written once (by rank 0), the same apart from timings.
    manifests = [json.loads((workspace / f"artifact-{n}" / "dyninfer.json").read_text()) for n in (1, 2)]
    assert _close(_untimed(manifests[1]["stages"]), _untimed(manifests[0]["stages"]))
    # Tensors: the cached continuations are equal; the tuned lens trained with DDP (gradients summed over
    # the ranks) equals the one-process lens up to the order of float sums.
    from safetensors.torch import load_file

    for name in sorted(p.name for p in (workspace / "artifact-1").glob("*.safetensors")):
        one, two = (load_file(workspace / f"artifact-{n}" / name) for n in (1, 2))
        assert one.keys() == two.keys()
        for key in one:
            assert torch.allclose(one[key].float(), two[key].float(), rtol=1e-4, atol=1e-6), (name, key)


def _close(a, b, rel: float = 1e-4) -> bool:
    """Equal structures whose floats agree to `rel`: sums over other shard orders round differently, and the
    lens trained with gradients summed over ranks carries that rounding into the numbers it gives."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), (a.keys() ^ b.keys())
        return all(_close(a[k], b[k], rel) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b)
        return all(_close(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=rel, abs=1e-9, nan_ok=True)
        return True
    assert a == b
    return True


def test_data_too_small_to_shard_is_one_error_line_and_writes_nothing(workspace):
    out = workspace / "never"
    done = _dyninfer(["probe", str(workspace / "model"), "--data", str(workspace / "text.txt"), "--seq-len", "32",
                      "--tokens", "32", "--out", str(out)], 2, workspace)
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert ours == ["error: 1 held-out windows cannot be shared among 2 processes; give each process at least one "
                    "(more data, or fewer processes)"]
    assert "exitcode  : 2" in done.stderr  # the rank exits 2; torchrun then reports the failed child its own way
    assert not out.exists()

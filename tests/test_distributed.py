"""Data-parallel runs (#17): `torchrun --nproc-per-node 2 -m dyninfer …` on gloo against one process over the
same windows and prompts: the same numbers and the same artifact, apart from timings."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CALIBRATE_ARGS, random_text, save_tiny

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("distributed")]

# Whatever measures time or speed differs between runs; everything else must not.
TIMED = {"timings", "throughput", "seconds", "calibrate_s", "tokens_per_s", "memory"}


def _dyninfer(args: list[str], processes: int, cwd: Path, launcher: str = "torchrun") -> subprocess.CompletedProcess:
    port = str(29500 + os.getpid() % 1000)
    if processes == 1:
        launcher = [sys.executable]
    elif launcher == "accelerate":  # `--multi_gpu` is accelerate's torch.distributed launcher; gloo without CUDA
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
                    "--num_machines", "1", "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no",
                    "--main_process_port", port]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                    "--master-port", port]
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


def test_two_gloo_processes_probe_calibrate_and_prune_like_one(workspace):
    base = [str(workspace / "model"), "--data", str(workspace / "text.txt")]
    # (arguments, relative tolerance). Stages with a head trained the DDP way (the exit classifier, the pruning
    # predictors) get weights equal to a few 1e-6 (gradient sums in another order, through Adam), and so a few
    # of ~1,000 tokens whose confidence lies that close to a candidate threshold cross it: their rates and
    # speedups agree to 1e-2, not 1e-4.
    stages = [
        (["probe", *base, "--seq-len", "32", "--tokens", "256", "--lens", "tuned", "--lens-train-tokens", "512",
          "--lens-steps", "3"], 1e-4),
        (["calibrate", *base, *CALIBRATE_ARGS], 1e-4),
        # The teacher-forced risk with the classifier: the traces and the classifier's training are sharded.
        (["calibrate", *base, *CALIBRATE_ARGS, "--risk", "teacher-forced-consistency", "--measure", "classifier"],
         1e-2),
        # The MLP samples and the held-out evaluation are sharded; the predictors train with DDP.
        (["prune", *base, "--seq-len", "32", "--method", "predictor", "--steps", "20", "--rank", "8",
          "--calibration-tokens", "512", "--heldout-tokens", "256", "--no-speed"], 1e-2),
    ]
    outputs = {}
    for processes in (1, 2):
        out = workspace / f"artifact-{processes}"
        outputs[processes] = []
        for args, _ in stages:
            done = _dyninfer([*args, "--out", str(out)], processes, workspace)
            assert done.returncode == 0, done.stderr[-3000:]
            outputs[processes].append(json.loads(done.stdout))  # rank 0's summary alone: other ranks are silent
    for (args, rel), one, two in zip(stages, outputs[1], outputs[2]):
        assert two["placement"].pop("processes") == 2 and "processes" not in one["placement"]
        assert _close(_untimed(two), _untimed(one), rel, args[0])
    # tune-exits: each process trains on its share of every batch and the LoRA's gradients are summed.
    tuned = {}
    for processes in (1, 2):
        done = _dyninfer(["tune-exits", *base, "--seq-len", "32", "--steps", "4", "--batch-size", "4",
                          "--heldout-tokens", "64", "--out", str(workspace / f"tuned-{processes}")], processes,
                         workspace)
        assert done.returncode == 0, done.stderr[-3000:]
        tuned[processes] = json.loads(done.stdout)
    assert tuned[2]["placement"].pop("processes") == 2
    assert _close(_untimed(tuned[2]), _untimed(tuned[1]), 1e-3, "tune-exits")
    # `accelerate launch` starts the same process group as torchrun.
    accelerated = _dyninfer([*stages[0][0], "--out", str(workspace / "accelerated")], 2, workspace, "accelerate")
    assert accelerated.returncode == 0, accelerated.stderr[-3000:]
    accelerated = json.loads(accelerated.stdout)
    assert accelerated["placement"].pop("processes") == 2
    assert _close(_untimed(accelerated), _untimed(outputs[1][0]), 1e-4, "accelerate launch probe")
    # The policy the classifier calibration certified is the same one.
    assert outputs[2][2]["policy"]["exit_points"] == outputs[1][2]["policy"]["exit_points"]
    # The artifact: written once (by rank 0), the same apart from timings.
    manifests = [json.loads((workspace / f"artifact-{n}" / "dyninfer.json").read_text()) for n in (1, 2)]
    for stage in manifests[1]["stages"].values():
        if isinstance(stage, dict) and "placement" in stage:
            assert stage["placement"].pop("processes") == 2
    assert _close(_untimed(manifests[1]["stages"]), _untimed(manifests[0]["stages"]), 1e-2)
    # Tensors: the cached continuations are equal; the tuned lens, the exit classifier and the pruning
    # predictors trained with DDP (gradients summed over the ranks) equal the one-process ones up to the
    # order of float sums.
    from safetensors.torch import load_file

    for name in sorted(p.name for p in (workspace / "artifact-1").glob("*.safetensors")):
        one, two = (load_file(workspace / f"artifact-{n}" / name) for n in (1, 2))
        assert one.keys() == two.keys()
        for key in one:
            assert torch.allclose(one[key].float(), two[key].float(), rtol=1e-4, atol=1e-6), (name, key)


def _close(a, b, rel: float = 1e-4, where: str = "") -> bool:
    """Equal structures whose floats agree to `rel`: sums over other shard orders round differently, and the
    lens trained with gradients summed over ranks carries that rounding into the numbers it gives."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), (where, a.keys() ^ b.keys())
        return all(_close(a[k], b[k], rel, f"{where}.{k}") for k in a)
    if isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), where
        return all(_close(x, y, rel, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b)))
    if isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=rel, abs=1e-9, nan_ok=True), where
        return True
    if isinstance(a, str) and isinstance(b, str):  # a statement quotes rounded numbers: their last digit may differ
        numbers = re.compile(r"-?\d+\.\d+")
        assert numbers.sub("#", a) == numbers.sub("#", b), where
        return _close([float(x) for x in numbers.findall(a)], [float(x) for x in numbers.findall(b)],
                      max(rel, 1e-5), where)
    assert a == b, where
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

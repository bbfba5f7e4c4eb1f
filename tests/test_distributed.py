"""Data-parallel runs (#17): two gloo processes against one over the same windows and prompts: the same
numbers and the same artifact, apart from timings. The stages' two-process runs share one torchrun launch
(tests/ddp_commands.py) and their one-process runs use this process, since each launch spends most of its
time importing; `accelerate launch` and the too-small-data error go through `-m dyninfer` itself."""

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


def _launcher(processes: int, launcher: str = "torchrun") -> list[str]:
    port = str(29500 + os.getpid() % 1000)
    if launcher == "accelerate":  # `--multi_gpu` is accelerate's torch.distributed launcher; gloo without CUDA
        return [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--num_processes",
            str(processes),
            "--num_machines",
            "1",
            "--multi_gpu",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            port,
        ]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-port", port]


def _launch(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=os.environ | {"OMP_NUM_THREADS": "1"})


def _dyninfer(args: list[str], processes: int, cwd: Path, launcher: str = "torchrun") -> subprocess.CompletedProcess:
    """`dyninfer ARGS --json` through a launcher's own entry point, as users start it."""
    return _launch([*_launcher(processes, launcher), "-m", "dyninfer", *args, "--json"], cwd)


def _in_one_group(commands: list[list[str]], cwd: Path) -> list[dict]:
    """Each command's JSON summary from two gloo processes, all of them in one launch (tests/ddp_commands.py):
    each launch spends most of its time importing."""
    out = cwd / "summaries"
    out.mkdir(exist_ok=True)
    helper = str(Path(__file__).with_name("ddp_commands.py"))
    done = _launch([*_launcher(2), helper, str(out), json.dumps([[*a, "--json"] for a in commands])], cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((out / f"{i}.out").read_text()) for i in range(len(commands))]


def _in_this_process(commands: list[list[str]]) -> list[dict]:
    """Each command's JSON summary from one process: this one, on one thread like each launched rank."""
    from typer.testing import CliRunner

    from dyninfer.cli.app import app

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summaries = []
        for args in commands:
            done = CliRunner().invoke(app, [*args, "--json"])
            assert done.exit_code == 0, done.output[-3000:]
            summaries.append(json.loads(done.stdout))
        return summaries
    finally:
        torch.set_num_threads(threads)


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


def test_two_gloo_processes_probe_calibrate_prune_and_tune_like_one(workspace):
    base = [str(workspace / "model"), "--data", str(workspace / "text.txt")]
    # (arguments, artifact, relative tolerance). Stages with a head trained the DDP way (the exit classifier,
    # the pruning predictors) get weights equal to a few 1e-6 (gradient sums in another order, through Adam),
    # and so a few of ~1,000 tokens whose confidence lies that close to a candidate threshold cross it: their
    # rates and speedups agree to 1e-2, not 1e-4.
    stages = [
        (
            ["probe", *base, "--seq-len", "32", "--tokens", "256", "--lens", "tuned", "--lens-train-tokens", "512", "--lens-steps", "3"],
            "artifact",
            1e-4,
        ),
        (["calibrate", *base, *CALIBRATE_ARGS], "artifact", 1e-4),
        # The teacher-forced risk with the classifier: the traces and the classifier's training are sharded.
        (["calibrate", *base, *CALIBRATE_ARGS, "--risk", "teacher-forced-consistency", "--measure", "classifier"], "artifact", 1e-2),
        # The MLP samples and the held-out evaluation are sharded; the predictors train with DDP.
        (
            [
                "prune",
                *base,
                "--seq-len",
                "32",
                "--method",
                "predictor",
                "--steps",
                "20",
                "--rank",
                "8",
                "--calibration-tokens",
                "512",
                "--heldout-tokens",
                "256",
                "--no-speed",
            ],
            "artifact",
            1e-2,
        ),
        # tune-exits: each process trains on its share of every batch and the LoRA's gradients are summed. KL weight 1:
        # at the default 10 the first steps' final KL (~3e-6 nats) amplifies the summation order's rounding past 1e-3.
        (
            ["tune-exits", *base, "--seq-len", "32", "--steps", "4", "--batch-size", "4", "--heldout-tokens", "64", "--kl-weight", "1"],
            "tuned",
            1e-3,
        ),
    ]
    one = _in_this_process([[*args, "--out", str(workspace / f"{name}-1")] for args, name, _ in stages])
    two = _in_one_group([[*args, "--out", str(workspace / f"{name}-2")] for args, name, _ in stages], workspace)
    for (args, _, rel), alone, shared in zip(stages, one, two):
        assert shared["placement"].pop("processes") == 2 and "processes" not in alone["placement"]
        assert _close(_untimed(shared), _untimed(alone), rel, args[0])
    # `accelerate launch` starts the same process group as torchrun (through the real entry point).
    accelerated = _dyninfer([*stages[0][0], "--out", str(workspace / "accelerated")], 2, workspace, "accelerate")
    assert accelerated.returncode == 0, accelerated.stderr[-3000:]
    accelerated = json.loads(accelerated.stdout)
    assert accelerated["placement"].pop("processes") == 2
    assert _close(_untimed(accelerated), _untimed(one[0]), 1e-4, "accelerate launch probe")
    # The policy the classifier calibration certified is the same one.
    assert two[2]["policy"]["exit_points"] == one[2]["policy"]["exit_points"]
    # The artifacts: written once (by rank 0), the same apart from timings.
    for name in ("artifact", "tuned"):
        manifests = [json.loads((workspace / f"{name}-{n}" / "dyninfer.json").read_text()) for n in (1, 2)]
        for stage in manifests[1]["stages"].values():
            if isinstance(stage, dict) and "placement" in stage:
                assert stage["placement"].pop("processes") == 2
        for manifest in manifests:  # a hash of the LoRA's floats: their last bits differ (compared below)
            manifest["stages"].get("tune", {}).pop("fingerprint", None)
        assert _close(_untimed(manifests[1]["stages"]), _untimed(manifests[0]["stages"]), 1e-2)
    # Tensors: the cached continuations are equal; the tuned lens, the exit classifier, the pruning
    # predictors and the LoRA trained with DDP (gradients summed over the ranks) equal the one-process ones
    # up to the order of float sums.
    from safetensors.torch import load_file

    for name in ("artifact", "tuned"):
        for file in sorted(p.name for p in (workspace / f"{name}-1").glob("*.safetensors")):
            alone, shared = (load_file(workspace / f"{name}-{n}" / file) for n in (1, 2))
            assert alone.keys() == shared.keys()
            for key in alone:
                a, b = alone[key].float(), shared[key].float()
                if name == "tuned":  # Adam divides by the gradient's size: a near-zero gradient's rounding
                    # moves its weight by up to a step (lr), so the LoRA agrees to its scale, not elementwise
                    # (1% of its scale: the LoRA's up matrices start at zero and stay near 1e-3, where that rounding is
                    # 1e-3 of them and above; a wrong shard's gradient would move them by their whole size)
                    assert (a - b).abs().max() <= 1e-2 * a.abs().max(), (file, key)
                else:
                    assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (file, key)


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
        # abs: a mean of fp32 log-probability differences (a KL near zero) rounds at about 1e-8 whatever its size
        assert a == pytest.approx(b, rel=rel, abs=1e-7, nan_ok=True), where
        return True
    if isinstance(a, str) and isinstance(b, str):  # a statement quotes rounded numbers: their last digit may differ
        numbers = re.compile(r"-?\d+\.\d+")
        assert numbers.sub("#", a) == numbers.sub("#", b), where
        return _close([float(x) for x in numbers.findall(a)], [float(x) for x in numbers.findall(b)], max(rel, 1e-5), where)
    assert a == b, where
    return True


def test_data_too_small_to_shard_is_one_error_line_and_writes_nothing(workspace):
    out = workspace / "never"
    done = _dyninfer(
        ["probe", str(workspace / "model"), "--data", str(workspace / "text.txt"), "--seq-len", "32", "--tokens", "32", "--out", str(out)],
        2,
        workspace,
    )
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert ours == [
        "error: 1 held-out windows cannot be shared among 2 processes; give each process at least one (more data, or fewer processes)"
    ]
    assert "exitcode  : 2" in done.stderr  # the rank exits 2; torchrun then reports the failed child its own way
    assert not out.exists()


def test_without_a_launcher_join_is_the_one_process_world_and_leave_does_nothing(monkeypatch):
    from dyninfer.core import distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    world = distributed.join()
    assert (world.rank, world.size, world.is_main) == (0, 1, True)
    assert not torch.distributed.is_initialized()
    distributed.leave()  # nothing was started: nothing to end
    assert distributed.current() == world


def test_the_dyninfer_launcher_exits_with_the_ranks_code(workspace):
    """torchrun exits 1 for any failed rank; `python -m dyninfer.cli.launch` exits with the rank's own code (2 here)."""
    out = workspace / "never-launched"
    port = str(29500 + (os.getpid() + 7) % 1000)
    args = ["probe", str(workspace / "model"), "--data", str(workspace / "text.txt"), "--seq-len", "32", "--tokens", "32"]
    launch = [sys.executable, "-m", "dyninfer.cli.launch", "--nproc-per-node", "2", "--master-port", port]
    done = _launch([*launch, *args, "--out", str(out)], workspace)
    assert done.returncode == 2, done.stderr[-3000:]
    assert [line for line in done.stderr.splitlines() if line.startswith("error:")] == [
        "error: 1 held-out windows cannot be shared among 2 processes; give each process at least one (more data, or fewer processes)"
    ]
    assert "ChildFailedError" not in done.stderr and not out.exists()


def test_ctrl_c_on_the_dyninfer_launcher_exits_130(workspace):
    import signal
    import time

    port = str(29500 + (os.getpid() + 11) % 1000)
    args = ["probe", str(workspace / "model"), "--data", str(workspace / "text.txt"), "--seq-len", "16", "--tokens", "64"]
    launch = [sys.executable, "-m", "dyninfer.cli.launch", "--nproc-per-node", "2", "--master-port", port]
    training = ["--lens", "tuned", "--lens-train-tokens", "512", "--lens-steps", "100000"]
    process = subprocess.Popen([*launch, *args, *training], cwd=workspace, stderr=subprocess.PIPE, text=True)
    for line in process.stderr:  # the ranks are training: well inside the run
        if "tuned lens" in line:
            break
    time.sleep(1)
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=120)
    assert process.returncode == 130

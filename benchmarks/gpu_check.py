"""The GPU paths, end to end on one CUDA GPU, in one command: `make gpu-check`.

    python benchmarks/gpu_check.py --out gpu-check.json

On the bundled model, each step a dyninfer command (its JSON summary kept):
1. `probe --device cuda --dtype bfloat16 --lens both`;
2. `calibrate --device cuda --dtype bfloat16` (generation risk, target 0.9);
3. `profile --device cuda` with NVML power and energy (fails if NVML gives no readings);
4. `export --provider cuda --dtype fp16` (KV buffers written in place by GroupQueryAttention's CUDA kernel);
5. `bench --backend onnx --provider cuda` against optimum's CUDA ORT model;
5b. `export --provider cuda --weights int4 --certify` (MatMulNBits on CUDA, the package certified on its own
    continuations through the CUDA provider) and its `bench --backend onnx` against optimum fp32 and int4;
6. the CUDA-only Triton kernel tests (a skip counts as a failure here);
7. `prune --device cuda --sparse-backend triton` with its decode timing, dense against sparse.

Everything is sized to end within 8 minutes on one GPU. It writes one JSON summary (per step: the
command, exit code, seconds and the command's own summary or its error) and exits 1 when any
step breaks: on a GPU machine a broken path fails, it is never skipped. Without CUDA it says so
in one line and exits 0.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from provenance import provenance

ROOT = Path(__file__).resolve().parents[1]


def steps(work: Path) -> list[tuple[str, list[str]]]:
    art, int4 = str(work / "artifact"), str(work / "int4")
    cuda = ["--device", "cuda"]
    return [
        ("probe", ["probe", "--lens", "both", "--tokens", "2048", "--dtype", "bfloat16", *cuda, "--out", art]),
        (
            "calibrate",
            ["calibrate", "--target", "0.9", "--prompts", "64", "--heldout-prompts", "16", "--dtype", "bfloat16", *cuda, "--out", art],
        ),
        ("profile", ["profile", "--energy-seconds", "2", *cuda, "--out", art]),
        ("export", ["export", art, "--provider", "cuda", "--dtype", "fp16"]),
        ("bench-onnx", ["bench", art, "--backend", "onnx", "--provider", "cuda", "--prompts", "8"]),
        ("export-int4", ["export", art, "--provider", "cuda", "--weights", "int4", "--certify", "--out", int4]),
        ("bench-onnx-int4", ["bench", art, "--backend", "onnx", "--provider", "cuda", "--package", int4, "--prompts", "8"]),
        ("prune-triton", ["prune", "--sparsity", "0.5", "--sparse-backend", "triton", *cuda, "--out", str(work / "pruned")]),
    ]


def run_step(name: str, args: list[str]) -> dict:
    command = [sys.executable, "-m", "dyninfer", *args, "--json"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    record = {
        "step": name,
        "command": " ".join(["dyninfer", *args]),
        "rc": done.returncode,
        "seconds": round(time.perf_counter() - started, 1),
    }
    try:
        record["summary"] = json.loads(done.stdout)
    except json.JSONDecodeError:
        record["error"] = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return record


def check_step(record: dict) -> str | None:
    """Why a step that exited 0 still did not exercise its GPU path, if it did not."""
    summary = record.get("summary") or {}
    if record["step"] in ("probe", "calibrate") and summary.get("placement", {}).get("dtype") != "bfloat16":
        return f"ran in {summary.get('placement')}, not cuda bfloat16"
    if record["step"] == "profile" and not (summary.get("gpu") or {}).get("available"):
        return f"no NVML readings: {(summary.get('gpu') or {}).get('reason')}"
    if record["step"] == "export" and summary.get("kv_layout") != "buffer":  # GroupQueryAttention's fp16 CUDA kernel
        return f"the fp16 package did not get the buffered KV layout: {summary.get('notes')}"
    if record["step"] == "export-int4" and (summary.get("certificate") or {}).get("provider") != "CUDAExecutionProvider":
        return f"the int4 package was not certified on the CUDA provider: {(summary.get('certificate') or {}).get('provider')}"
    if record["step"] == "bench-onnx-int4" and "optimum int4" not in [m.get("mode") for m in summary.get("modes", [])]:
        return "no optimum int4 row: the baseline was not quantized"
    if record["step"] in ("bench-onnx", "bench-onnx-int4") and not any(
        "CUDAExecutionProvider" in n or "provider: cuda" in n.lower() for n in summary.get("notes", [])
    ):
        return "ONNX Runtime did not run on the CUDA provider"
    if record["step"] == "prune-triton" and (summary.get("speed") or {}).get("backend") != "triton":
        return f"decoded with {(summary.get('speed') or {}).get('backend')}, not triton"
    return None


def triton_tests() -> dict:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_kernels_triton.py", "-k", "on_cuda"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    tail = done.stdout.strip().splitlines()[-1:] or ["no output"]
    record = {
        "step": "triton-cuda-tests",
        "command": "pytest tests/test_kernels_triton.py -k on_cuda",
        "rc": done.returncode,
        "seconds": round(time.perf_counter() - started, 1),
        "result": tail[0],
    }
    if done.returncode == 0 and "skipped" in tail[0]:
        record["rc"], record["error"] = 1, "a CUDA test was skipped on a CUDA machine"
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="gpu-check.json", help="where the JSON summary goes")
    parser.add_argument("--work", default=None, help="folder for the artifacts (default: a temporary one)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(f"gpu-check: torch {torch.__version__} sees no CUDA GPU; nothing to check here")
        return 0
    work = Path(args.work or tempfile.mkdtemp(prefix="dyninfer-gpu-check-"))
    records, started = [], time.perf_counter()
    for name, step_args in steps(work):
        record = run_step(name, step_args)
        problem = check_step(record) if record["rc"] == 0 else None
        if problem:
            record["rc"], record["error"] = 1, problem
        records.append(record)
        print(
            f"gpu-check {name}: {'ok' if record['rc'] == 0 else 'FAILED: ' + record.get('error', '')} ({record['seconds']} s)", flush=True
        )
        if name == "profile":  # the kernels' own tests between the model steps and the pruning timing
            records.append(triton_tests())
            print(f"gpu-check triton-cuda-tests: {records[-1].get('error') or records[-1]['result']}", flush=True)
    failed = [r["step"] for r in records if r["rc"] != 0]
    summary = {
        "provenance": provenance(),
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "passed": not failed,
        "failed": failed,
        "seconds": round(time.perf_counter() - started, 1),
        "steps": records,
    }
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(f"gpu-check: {'passed' if not failed else 'FAILED: ' + ', '.join(failed)}; wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""onnxruntime-genai's export of the same model as a bench row: what a CPU user ships without dyninfer.

Its builder (`python -m onnxruntime_genai.models.builder -m HF_FOLDER -o OUT -p int4 -e cpu`) writes a fused graph
and a genai_config.json; its runtime runs it with KV buffers shared between steps. onnxruntime-genai installs the
plain onnxruntime wheel, which must not sit beside onnxruntime-gpu, and its builder wants a newer transformers than
optimum allows: so it usually lives in a virtualenv of its own, whose Python runs the builder and a worker process
(profilers/genai_worker.py) that this module talks to. `python benchmarks/genai_baseline.py` makes that
virtualenv; bench's `genai_python` option uses one.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dyninfer.core.errors import DyninferError, option
from dyninfer.core.models import cache_dir
from dyninfer.profilers.bench import plain_result
from dyninfer.profilers.onnx_bench import Row
from dyninfer.runtime.decoding import GenerationResult

WORKER = Path(__file__).with_name("genai_worker.py")
BUILDER = "onnxruntime_genai.models.builder"
BUILD_RECORD = "dyninfer-genai-build.json"
GENAI_INT4 = "onnxruntime-genai int4"
MISSING_NOTE = (
    "onnxruntime-genai's int4 export of this model is not a row: onnxruntime-genai is not importable here. It installs "
    "the plain onnxruntime wheel, which must not sit beside onnxruntime-gpu: `python benchmarks/genai_baseline.py "
    f"ARTIFACT` makes a virtualenv for it and measures every row; {option('genai_python')} VENV/bin/python uses one you have"
)


def local_genai_python() -> str | None:
    """This Python when onnxruntime-genai is importable here, else None."""
    return sys.executable if importlib.util.find_spec("onnxruntime_genai") is not None else None


def genai_folder(content_hash: str, precision: str) -> Path:
    """Where onnxruntime-genai's export of the model with this content hash, at `precision`, is built once and kept."""
    return cache_dir() / "genai" / f"{content_hash[:16]}-{precision}"


def build_genai(python: str, model_folder: str, out: Path, precision: str = "int4", cache: Path | None = None) -> dict:
    """Run onnxruntime-genai's builder (CPU, its defaults otherwise) on a Hugging Face folder into `out`, once: the
    folder keeps a record of the command and versions, and a later call with the same command reuses it. Returns
    that record. The builder runs from a temporary folder (a folder of ours named like a module it imports would
    shadow it)."""
    out = Path(out)
    command = [python, "-m", BUILDER, "-m", str(model_folder), "-o", str(out), "-p", precision, "-e", "cpu"]
    record_path = out / BUILD_RECORD
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("command") == command[1:]:
            return record
    shutil.rmtree(out, ignore_errors=True)
    with tempfile.TemporaryDirectory() as scratch:
        command += ["-c", str(Path(scratch) / "cache")]
        done = subprocess.run(command, cwd=scratch, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0 or not (out / "genai_config.json").is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [str(done.returncode)]
        raise DyninferError(f"onnxruntime-genai's builder failed on '{model_folder}': {tail[0][:300]}")
    record = {"command": command[1:-2], "precision": precision, "versions": GenaiWorker(python).versions()}
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return record


class GenaiWorker:
    """A worker process (`python profilers/genai_worker.py serve`) running onnxruntime-genai in `python`."""

    def __init__(self, python: str):
        self.python = python
        self.process = subprocess.Popen(
            [python, str(WORKER), "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )

    def ask(self, **request) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise DyninferError(f"the onnxruntime-genai worker in {self.python} stopped (is onnxruntime-genai installed there?)")
        answer = json.loads(line)
        if "error" in answer:
            raise DyninferError(f"onnxruntime-genai: {answer['error'][:300]}")
        return answer

    def versions(self) -> dict:
        return self.ask(op="versions")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=60)


def genai_row(python: str, folder: Path, name: str, new_tokens: int, depth: int) -> tuple[Row, GenaiWorker]:
    """A bench row running the genai export in `folder` by its own runtime, in a worker process of `python` (close
    the returned worker when done)."""
    worker = GenaiWorker(python)
    worker.ask(op="load", folder=str(folder))

    def run(prompt: torch.Tensor) -> GenerationResult:
        started = time.perf_counter()
        answer = worker.ask(op="greedy", prompt=prompt[0].tolist(), new_tokens=new_tokens)
        result = plain_result(torch.tensor([answer["tokens"]]), name, depth, {"prefill_seconds": answer["prefill_seconds"]})
        # the worker's own clock: the pipe's time is not the runtime's
        result.untimed_seconds = max(0.0, time.perf_counter() - started - answer["seconds"])
        return result

    def forced(prompts: np.ndarray, continuations: np.ndarray, threshold):
        rows = []
        with tempfile.TemporaryDirectory() as scratch:
            out = str(Path(scratch) / "logits.npy")
            for prompt, continuation in zip(prompts, continuations):
                worker.ask(op="forced", prompt=prompt.tolist(), continuation=continuation.tolist(), out=out)
                rows.append(np.load(out))
        return np.stack(rows), np.full(continuations.shape, -1)

    def memory(prompt: list[int], new: int) -> dict:
        command = [python, str(WORKER), "memory", str(folder), ",".join(map(str, prompt)), str(new)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            raise DyninferError(f"the onnxruntime-genai memory probe failed: {done.stderr.strip().splitlines()[-1:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    warm = lambda prompt: worker.ask(op="greedy", prompt=prompt[0].tolist(), new_tokens=2)
    return Row(name, run, forced, None, memory, None, warm), worker

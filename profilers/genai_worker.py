"""onnxruntime-genai's own runtime on a model its builder exported: greedy generation with the prefill timed apart,
the logits it gives fed another model's continuation token by token, and a process's peak memory.

This file imports nothing of dyninfer, so it also runs as a script by path in a virtualenv of its own
(benchmarks/genai_baseline.py): onnxruntime-genai installs the plain onnxruntime wheel, which must not sit beside
onnxruntime-gpu. There it serves requests, one JSON object a line on stdin, one answer a line on stdout:

    python profilers/genai_worker.py serve            {"op": "load", "folder": F} -> {"ok": true}
                                                       {"op": "greedy", "prompt": [ids], "new_tokens": n}
                                                         -> {"tokens", "prefill_seconds", "seconds"}
                                                       {"op": "forced", "prompt": [ids], "continuation": [ids], "out": F.npy}
                                                         -> {"ok": true} (logits [T, V] float32 written to F.npy)
                                                       {"op": "versions"} -> {package: version}
    python profilers/genai_worker.py memory FOLDER IDS NEW_TOKENS    (one JSON line: peak_rss_mib, imports_rss_mib, model_rss_mib)
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


class GenaiModel:
    """A model folder written by onnxruntime-genai's builder (genai_config.json beside the graph), run by its runtime
    on the CPU, batch 1, greedy, with its KV buffers sized to each request (prompt + new tokens), as dyninfer's
    package runtime sizes its own."""

    def __init__(self, folder: str):
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(folder)

    def _generator(self, length: int):
        params = self.og.GeneratorParams(self.model)
        # min_length = max_length: every row decodes the same number of tokens (end of sequence masked)
        params.set_search_options(max_length=length, min_length=length, do_sample=False, batch_size=1)
        return self.og.Generator(self.model, params)

    def greedy(self, prompt: list[int], new_tokens: int) -> dict:
        """Greedy tokens after `prompt`; the prefill's seconds (prompt in, first token out) and the whole call's."""
        started = time.perf_counter()
        generator = self._generator(len(prompt) + new_tokens)
        generator.append_tokens(np.asarray([prompt], dtype=np.int32))
        tokens, prefill = [], 0.0
        while len(tokens) < new_tokens and not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
            if len(tokens) == 1:
                prefill = time.perf_counter() - started
        return {"tokens": tokens, "prefill_seconds": prefill, "seconds": time.perf_counter() - started}

    def forced(self, prompt: list[int], continuation: list[int]) -> np.ndarray:
        """The logits [T, V] at each position of `continuation` fed after `prompt` one token at a time (the first row:
        after the prompt's prefill), as the runtime computes them when decoding."""
        generator = self._generator(len(prompt) + len(continuation))
        generator.append_tokens(np.asarray([prompt], dtype=np.int32))
        rows = [np.array(generator.get_logits(), dtype=np.float32).reshape(-1)]
        for token in continuation[:-1]:
            generator.append_tokens(np.asarray([[token]], dtype=np.int32))
            rows.append(np.array(generator.get_logits(), dtype=np.float32).reshape(-1))
        return np.stack(rows)


def versions() -> dict:
    from importlib import metadata

    out = {}
    for name in ("onnxruntime-genai", "onnxruntime", "transformers", "torch", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _status_mib(field: str) -> float | None:
    """A memory line of Linux's /proc/self/status in MiB (VmHWM: this program's own peak; getrusage's is inherited
    across exec on Linux). Repeated from dyninfer/profilers/row_memory.py, since this file imports nothing of dyninfer."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def memory(folder: str, prompt: list[int], new_tokens: int) -> dict:
    """Import the runtime, note the RSS, load the model and decode; the peak and its shares."""
    import onnxruntime_genai  # noqa: F401 (the imports' share of the memory)

    imported = _status_mib("VmRSS") or 0.0
    GenaiModel(folder).greedy(prompt, new_tokens)
    peak = _status_mib("VmHWM") or 0.0
    return {"peak_rss_mib": round(peak, 1), "imports_rss_mib": round(imported, 1), "model_rss_mib": round(peak - imported, 1)}


def serve(stdin=sys.stdin, stdout=sys.stdout) -> None:
    model = None
    for line in stdin:
        request = json.loads(line)
        try:
            if request["op"] == "load":
                model, answer = GenaiModel(request["folder"]), {"ok": True}
            elif request["op"] == "greedy":
                answer = model.greedy(request["prompt"], request["new_tokens"])
            elif request["op"] == "forced":
                np.save(request["out"], model.forced(request["prompt"], request["continuation"]))
                answer = {"ok": True}
            elif request["op"] == "versions":
                answer = versions()
            else:
                answer = {"error": f"unknown op {request['op']!r}"}
        except Exception as exc:  # the caller reads the reason; the worker stays up
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        stdout.write(json.dumps(answer) + "\n")
        stdout.flush()


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve()
    elif sys.argv[1:2] == ["memory"]:
        folder, ids, new = sys.argv[2], [int(t) for t in sys.argv[3].split(",")], int(sys.argv[4])
        sys.stdout.write(json.dumps(memory(folder, ids, new)) + "\n")
    else:
        sys.exit(__doc__)

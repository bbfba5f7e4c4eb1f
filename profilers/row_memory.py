"""Peak memory of one way of running a model, measured in a process of its own.

A bench row's runtime loads its model and decodes one prompt in a fresh Python process, importing only what that
runtime needs (the package runtime: numpy and onnxruntime; optimum and transformers: torch too), as a server of
that row would. The process reports its peak resident set size and its RSS after the imports, before the model
loaded; the difference is what the model and its decoding took. One process per row, so no row's memory hides
another's.

    python -m dyninfer.profilers.row_memory KIND PATH PROMPT_IDS NEW_TOKENS [PROVIDER] [MODE]
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys

from dyninfer.core.choices import PROVIDER_NAMES

KINDS = ("transformers", "optimum", "package")
_MIB = 2**20


def _status_mib(field: str) -> float | None:
    """A memory line of Linux's /proc/self/status in MiB (None elsewhere)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _rss_mib() -> float:
    """This process's resident set size now (the peak so far where /proc is missing)."""
    now = _status_mib("VmRSS")
    return now if now is not None else _peak_mib()


def _peak_mib() -> float:
    """This process's peak RSS. Linux: VmHWM, this program's own; getrusage's ru_maxrss is not, since Linux carries
    it across exec from the parent that forked us (a bench process of gigabytes would set every row's peak)."""
    peak = _status_mib("VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (_MIB if sys.platform == "darwin" else 1024)


def row_peak_memory(kind: str, path: str, prompt: list[int], new_tokens: int, provider: str = "cpu", mode: str = "full") -> dict:
    """{peak_rss_mib, imports_rss_mib, model_rss_mib} of a process that runs `kind` from `path` on `prompt`."""
    if kind not in KINDS:
        raise ValueError(f"unknown row kind {kind!r}")
    command = [
        sys.executable,
        "-m",
        "dyninfer.profilers.row_memory",
        kind,
        str(path),
        ",".join(map(str, prompt)),
        str(new_tokens),
        provider,
        mode,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise RuntimeError(f"the {kind} memory probe failed: {lines[-1] if lines else done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _decode(kind: str, path: str, prompt: list[int], new_tokens: int, provider: str, mode: str) -> float:
    """Import `kind`'s runtime, note the RSS, load and decode; returns the RSS after the imports."""
    if kind == "package":
        import numpy as np
        import onnxruntime  # noqa: F401 (imported here, not at the first session: it belongs to the imports' share)

        from dyninfer.runtime.onnx_decoder import OnnxDecoder

        imported = _rss_mib()
        OnnxDecoder(path, provider=provider).generate(np.array([prompt], dtype=np.int64), new_tokens, mode=mode)
        return imported
    import torch

    ids = torch.tensor([prompt])
    if kind == "optimum":
        from optimum.onnxruntime import ORTModelForCausalLM

        from dyninfer.exporters.baseline import OptimumBaseline

        imported = _rss_mib()
        runtime = PROVIDER_NAMES[provider]
        model = ORTModelForCausalLM.from_pretrained(path, provider=runtime, use_cache=True, use_io_binding=provider == "cuda")
        OptimumBaseline(model).greedy(ids, new_tokens)
        return imported
    from transformers import AutoModelForCausalLM, DynamicCache

    imported = _rss_mib()
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        token = model(ids, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(new_tokens - 1):
            token = model(token, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
    return imported


def main(argv: list[str]) -> None:
    kind, path, prompt, new_tokens = argv[0], argv[1], [int(t) for t in argv[2].split(",")], int(argv[3])
    provider, mode = (argv[4] if len(argv) > 4 else "cpu"), (argv[5] if len(argv) > 5 else "full")
    imported = _decode(kind, path, prompt, new_tokens, provider, mode)
    peak = _peak_mib()
    sys.stdout.write(
        json.dumps({"peak_rss_mib": round(peak, 1), "imports_rss_mib": round(imported, 1), "model_rss_mib": round(peak - imported, 1)})
        + "\n"
    )


if __name__ == "__main__":
    main(sys.argv[1:])

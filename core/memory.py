"""Peak memory of this process: what a probe or an audit needed, beside the weights it loaded."""

from __future__ import annotations

import resource
import sys

import torch

_MIB = 2**20


def weights_mib(model: torch.nn.Module) -> float:
    """Parameters and buffers of `model`, in MiB."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) / _MIB


def peak_memory(model: torch.nn.Module | None = None) -> dict:
    """Peak resident set size of this process so far (and peak CUDA memory where torch uses a GPU), in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out = {
        "peak_rss_mib": round(peak / (_MIB if sys.platform == "darwin" else 1024), 1),
        "peak_cuda_mib": round(torch.cuda.max_memory_allocated() / _MIB, 1) if torch.cuda.is_initialized() else None,
    }
    if model is not None:
        out["weights_mib"] = round(weights_mib(model), 1)
    return out

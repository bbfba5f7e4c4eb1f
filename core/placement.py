"""Where a model runs and in what precision: the `device` and `dtype` options of every job that loads one.

- device: ``auto`` (CUDA when torch sees a GPU, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``;
- dtype: ``auto`` (the checkpoint's own dtype on CUDA, float32 on the CPU), ``float32``,
  ``bfloat16`` or ``float16``;
- device_map: ``auto`` spreads a model too big for one device over the GPUs, the CPU and the
  disk (accelerate's `infer_auto_device_map`, dispatched with its hooks), within ``max_memory``
  ("0=70GiB,1=70GiB,cpu=200GiB,disk=1TiB"; without a ``disk`` entry nothing goes to disk).

Whatever the model's dtype, statistics (agreement, KL, ECE, LTT losses, profile sums) are
accumulated in float32 or wider, and what dyninfer trains (tuned lens, exit classifiers,
pruning predictors) keeps float32 master weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dyninfer.core.choices import DTYPE_CHOICES, MODEL_DTYPES
from dyninfer.core.errors import DyninferError, check_choice, option

# torch is imported where a placement is resolved, not at import: every job's Config derives from
# PlacementOptions, and the CLI reads the Configs for `--help` without loading torch.
if TYPE_CHECKING:
    import torch
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_MEMORY_KEY = re.compile(r"^(cpu|disk|cuda:\d+|\d+)$")
_MEMORY_SIZE = re.compile(r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def _torch():
    import torch

    return torch


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class PlacementOptions:
    """The two options every model-loading job's Config shares (a base class of those Configs)."""

    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None  # "auto": spread the model over the GPUs, the CPU and the disk
    max_memory: str | None = None  # with device_map: "0=70GiB,cpu=200GiB,disk=1TiB"

    def placement(self) -> Placement:
        return Placement(self.device, self.dtype, self.device_map, self.max_memory)

    def placed(self) -> dict:
        """The options as keyword arguments, for the Configs of the stages a job runs."""
        return {"device": self.device, "dtype": self.dtype, "device_map": self.device_map, "max_memory": self.max_memory}


@dataclass(frozen=True)
class Placement:
    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None
    max_memory: str | None = None

    def validate(self) -> None:
        if not isinstance(self.device, str) or not _DEVICE.match(self.device):
            raise DyninferError(f"{option('device')} must be auto, cpu, cuda or cuda:N, got '{self.device}'")
        check_choice("dtype", self.dtype, DTYPE_CHOICES)
        if self.device_map is not None:
            check_choice("device_map", self.device_map, ("auto",))
            if self.device != "auto":
                raise DyninferError(
                    f"{option('device_map')} auto places every layer itself; leave {option('device')} at auto (got {self.device})"
                )
        elif self.max_memory is not None:
            raise DyninferError(f"{option('max_memory')} goes with {option('device_map')} auto")
        self.memory_limits()
        self.torch_device()

    def memory_limits(self) -> dict | None:
        """`max_memory` as accelerate takes it: {0: bytes, "cpu": bytes, "disk": bytes}."""
        if self.max_memory is None:
            return None
        limits: dict = {}
        for part in str(self.max_memory).split(","):
            key, _, size = (p.strip() for p in part.partition("="))
            size_match = _MEMORY_SIZE.match(size)
            if not _MEMORY_KEY.match(key) or not size_match:
                raise DyninferError(
                    f"{option('max_memory')} takes DEVICE=SIZE pairs like 0=70GiB,cpu=200GiB,disk=1TiB "
                    f"(devices: N or cuda:N, cpu, disk), got '{part.strip()}'"
                )
            unit = size_match.group(2).lower()
            key = int(key.removeprefix("cuda:")) if key not in ("cpu", "disk") else key
            limits[key] = int(float(size[: -len(unit)].strip()) * _UNITS[unit])
        gpus = [k for k in limits if isinstance(k, int)]
        torch = _torch()
        if gpus and (not torch.cuda.is_available() or max(gpus) >= torch.cuda.device_count()):
            raise DyninferError(
                f"{option('max_memory')} names GPU {max(gpus)}, but torch sees "
                f"{torch.cuda.device_count() if torch.cuda.is_available() else 'no'} CUDA GPU(s)"
            )
        return limits

    def torch_device(self) -> torch.device:
        torch = _torch()
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise DyninferError(
                    f"{option('device')} {self.device}, but torch {torch.__version__} sees no CUDA GPU; "
                    f"use {option('device')} cpu (or auto)"
                )
            count = torch.cuda.device_count()
            if device.index is not None and device.index >= count:
                raise DyninferError(f"{option('device')} {self.device}, but torch sees {count} CUDA GPU(s): cuda:0 to cuda:{count - 1}")
        return device

    def torch_dtype(self, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
        """The dtype to load in: the requested one, else the checkpoint's on CUDA and float32 on the CPU."""
        torch = _torch()
        if self.dtype != "auto":
            return getattr(torch, self.dtype)
        if self.torch_device().type == "cuda" and checkpoint_dtype in [getattr(torch, name) for name in MODEL_DTYPES]:
            return checkpoint_dtype
        return torch.float32


CPU_FLOAT32 = Placement("cpu", "float32")

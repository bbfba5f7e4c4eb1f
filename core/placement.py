"""Where a model runs and in what precision: the `device` and `dtype` options of every job that loads one.

- device: ``auto`` (CUDA when torch sees a GPU, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``;
- dtype: ``auto`` (the checkpoint's own dtype on CUDA, float32 on the CPU), ``float32``,
  ``bfloat16`` or ``float16``.

Whatever the model's dtype, statistics (agreement, KL, ECE, LTT losses, profile sums) are
accumulated in float32 or wider, and what dyninfer trains (tuned lens, exit classifiers,
pruning predictors) keeps float32 master weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from dyninfer.core.errors import DyninferError, check_choice, option

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class PlacementOptions:
    """The two options every model-loading job's Config shares (a base class of those Configs)."""

    device: str = "auto"
    dtype: str = "auto"

    def placement(self) -> Placement:
        return Placement(self.device, self.dtype)

    def placed(self) -> dict:
        """The two options as keyword arguments, for the Configs of the stages a job runs."""
        return {"device": self.device, "dtype": self.dtype}


@dataclass(frozen=True)
class Placement:
    device: str = "auto"
    dtype: str = "auto"

    def validate(self) -> None:
        if not isinstance(self.device, str) or not _DEVICE.match(self.device):
            raise DyninferError(f"{option('device')} must be auto, cpu, cuda or cuda:N, got '{self.device}'")
        check_choice("dtype", self.dtype, DTYPE_CHOICES)
        self.torch_device()

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise DyninferError(f"{option('device')} {self.device}, but torch {torch.__version__} sees no CUDA GPU; "
                                    f"use {option('device')} cpu (or auto)")
            count = torch.cuda.device_count()
            if device.index is not None and device.index >= count:
                raise DyninferError(f"{option('device')} {self.device}, but torch sees {count} CUDA GPU(s): "
                                    f"cuda:0 to cuda:{count - 1}")
        return device

    def torch_dtype(self, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
        """The dtype to load in: the requested one, else the checkpoint's on CUDA and float32 on the CPU."""
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        if self.torch_device().type == "cuda" and checkpoint_dtype in DTYPES.values():
            return checkpoint_dtype
        return torch.float32


CPU_FLOAT32 = Placement("cpu", "float32")

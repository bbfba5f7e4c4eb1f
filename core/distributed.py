"""Data-parallel runs on torch.distributed: `torchrun --nproc-per-node N -m dyninfer …` or `accelerate launch`.

The launcher sets RANK / WORLD_SIZE (and MASTER_ADDR / MASTER_PORT); `join` starts the process
group from them (nccl on CUDA, gloo on the CPU). Each rank takes every size-th unit of work
(`World.shard`), sums are all-reduced in float64 (`World.sum`), and only rank 0 writes artifacts
and prints. Without a launcher everything here is the one-process identity.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from dyninfer.core.errors import DyninferError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int, what: str = "units") -> list[int]:
        """This rank's share of `n` units: every size-th one from its rank (all of them alone)."""
        if n < self.size:
            raise DyninferError(
                f"{n} {what} cannot be shared among {self.size} processes; give each process at least one (more data, or fewer processes)"
            )
        return list(range(self.rank, n, self.size))

    def sum(self, values):
        """`values` (a number or an array) summed over the ranks, in float64."""
        if self.size == 1:
            return values
        tensor = torch.as_tensor(np.asarray(values, dtype=np.float64))
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.item() if tensor.dim() == 0 else tensor.numpy()

    def gather_rows(self, part, n: int):
        """The rows of all ranks' `shard(n)` parts (tensors or arrays), back in their original order."""
        if self.size == 1:
            return part
        parts: list = [None] * self.size
        dist.all_gather_object(parts, part)
        first = parts[0]
        whole = (
            first.new_empty((n, *first.shape[1:]))
            if isinstance(first, torch.Tensor)
            else np.empty((n, *first.shape[1:]), dtype=first.dtype)
        )
        for rank, rows in enumerate(parts):
            whole[rank :: self.size] = rows
        return whole

    def gather_window_columns(self, part: torch.Tensor, n: int, dim: int = 1) -> torch.Tensor:
        """All ranks' `part`s whose dimension `dim` runs over their `shard(n)` windows, each window's
        positions together (window-major), joined back in window order."""
        if self.size == 1:
            return part
        windows = len(range(self.rank, n, self.size))
        per_window = part.unflatten(dim, (windows, -1)).movedim(dim, 0)  # [windows, ..., positions, ...]
        whole = self.gather_rows(per_window.contiguous(), n)
        return whole.movedim(0, dim).flatten(dim, dim + 1)

    def union(self, values: torch.Tensor) -> torch.Tensor:
        """The sorted union of every rank's 1-D `values`."""
        if self.size == 1:
            return values
        parts: list = [None] * self.size
        dist.all_gather_object(parts, values.cpu())
        return torch.unique(torch.cat(parts)).to(values.device)

    def sum_gradients(self, parameters) -> None:
        """All-reduce (sum) the gradients of `parameters`: each rank's loss is its share of the global mean."""
        if self.size == 1:
            return
        for p in parameters:
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)

    def max(self, value: float) -> float:
        if self.size == 1:
            return value
        tensor = torch.tensor(float(value), dtype=torch.float64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor.item()


def current() -> World:
    """The world this process belongs to (one process when no group was started)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def join() -> World:
    """Start the process group a launcher described in the environment, once; the one-process world otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size > 1 and dist.is_available() and not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return current()


def leave() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

"""The meters `layer_profile` reads pieces of a pass with: wall clock, FLOPs and peak tensor memory.

Each meter opens a window when a piece starts and closes it when it ends: named pieces through
`Meter.piece`, decoder-layer blocks through forward hooks (`Meter.hooked`), so no architecture
code is needed here.
"""

from __future__ import annotations

import time
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from dyninfer.core.cost import EXTRA_FLOP_FORMULAS
from dyninfer.core.layered import LayeredModel

Key = tuple[str, int]  # (piece, layer); model-level pieces use layer -1
MODEL_LEVEL = -1


class Meter:
    """Measures named pieces of one pass; decoder-layer blocks are measured through hooks."""

    def start(self, key: Key):
        return None

    def stop(self, key: Key, token) -> None:
        pass

    def active(self):
        return nullcontext()

    @contextmanager
    def piece(self, key: Key) -> Iterator[None]:
        token = self.start(key)
        try:
            yield
        finally:
            self.stop(key, token)

    @contextmanager
    def hooked(self, lm: LayeredModel) -> Iterator[None]:
        handles, open_tokens = [], {}
        for index in range(lm.num_layers):
            for piece, module in lm.blocks(index):
                key = (piece, index)

                def before(_module, _args, key=key):
                    open_tokens[key] = self.start(key)

                def after(_module, _args, _output, key=key):
                    self.stop(key, open_tokens.pop(key))

                handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


class Clock(Meter):
    """Seconds per piece, one sample per run while `recording`."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.samples: dict[Key, list[float]] = defaultdict(list)
        self.recording = False

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def start(self, key: Key) -> float:
        return self.now()

    def stop(self, key: Key, token: float) -> None:
        if self.recording:
            self.samples[key].append(self.now() - token)


class FlopMeter(Meter):
    """FLOPs per piece in one pass, read off one running counter."""

    def __init__(self):
        self.counter = FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS)
        self.flops: dict[Key, float] = {}

    def active(self):
        return self.counter

    def start(self, key: Key) -> int:
        return self.counter.get_total_flops()

    def stop(self, key: Key, token: int) -> None:
        self.flops[key] = float(self.counter.get_total_flops() - token)


class _LiveBytes(TorchDispatchMode):
    """Bytes of tensor storage alive, and the peak of it inside each open window."""

    def __init__(self):
        super().__init__()
        self.live: set[int] = set()
        self.current = 0
        self.windows: dict[int, list[int]] = {}  # id -> [bytes at open, peak]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Views and in-place results share an input's storage: not an allocation.
        inputs = {v.untyped_storage().data_ptr() for v in tree_flatten((args, kwargs))[0] if isinstance(v, torch.Tensor)}
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() not in inputs:
                self._track(value.untyped_storage())
        return out

    def _track(self, storage) -> None:
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self.live:
            return
        self.live.add(key)
        self.current += size
        weakref.finalize(storage, self._free, key, size)
        for window in self.windows.values():
            window[1] = max(window[1], self.current)

    def _free(self, key: int, size: int) -> None:
        self.live.discard(key)
        self.current -= size


class MemoryMeter(Meter):
    """Peak bytes allocated inside each piece, above what was alive when it started."""

    def __init__(self):
        self.tracker = _LiveBytes()
        self.peaks: dict[Key, float] = {}
        self._next = 0

    def active(self):
        return self.tracker

    def start(self, key: Key) -> int:
        self._next += 1
        self.tracker.windows[self._next] = [self.tracker.current, self.tracker.current]
        return self._next

    def stop(self, key: Key, token: int) -> None:
        at_open, peak = self.tracker.windows.pop(token)
        self.peaks[key] = float(peak - at_open)


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of tensors allocated while fn() runs, above what was alive before."""
    meter = MemoryMeter()
    with meter.active(), meter.piece(("call", MODEL_LEVEL)):
        fn()
    return int(meter.peaks[("call", MODEL_LEVEL)])

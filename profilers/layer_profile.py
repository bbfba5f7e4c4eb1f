"""What each piece of a model costs on this machine: FLOPs, parameters, memory, latency.

Pieces: the embedding (with each step's setup: positions, masks, rotary tables), every
decoder layer's blocks (attention and MLP; Mamba's mixer) plus the rest of the layer (its
norms and residual adds), the final norm and the LM head. A prefill runs a `context`-token
prompt; a decode step runs one token after `context` tokens of cache.

Three meters walk the same layer-by-layer pass (`LayeredModel`), each reading the blocks
through forward hooks so no architecture code is needed here:
- FLOPs: torch.utils.flop_counter (matmuls and attention; norms and element-wise ops count
  zero, and so does the element-wise state update of Mamba's selective scan in its CPU path);
- memory: the peak of tensor bytes allocated inside a piece while it runs (its output and
  any cache growth included), tracked by a dispatch mode that watches storages;
- latency: wall clock per piece over repeats after a warm-up, with the GPU synchronised at
  every reading (so pieces add up to a step, at the price of the pipelining a real decode
  loop gets).
"""

from __future__ import annotations

import time
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from dyninfer.core.cost import EXTRA_FLOP_FORMULAS, CostModel
from dyninfer.core.layered import LayeredModel
from dyninfer.core.progress import ProgressFn, silent

Key = tuple[str, int]  # (piece, layer); model-level pieces use layer -1
MODEL_LEVEL = -1

# Columns of `LayerProfile.pieces`, one row per piece.
COLUMNS = (
    "piece",
    "layer",
    "params",
    "weight_bytes",
    "decode_flops",
    "prefill_flops_per_token",
    "cache_bytes",
    "activation_bytes",
    "decode_ms",
    "decode_ms_p10",
    "decode_ms_p90",
    "prefill_ms",
    "prefill_ms_p10",
    "prefill_ms_p90",
)


# --------------------------------------------------------------------------- meters


class _Meter:
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


class _Clock(_Meter):
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


class _Flops(_Meter):
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


class _Memory(_Meter):
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
    meter = _Memory()
    with meter.active(), meter.piece(("call", MODEL_LEVEL)):
        fn()
    return int(meter.peaks[("call", MODEL_LEVEL)])


# --------------------------------------------------------------------------- one pass


def _pass(lm: LayeredModel, input_ids: torch.Tensor, cache, meter: _Meter) -> None:
    """Embedding, each decoder layer, final norm and head, each measured as a piece."""
    with meter.piece(("embed", MODEL_LEVEL)):
        fwd = lm.begin(input_ids, cache=cache)
    hidden = fwd.hidden
    for index in range(lm.num_layers):
        with meter.piece(("layer", index)):
            hidden = lm.run_layer(fwd, index, hidden)
    with meter.piece(("norm", MODEL_LEVEL)):
        normed = lm.final_norm(hidden)
    with meter.piece(("head", MODEL_LEVEL)):
        lm.head(normed)


class _Workload:
    """Builds the caches for prefill and decode passes and runs them."""

    def __init__(self, lm: LayeredModel, prompt: torch.Tensor):
        self.lm = lm
        self.prompt = prompt.to(lm.device)
        self.step = self.prompt[:, -1:].clone()
        self.context = prompt.shape[1]
        self._decode_cache = None

    def prefill(self, meter: _Meter) -> None:
        _pass(self.lm, self.prompt, self.lm.new_decoding_cache(1), meter)

    def decode(self, meter: _Meter) -> None:
        """One token after exactly `context` cached tokens."""
        _pass(self.lm, self.step, self.cache_at_context(), meter)

    def cache_at_context(self):
        """The decode cache holding exactly `context` tokens (cropped back after each step;
        Mamba's state has a fixed size, so there is nothing to crop)."""
        if self._decode_cache is None:
            self._decode_cache = self.lm.new_decoding_cache(1)
            self.lm.forward_logits(self.prompt, cache=self._decode_cache)
        elif hasattr(self._decode_cache, "crop"):
            self._decode_cache.crop(self.context)
        return self._decode_cache


def workloads(lm: LayeredModel, prompt: torch.Tensor) -> dict[str, Callable[[], int]]:
    """Unmeasured prefill and decode passes (for energy windows); each returns its token count."""
    work, meter = _Workload(lm, prompt), _Meter()

    def prefill() -> int:
        work.prefill(meter)
        return work.context

    def decode() -> int:
        work.decode(meter)
        return 1

    return {"decode": decode, "prefill": prefill}


# --------------------------------------------------------------------------- result


@dataclass
class LayerProfile:
    """Per-piece cost of one model at one context length on one device."""

    pieces: pd.DataFrame  # COLUMNS, one row per piece, in model order (layer -1: embed, norm, head)
    context: int
    device: str
    dtype: str
    warmup: int
    repeats: int
    flops: CostModel  # FLOPs of one decode step, piece by piece
    measured: CostModel  # milliseconds of one decode step, piece by piece (medians)
    decode_step_ms: dict[str, float]  # median/p10/p90 of the whole layer-by-layer decode step
    prefill_ms: dict[str, float]  # the same for the whole prompt
    tied_head: bool = False  # the head computes with the embedding's weight (counted once in totals)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def grouped(self) -> list[tuple[str, pd.DataFrame]]:
        """The rows of a per-layer table, in model order: embed, layer i (its blocks and rest), norm, head."""
        p = self.pieces
        layers = [(f"layer {i}", rows) for i, rows in p[p["layer"] >= 0].groupby("layer")]
        return [("embed", p[p["piece"] == "embed"]), *layers, ("norm", p[p["piece"] == "norm"]), ("head", p[p["piece"] == "head"])]

    def by_layer(self) -> pd.DataFrame:
        """One row per decoder layer, its pieces side by side (decode FLOPs and ms per piece)."""
        rows = self.pieces[self.pieces["layer"] >= 0]
        wide = rows.pivot(index="layer", columns="piece", values=["decode_flops", "decode_ms", "prefill_ms"])
        wide.columns = [f"{piece}_{metric}" for metric, piece in wide.columns]
        return wide.reset_index()

    def totals(self) -> dict:
        p = self.pieces
        shared = int(p.loc[p["piece"] == "head", "params"].sum()) if self.tied_head else 0
        return {
            "params": int(p["params"].sum()) - shared,
            "weight_bytes": int(p["weight_bytes"].sum()),
            "cache_bytes": int(p["cache_bytes"].sum()),
            "decode_flops": float(p["decode_flops"].sum()),
            "prefill_flops_per_token": float(p["prefill_flops_per_token"].sum()),
            "decode_ms": self.decode_step_ms["median"],
            "decode_tokens_per_s": 1000.0 / self.decode_step_ms["median"],
            "prefill_ms": self.prefill_ms["median"],
            "prefill_tokens_per_s": 1000.0 * self.context / self.prefill_ms["median"],
            "peak_activation_bytes": float(p["activation_bytes"].max()),
            "head_share_of_decode_ms": float(self.measured.head / sum(self.measured_pieces())),
        }

    def measured_pieces(self) -> list[float]:
        m = self.measured
        return [m.embed, *m.layers, m.norm, m.head]

    def to_dict(self) -> dict:
        return {
            "context": self.context,
            "device": self.device,
            "dtype": self.dtype,
            "warmup": self.warmup,
            "repeats": self.repeats,
            "totals": self.totals(),
            "decode_step_ms": self.decode_step_ms,
            "prefill_ms": self.prefill_ms,
            "flop_cost": self.flops.to_dict(),
            "measured_cost": self.measured.to_dict(),
            "seconds": self.seconds,
            "notes": self.notes,
        }


# --------------------------------------------------------------------------- measuring


def _stats(samples: list[float]) -> tuple[float, float, float]:
    """(median, p10, p90) of seconds, in milliseconds."""
    p10, median, p90 = np.percentile(np.asarray(samples) * 1000.0, [10, 50, 90])
    return float(median), float(p10), float(p90)


def _module_bytes(modules: list[nn.Module], exclude: set[int] = frozenset()) -> tuple[int, int]:
    """(parameter count, bytes of parameters and buffers) of modules, each tensor once."""
    seen, params, size = set(exclude), 0, 0
    for module in modules:
        for is_param, tensors in ((True, module.parameters()), (False, module.buffers())):
            for t in tensors:
                if t.data_ptr() in seen:
                    continue
                seen.add(t.data_ptr())
                params += t.numel() if is_param else 0
                size += t.numel() * t.element_size()
    return params, size


def _time_repeated(run: Callable[[_Meter], None], meter: _Clock, warmup: int, repeats: int, progress: ProgressFn, label: str) -> None:
    for i in range(warmup + repeats):
        meter.recording = i >= warmup
        run(meter)
        progress(label, i + 1, warmup + repeats)
    meter.recording = False


def _median_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    clock = _Clock(device)
    for i in range(warmup + repeats):
        clock.recording = i >= warmup
        with clock.piece(("op", MODEL_LEVEL)):
            fn()
    return _stats(clock.samples[("op", MODEL_LEVEL)])[0]


def _measured_checks(lm: LayeredModel, warmup: int, repeats: int) -> tuple[float, dict[str, float]]:
    """Milliseconds of a tuned-lens translator and of each hidden-state exit check."""
    d, device = lm.hidden_size, lm.device
    generator = torch.Generator().manual_seed(0)
    dtype = lm.lm_head.weight.dtype
    hidden, previous = (torch.randn(1, 1, d, generator=generator).to(device, dtype) for _ in range(2))
    weight, bias = torch.randn(d, d, generator=generator).to(device, dtype), torch.zeros(d, device=device, dtype=dtype)
    classifier = torch.randn(d, generator=generator).to(device, dtype)
    rows = torch.arange(min(64, lm.vocab_size), device=device)
    normed = lm.final_norm(hidden)
    translator = _median_ms(lambda: torch.nn.functional.linear(hidden, weight, bias), device, warmup, repeats)
    checks = {
        "saturation": _median_ms(lambda: torch.nn.functional.cosine_similarity(previous, hidden, dim=-1), device, warmup, repeats),
        "classifier": _median_ms(lambda: torch.sigmoid(lm.final_norm(hidden) @ classifier), device, warmup, repeats),
        "head_row": _median_ms(lambda: lm.head_rows(normed[0], rows), device, warmup, repeats) / rows.numel(),
    }
    return translator, checks


@torch.no_grad()
def profile_layers(
    lm: LayeredModel, prompt: torch.Tensor, *, warmup: int = 3, repeats: int = 20, progress: ProgressFn | None = None
) -> LayerProfile:
    """Profile every piece of `lm` on `prompt` ([1, context] token ids) and one decode step after it."""
    report = progress or silent
    started = time.perf_counter()
    work = _Workload(lm, prompt)
    context, n = work.context, lm.num_layers

    flops = {}
    for name, run in (("prefill", work.prefill), ("decode", work.decode)):
        meter = _Flops()
        with meter.active(), meter.hooked(lm):
            run(meter)
        flops[name] = meter.flops
    memory = _Memory()
    with memory.active(), memory.hooked(lm):
        work.prefill(memory)
    report("counting FLOPs and memory", 1, 1)

    clocks = {}
    for name, run in (("prefill", work.prefill), ("decode", work.decode)):
        clock = _Clock(lm.device)
        with clock.hooked(lm):
            _time_repeated(run, clock, warmup, repeats, report, f"timing {name}")
        clocks[name] = clock

    cache_bytes = lm.cache_bytes(work.cache_at_context())
    head_weight = lm.lm_head.weight
    tied = any(p is head_weight for p in lm.backbone.parameters())
    rows = []

    def add(piece: str, layer: int, modules: list[nn.Module] | None, key: Key, params=None, cache=0):
        if params is None:
            params = _module_bytes(modules or [])
        times = {name: _stats(clocks[name].samples[key]) for name in ("decode", "prefill")}
        rows.append(
            {
                "piece": piece,
                "layer": layer,
                "params": params[0],
                "weight_bytes": params[1],
                "decode_flops": flops["decode"].get(key, 0.0),
                "prefill_flops_per_token": flops["prefill"].get(key, 0.0) / context,
                "cache_bytes": cache,
                "activation_bytes": memory.peaks.get(key, np.nan),
                "decode_ms": times["decode"][0],
                "decode_ms_p10": times["decode"][1],
                "decode_ms_p90": times["decode"][2],
                "prefill_ms": times["prefill"][0],
                "prefill_ms_p10": times["prefill"][1],
                "prefill_ms_p90": times["prefill"][2],
            }
        )

    # The embedding is everything outside the layers, the final norm and an untied head.
    owned = (*lm.layers, lm.final_norm) + (() if tied else (lm.lm_head,))
    embed = _module_bytes([lm.model], exclude={t.data_ptr() for m in owned for t in (*m.parameters(), *m.buffers())})
    add("embed", MODEL_LEVEL, None, ("embed", MODEL_LEVEL), params=embed)
    for index in range(n):
        layer_key = ("layer", index)
        blocks = lm.blocks(index)
        block_params = []
        for position, (piece, module) in enumerate(blocks):
            block_params.append(_module_bytes([module]))
            add(piece, index, [module], (piece, index), cache=cache_bytes[index] if position == 0 else 0)
        # The rest of the layer: what the layer costs beyond its blocks.
        total = _module_bytes([lm.layers[index]])
        rest_key = ("rest", index)
        for name in ("decode", "prefill"):
            samples = clocks[name].samples
            samples[rest_key] = list(np.asarray(samples[layer_key]) - sum(np.asarray(samples[(piece, index)]) for piece, _ in blocks))
            flops[name][rest_key] = flops[name][layer_key] - sum(flops[name][(piece, index)] for piece, _ in blocks)
        add("rest", index, None, rest_key, params=(total[0] - sum(p for p, _ in block_params), total[1] - sum(b for _, b in block_params)))
    add("norm", MODEL_LEVEL, [lm.final_norm], ("norm", MODEL_LEVEL))
    head_params = _module_bytes([lm.lm_head])
    # A head tied to the embedding computes with its weight but holds no memory of its own.
    add("head", MODEL_LEVEL, None, ("head", MODEL_LEVEL), params=(head_params[0], 0 if tied else head_params[1]))
    pieces = pd.DataFrame(rows, columns=list(COLUMNS))

    def cost(values: dict[Key, float], unit: str, source: str, translator: float, checks: dict) -> CostModel:
        return CostModel(
            context=context,
            embed=values[("embed", MODEL_LEVEL)],
            layers=[values[("layer", i)] for i in range(n)],
            norm=values[("norm", MODEL_LEVEL)],
            head=values[("head", MODEL_LEVEL)],
            translator=translator,
            unit=unit,
            source=source,
            checks=checks,
        )

    d = lm.hidden_size
    flop_cost = cost(flops["decode"], "FLOPs/token", "torch.utils.flop_counter", 2.0 * d * d + d, {})
    translator_ms, checks_ms = _measured_checks(lm, warmup, repeats)
    decode_medians = {key: _stats(s)[0] for key, s in clocks["decode"].samples.items()}
    device_name = lm.device.type
    measured = cost(decode_medians, "ms/token", f"measured: profile on {device_name}", translator_ms, checks_ms)

    def whole(name: str) -> dict[str, float]:
        samples = clocks[name].samples
        keys = [("embed", MODEL_LEVEL), *[("layer", i) for i in range(n)], ("norm", MODEL_LEVEL), ("head", MODEL_LEVEL)]
        median, p10, p90 = _stats(list(np.sum([samples[k] for k in keys], axis=0)))
        return {"median": median, "p10": p10, "p90": p90}

    notes = []
    if lm.adapter.recurrent:
        notes.append(
            "the state update of Mamba's selective scan is element-wise and counts 0 FLOPs; the mixer's "
            "FLOPs are its projections and the state read-out"
        )
    return LayerProfile(
        pieces=pieces,
        context=context,
        device=device_name,
        dtype=str(head_weight.dtype).replace("torch.", ""),
        warmup=warmup,
        repeats=repeats,
        flops=flop_cost,
        measured=measured,
        decode_step_ms=whole("decode"),
        prefill_ms=whole("prefill"),
        tied_head=tied,
        seconds=time.perf_counter() - started,
        notes=notes,
    )

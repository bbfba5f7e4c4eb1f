"""What each piece of a model costs on this machine: FLOPs, parameters, memory, latency.

Pieces: the embedding (with each step's setup: positions, masks, rotary tables), every
decoder layer's blocks (attention and MLP; Mamba's mixer) plus the rest of the layer (its
norms and residual adds), the final norm and the LM head. A prefill runs a `context`-token
prompt; a decode step runs one token after `context` tokens of cache.

Three meters (`piece_meters`) walk the same layer-by-layer pass (`LayeredModel`), each reading
the blocks through forward hooks so no architecture code is needed here:
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
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from dyninfer.core.cost import CostModel
from dyninfer.core.layered import LayeredModel
from dyninfer.core.progress import ProgressFn, silent
from dyninfer.profilers.piece_meters import MODEL_LEVEL, Clock, FlopMeter, Key, MemoryMeter, Meter

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


# --------------------------------------------------------------------------- one pass


def _pass(lm: LayeredModel, input_ids: torch.Tensor, cache, meter: Meter) -> None:
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

    def prefill(self, meter: Meter) -> None:
        _pass(self.lm, self.prompt, self.lm.new_decoding_cache(1), meter)

    def decode(self, meter: Meter) -> None:
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
    work, meter = _Workload(lm, prompt), Meter()

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


def _time_repeated(run: Callable[[Meter], None], meter: Clock, warmup: int, repeats: int, progress: ProgressFn, label: str) -> None:
    for i in range(warmup + repeats):
        meter.recording = i >= warmup
        run(meter)
        progress(label, i + 1, warmup + repeats)
    meter.recording = False


def _median_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    clock = Clock(device)
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


@dataclass
class _Readings:
    """What the meters read: FLOPs and clock samples per pass ("prefill", "decode") and the prefill's memory peaks."""

    flops: dict[str, dict[Key, float]]
    peaks: dict[Key, float]
    samples: dict[str, dict[Key, list[float]]]
    context: int

    def row(self, piece: str, layer: int, key: Key, params: tuple[int, int], cache: int = 0) -> dict:
        """One row of `LayerProfile.pieces` (COLUMNS)."""
        times = {name: _stats(self.samples[name][key]) for name in ("decode", "prefill")}
        return {
            "piece": piece,
            "layer": layer,
            "params": params[0],
            "weight_bytes": params[1],
            "decode_flops": self.flops["decode"].get(key, 0.0),
            "prefill_flops_per_token": self.flops["prefill"].get(key, 0.0) / self.context,
            "cache_bytes": cache,
            "activation_bytes": self.peaks.get(key, np.nan),
            "decode_ms": times["decode"][0],
            "decode_ms_p10": times["decode"][1],
            "decode_ms_p90": times["decode"][2],
            "prefill_ms": times["prefill"][0],
            "prefill_ms_p10": times["prefill"][1],
            "prefill_ms_p90": times["prefill"][2],
        }

    def derive_rest(self, index: int, blocks: list[tuple[str, nn.Module]]) -> Key:
        """Record the rest of layer `index` (what the layer costs beyond its blocks) and return its key."""
        layer_key, rest_key = ("layer", index), ("rest", index)
        for name in ("decode", "prefill"):
            samples, flops = self.samples[name], self.flops[name]
            samples[rest_key] = list(np.asarray(samples[layer_key]) - sum(np.asarray(samples[(piece, index)]) for piece, _ in blocks))
            flops[rest_key] = flops[layer_key] - sum(flops[(piece, index)] for piece, _ in blocks)
        return rest_key

    def whole(self, name: str, num_layers: int) -> dict[str, float]:
        """Median, p10 and p90 of a whole `name` pass: embed, every layer, norm and head added up per run."""
        samples = self.samples[name]
        keys = [("embed", MODEL_LEVEL), *[("layer", i) for i in range(num_layers)], ("norm", MODEL_LEVEL), ("head", MODEL_LEVEL)]
        median, p10, p90 = _stats(list(np.sum([samples[k] for k in keys], axis=0)))
        return {"median": median, "p10": p10, "p90": p90}


def _count(lm: LayeredModel, work: _Workload) -> tuple[dict[str, dict[Key, float]], dict[Key, float]]:
    """FLOPs per piece of a prefill and of a decode pass, and the peak memory per piece of a prefill."""
    flops = {}
    for name, run in (("prefill", work.prefill), ("decode", work.decode)):
        meter = FlopMeter()
        with meter.active(), meter.hooked(lm):
            run(meter)
        flops[name] = meter.flops
    memory = MemoryMeter()
    with memory.active(), memory.hooked(lm):
        work.prefill(memory)
    return flops, memory.peaks


def _time(lm: LayeredModel, work: _Workload, warmup: int, repeats: int, progress: ProgressFn) -> dict[str, dict[Key, list[float]]]:
    """Clock samples per piece of repeated prefill and decode passes."""
    samples = {}
    for name, run in (("prefill", work.prefill), ("decode", work.decode)):
        clock = Clock(lm.device)
        with clock.hooked(lm):
            _time_repeated(run, clock, warmup, repeats, progress, f"timing {name}")
        samples[name] = clock.samples
    return samples


def _piece_rows(lm: LayeredModel, readings: _Readings, cache_bytes: list[int], tied: bool) -> list[dict]:
    """The rows of `LayerProfile.pieces`, in model order (derives each layer's rest into `readings`)."""
    # The embedding is everything outside the layers, the final norm and an untied head.
    owned = (*lm.layers, lm.final_norm) + (() if tied else (lm.lm_head,))
    embed = _module_bytes([lm.model], exclude={t.data_ptr() for m in owned for t in (*m.parameters(), *m.buffers())})
    rows = [readings.row("embed", MODEL_LEVEL, ("embed", MODEL_LEVEL), embed)]
    for index in range(lm.num_layers):
        blocks = lm.blocks(index)
        block_params = []
        for position, (piece, module) in enumerate(blocks):
            block_params.append(_module_bytes([module]))
            rows.append(readings.row(piece, index, (piece, index), block_params[-1], cache=cache_bytes[index] if position == 0 else 0))
        total = _module_bytes([lm.layers[index]])
        rest = (total[0] - sum(p for p, _ in block_params), total[1] - sum(b for _, b in block_params))
        rows.append(readings.row("rest", index, readings.derive_rest(index, blocks), rest))
    rows.append(readings.row("norm", MODEL_LEVEL, ("norm", MODEL_LEVEL), _module_bytes([lm.final_norm])))
    head_params = _module_bytes([lm.lm_head])
    # A head tied to the embedding computes with its weight but holds no memory of its own.
    rows.append(readings.row("head", MODEL_LEVEL, ("head", MODEL_LEVEL), (head_params[0], 0 if tied else head_params[1])))
    return rows


def _cost_model(
    values: dict[Key, float], num_layers: int, context: int, unit: str, source: str, translator: float, checks: dict
) -> CostModel:
    """A cost model of one decode step from per-piece values (FLOPs or milliseconds)."""
    return CostModel(
        context=context,
        embed=values[("embed", MODEL_LEVEL)],
        layers=[values[("layer", i)] for i in range(num_layers)],
        norm=values[("norm", MODEL_LEVEL)],
        head=values[("head", MODEL_LEVEL)],
        translator=translator,
        unit=unit,
        source=source,
        checks=checks,
    )


def _notes(lm: LayeredModel) -> list[str]:
    """Caveats the numbers carry for this architecture."""
    notes = []
    if lm.adapter.recurrent:
        notes.append(
            "the state update of Mamba's selective scan is element-wise and counts 0 FLOPs; the mixer's "
            "FLOPs are its projections and the state read-out"
        )
    return notes


@torch.no_grad()
def profile_layers(
    lm: LayeredModel, prompt: torch.Tensor, *, warmup: int = 3, repeats: int = 20, progress: ProgressFn | None = None
) -> LayerProfile:
    """Profile every piece of `lm` on `prompt` ([1, context] token ids) and one decode step after it."""
    report = progress or silent
    started = time.perf_counter()
    work = _Workload(lm, prompt)
    context, n = work.context, lm.num_layers
    flops, peaks = _count(lm, work)
    report("counting FLOPs and memory", 1, 1)
    readings = _Readings(flops, peaks, _time(lm, work, warmup, repeats, report), context)

    head_weight = lm.lm_head.weight
    tied = any(p is head_weight for p in lm.backbone.parameters())
    rows = _piece_rows(lm, readings, lm.cache_bytes(work.cache_at_context()), tied)
    pieces = pd.DataFrame(rows, columns=list(COLUMNS))

    d = lm.hidden_size
    flop_cost = _cost_model(flops["decode"], n, context, "FLOPs/token", "torch.utils.flop_counter", 2.0 * d * d + d, {})
    translator_ms, checks_ms = _measured_checks(lm, warmup, repeats)
    decode_medians = {key: _stats(s)[0] for key, s in readings.samples["decode"].items()}
    device_name = lm.device.type
    measured = _cost_model(decode_medians, n, context, "ms/token", f"measured: profile on {device_name}", translator_ms, checks_ms)
    return LayerProfile(
        pieces=pieces,
        context=context,
        device=device_name,
        dtype=str(head_weight.dtype).replace("torch.", ""),
        warmup=warmup,
        repeats=repeats,
        flops=flop_cost,
        measured=measured,
        decode_step_ms=readings.whole("decode", n),
        prefill_ms=readings.whole("prefill", n),
        tied_head=tied,
        seconds=time.perf_counter() - started,
        notes=_notes(lm),
    )

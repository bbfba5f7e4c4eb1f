"""GPU power, energy, memory and utilization through NVML (the `pynvml` module of nvidia-ml-py).

Everything here degrades to a reason instead of raising: no nvidia-ml-py, no driver, no
device, or a counter the GPU does not support all end in a report that says why, so a
profile on a machine without a GPU still gives its CPU figures.

Energy comes from the device's total-energy counter (mJ since the driver loaded; Volta and
newer). It updates every 20-100 ms, so a workload is repeated until the window is long
enough. Where the counter is unsupported, energy is the integral of power samples taken
between workload calls, and the report says which source it used.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field


class GpuUnavailable(Exception):
    """NVML cannot be used; the message says why, for the report."""


@dataclass
class GpuReading:
    index: int
    name: str
    driver: str
    memory_used_bytes: int | None
    memory_total_bytes: int | None
    utilization_percent: float | None
    power_w: float | None  # instant (a 1 s average on Ampere and newer)
    power_limit_w: float | None = None


@dataclass
class EnergyMeasurement:
    """Energy of a repeated workload over one window."""

    label: str
    tokens: int
    seconds: float
    joules: float | None
    source: str  # "total-energy counter", "power samples" or "unavailable: ..."
    average_power_w: float | None
    peak_power_w: float | None
    power_samples: int
    calls: int

    @property
    def joules_per_token(self) -> float | None:
        return self.joules / self.tokens if self.joules is not None and self.tokens else None

    def to_dict(self) -> dict:
        return asdict(self) | {"joules_per_token": self.joules_per_token}


@dataclass
class GpuReport:
    available: bool
    reason: str | None = None  # why not, when not available
    device: GpuReading | None = None
    energy: list[EnergyMeasurement] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "available": self.available,
            "reason": self.reason,
            "device": asdict(self.device) if self.device else None,
            "energy": [e.to_dict() for e in self.energy],
        }


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Nvml:
    """One GPU through an NVML module (pynvml, or a stand-in with the same functions)."""

    def __init__(self, module, handle, index: int):
        self.nvml, self.handle, self.index = module, handle, index

    @classmethod
    def open(cls, index: int = 0, module=None) -> Nvml:
        """Start NVML and pick GPU `index`; GpuUnavailable says why not."""
        if module is None:
            try:
                module = importlib.import_module("pynvml")
            except ImportError:
                raise GpuUnavailable("nvidia-ml-py (module pynvml) is not installed") from None
        try:
            module.nvmlInit()
        except module.NVMLError as exc:
            raise GpuUnavailable(f"NVML could not start ({exc}): no NVIDIA driver on this machine?") from None
        try:
            count = module.nvmlDeviceGetCount()
            if count == 0:
                raise GpuUnavailable("NVML sees no GPU")
            if not 0 <= index < count:
                raise GpuUnavailable(f"GPU {index} does not exist; NVML sees {count} (0-{count - 1})")
            return cls(module, module.nvmlDeviceGetHandleByIndex(index), index)
        except GpuUnavailable:
            module.nvmlShutdown()
            raise
        except module.NVMLError as exc:
            module.nvmlShutdown()
            raise GpuUnavailable(f"NVML could not open GPU {index} ({exc})") from None

    def close(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except self.nvml.NVMLError:
            pass

    def _query(self, fn: Callable, *args):
        """fn(handle, *args), or None where this GPU or driver does not support it."""
        try:
            return fn(self.handle, *args)
        except self.nvml.NVMLError:
            return None

    def power_w(self) -> float | None:
        milliwatts = self._query(self.nvml.nvmlDeviceGetPowerUsage)
        return milliwatts / 1000.0 if milliwatts is not None else None

    def total_energy_mj(self) -> float | None:
        return self._query(self.nvml.nvmlDeviceGetTotalEnergyConsumption)

    def reading(self) -> GpuReading:
        memory = self._query(self.nvml.nvmlDeviceGetMemoryInfo)
        utilization = self._query(self.nvml.nvmlDeviceGetUtilizationRates)
        limit = self._query(self.nvml.nvmlDeviceGetEnforcedPowerLimit)
        try:
            driver = _text(self.nvml.nvmlSystemGetDriverVersion())
        except self.nvml.NVMLError:
            driver = "unknown"
        name = self._query(self.nvml.nvmlDeviceGetName)
        return GpuReading(
            index=self.index,
            name=_text(name) if name is not None else "unknown",
            driver=driver,
            memory_used_bytes=int(memory.used) if memory is not None else None,
            memory_total_bytes=int(memory.total) if memory is not None else None,
            utilization_percent=float(utilization.gpu) if utilization is not None else None,
            power_w=self.power_w(),
            power_limit_w=limit / 1000.0 if limit is not None else None,
        )


def measure_energy(
    gpu: Nvml,
    label: str,
    workload: Callable[[], int],
    *,
    min_seconds: float = 3.0,
    sample_every: float = 0.05,
    clock: Callable[[], float] = time.perf_counter,
    synchronize: Callable[[], None] = lambda: None,
) -> EnergyMeasurement:
    """Run `workload` (returns the tokens it processed) until `min_seconds` have passed.

    `synchronize` waits for queued GPU work, so the window covers exactly what ran.
    """
    powers: list[tuple[float, float]] = []  # (time, watts)

    def sample(now: float) -> None:
        watts = gpu.power_w()
        if watts is not None:
            powers.append((now, watts))

    synchronize()
    start_energy, start = gpu.total_energy_mj(), clock()
    sample(start)
    tokens = calls = 0
    now = start
    while now - start < min_seconds or calls == 0:
        tokens += workload()
        calls += 1
        synchronize()
        now = clock()
        if not powers or now - powers[-1][0] >= sample_every:
            sample(now)
    end_energy = gpu.total_energy_mj()
    seconds = now - start
    if start_energy is not None and end_energy is not None:
        joules, source = (end_energy - start_energy) / 1000.0, "total-energy counter"
    elif len(powers) >= 2:
        joules = sum((t1 - t0) * (w0 + w1) / 2 for (t0, w0), (t1, w1) in zip(powers, powers[1:]))
        source = "power samples (the total-energy counter is not supported on this GPU)"
    else:
        joules, source = None, "unavailable: this GPU reports neither total energy nor power"
    watts = [w for _, w in powers]
    return EnergyMeasurement(
        label=label,
        tokens=tokens,
        seconds=seconds,
        joules=joules,
        source=source,
        average_power_w=joules / seconds if joules is not None and seconds > 0 else None,
        peak_power_w=max(watts) if watts else None,
        power_samples=len(watts),
        calls=calls,
    )

"""NVML readings and energy with a fake NVML module: known values and every failure path."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from dyninfer.jobs.profile import gpu_report
from dyninfer.profilers.nvml import GpuUnavailable, Nvml, measure_energy


class FakeNVMLError(Exception):
    pass


def fake_nvml(count: int = 1, energy: bool = True, power: bool = True, init_fails: bool = False):
    """A stand-in for pynvml: 1000 mJ per workload call, 250 W, a named device."""
    state = types.SimpleNamespace(energy_mj=5_000_000.0, shutdowns=0, inits=0)

    def init():
        if init_fails:
            raise FakeNVMLError("NVML Shared Library Not Found")
        state.inits += 1

    def shutdown():
        state.shutdowns += 1

    def total_energy(handle):
        if not energy:
            raise FakeNVMLError("Not Supported")
        return state.energy_mj

    def power_usage(handle):
        if not power:
            raise FakeNVMLError("Not Supported")
        return 250_000  # mW

    module = types.SimpleNamespace(
        NVMLError=FakeNVMLError,
        nvmlInit=init,
        nvmlShutdown=shutdown,
        nvmlDeviceGetCount=lambda: count,
        nvmlDeviceGetHandleByIndex=lambda i: f"handle{i}",
        nvmlDeviceGetName=lambda h: b"NVIDIA H200",
        nvmlSystemGetDriverVersion=lambda: "565.57.01",
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=3 * 2**30, total=141 * 2**30, free=0),
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=87, memory=40),
        nvmlDeviceGetEnforcedPowerLimit=lambda h: 700_000,
        nvmlDeviceGetPowerUsage=power_usage,
        nvmlDeviceGetTotalEnergyConsumption=total_energy,
    )
    return module, state


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _workload(state, clock, seconds: float = 0.5, tokens: int = 4, millijoules: float = 1000.0):
    def run() -> int:
        clock.now += seconds
        state.energy_mj += millijoules
        return tokens

    return run


def test_reading_returns_the_device_values():
    module, state = fake_nvml()
    gpu = Nvml.open(0, module=module)
    reading = gpu.reading()
    gpu.close()
    assert (reading.name, reading.driver, reading.index) == ("NVIDIA H200", "565.57.01", 0)
    assert reading.memory_used_bytes == 3 * 2**30 and reading.memory_total_bytes == 141 * 2**30
    assert reading.utilization_percent == 87 and reading.power_w == 250.0 and reading.power_limit_w == 700.0
    assert state.inits == 1 and state.shutdowns == 1


def test_energy_per_token_from_the_total_energy_counter():
    module, state = fake_nvml()
    clock = FakeClock()
    gpu = Nvml.open(0, module=module)
    e = measure_energy(gpu, "decode", _workload(state, clock), min_seconds=2.0, clock=clock)
    # Four calls of 0.5 s reach the 2 s window: 4 J over 16 tokens.
    assert (e.calls, e.tokens, e.seconds) == (4, 16, 2.0)
    assert e.joules == pytest.approx(4.0) and e.joules_per_token == pytest.approx(0.25)
    assert e.average_power_w == pytest.approx(2.0) and e.source == "total-energy counter"
    assert e.peak_power_w == 250.0 and e.power_samples == 5
    assert e.to_dict()["joules_per_token"] == pytest.approx(0.25)


def test_unsupported_energy_counter_falls_back_to_power_samples():
    module, state = fake_nvml(energy=False)
    clock = FakeClock()
    e = measure_energy(Nvml.open(0, module=module), "prefill", _workload(state, clock), min_seconds=1.0, clock=clock)
    assert e.source.startswith("power samples")
    assert e.joules == pytest.approx(250.0 * 1.0)  # constant 250 W over 1 s
    assert e.joules_per_token == pytest.approx(250.0 / 8)


def test_neither_energy_nor_power_gives_no_energy_and_says_why():
    module, state = fake_nvml(energy=False, power=False)
    clock = FakeClock()
    gpu = Nvml.open(0, module=module)
    e = measure_energy(gpu, "decode", _workload(state, clock), min_seconds=1.0, clock=clock)
    assert e.joules is None and e.joules_per_token is None and e.average_power_w is None
    assert e.source.startswith("unavailable")
    assert gpu.reading().power_w is None  # the reading degrades too, without raising


def test_library_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    with pytest.raises(GpuUnavailable, match="nvidia-ml-py"):
        Nvml.open(0)
    report = gpu_report(None, torch.zeros(1, 1, dtype=torch.long), torch.device("cuda"), 1.0)
    assert not report.available and "nvidia-ml-py" in report.reason


def test_driver_missing():
    module, state = fake_nvml(init_fails=True)
    with pytest.raises(GpuUnavailable, match="could not start"):
        Nvml.open(0, module=module)
    report = gpu_report(None, torch.zeros(1, 1, dtype=torch.long), torch.device("cuda"), 1.0, nvml_module=module)
    assert not report.available and "Library Not Found" in report.reason
    assert state.shutdowns == 0  # nothing to shut down


@pytest.mark.parametrize("count, index, fragment", [(0, 0, "sees no GPU"), (2, 3, "GPU 3 does not exist")])
def test_no_such_device(count, index, fragment):
    module, state = fake_nvml(count=count)
    with pytest.raises(GpuUnavailable, match=fragment):
        Nvml.open(index, module=module)
    assert state.shutdowns == 1  # NVML started, so it is shut down again


def test_cpu_profile_never_touches_nvml():
    module, state = fake_nvml()
    report = gpu_report(None, torch.zeros(1, 1, dtype=torch.long), torch.device("cpu"), 1.0, nvml_module=module)
    assert not report.available and report.reason.startswith("no GPU: profiled on the CPU")
    assert state.inits == 0
    assert report.to_dict() == {"available": False, "reason": report.reason, "device": None, "energy": []}


def test_gpu_report_measures_decode_and_prefill_energy_of_the_model():
    from tiny_models import tiny_model

    from dyninfer.core.layered import LayeredModel

    module, state = fake_nvml()
    lm = LayeredModel(tiny_model("llama"))
    syncs = []

    def synchronize():  # stands in for torch.cuda.synchronize: 100 mJ "used" per finished workload call
        syncs.append(1)
        state.energy_mj += 100.0

    prompt = torch.randint(0, 100, (1, 12))
    report = gpu_report(lm, prompt, torch.device("cuda"), 0.05, nvml_module=module, synchronize=synchronize)
    assert report.available and report.device.name == "NVIDIA H200"
    decode, prefill = report.energy
    assert (decode.label, prefill.label) == ("decode", "prefill")
    assert decode.tokens == decode.calls and prefill.tokens == 12 * prefill.calls
    for e in (decode, prefill):
        assert e.joules == pytest.approx(0.1 * e.calls)  # the synchronize before the window is not counted
    assert decode.joules_per_token == pytest.approx(0.1)
    assert state.shutdowns == 1

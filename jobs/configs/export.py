"""`dyninfer export`'s options, and where a package goes by default."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from dyninfer.core.choices import (
    AUTO_WEIGHTS,
    EXPORT_DTYPES,
    EXPORT_KV_LAYOUTS,
    EXPORT_WEIGHT_CHOICES,
    FIDELITY_RISK,
    KV_MODES,
    ONNX_PROVIDERS,
    PACKAGE_RISKS,
)
from dyninfer.core.errors import DyninferError, check_between, check_choice, check_positive, option
from dyninfer.exporters.quantize_settings import DEFAULT_ACCURACY_LEVEL, check_accuracy_level, check_block_size

PACKAGE_DIR = "onnx"  # an export's package, inside the artifact unless `out` says otherwise


@dataclass
class ExportConfig:
    out: str | None = None  # the package directory; None: ARTIFACT/onnx
    provider: str = "cpu"  # the execution provider the package is for: cuda or cpu
    dtype: str = "fp32"  # fp16 is for the CUDA provider
    model: str | None = None  # load the base model from here instead (same weights)
    kv_mode: str | None = None  # override the policy's KV mode (the graph implements propagate)
    baseline: bool = True  # also export the plain model through optimum (for `bench` on ONNX)
    verify: bool = True  # check the package against torch on this machine's provider
    # full (the dtype's), int8/int4 weight-only quantization (the baseline's too), source (a GGUF's own blocks), or auto
    # (with certify: the fastest of a fixed candidate list whose fidelity certifies)
    weights: str = "full"
    block_size: int = 32  # inputs per quantization scale (int8/int4)
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL  # int8/int4: MatMulNBits' compute precision on the CPU (4: int8)
    # certify the package itself: its own continuations through ONNX Runtime against the original model's (minutes to
    # hours: every calibration prompt decoded per candidate); else the manifest carries calibration's torch bound
    certify: bool = False
    # certify: the bound to certify (None: calibration's target and epsilon). A quantized graph may keep less
    # consistency with the original model than the torch policy was certified for.
    target: float | None = None
    epsilon: float | None = None
    # certify: what: fidelity (the package fed the original model's continuations keeps its top-1 token at >= target
    # of positions: certification/fidelity.py) or generation (its free-running continuations' consistency)
    certify_risk: str = FIDELITY_RISK
    kl_tau: float | None = None  # fidelity: also certify the share of positions with KL(original || package) > kl_tau
    kv_layout: str = "auto"  # auto | buffer (preallocated, updated in place) | concat (past and new concatenated each step)

    def validate(self) -> None:
        check_choice("provider", self.provider, ONNX_PROVIDERS)
        check_choice("kv_layout", self.kv_layout, EXPORT_KV_LAYOUTS)
        check_choice("dtype", self.dtype, EXPORT_DTYPES)
        check_choice("weights", self.weights, EXPORT_WEIGHT_CHOICES)
        if self.weights == AUTO_WEIGHTS and not (self.certify and self.certify_risk == FIDELITY_RISK):
            raise DyninferError(
                f"{option('weights')} {AUTO_WEIGHTS} picks the fastest weights whose fidelity certifies; add {option('certify')} "
                f"(with {option('certify_risk')} {FIDELITY_RISK}) or name the weights"
            )
        check_block_size(self.block_size)
        check_accuracy_level(self.accuracy_level)
        check_choice("certify_risk", self.certify_risk, PACKAGE_RISKS)
        if self.kl_tau is not None:
            check_positive("kl_tau", self.kl_tau)
            if self.certify_risk != FIDELITY_RISK:
                raise DyninferError(f"{option('kl_tau')} is for {option('certify_risk')} {FIDELITY_RISK}; leave it out")
        if self.certify_risk != ExportConfig.certify_risk and not self.certify:
            raise DyninferError(f"{option('certify_risk')} is what {option('certify')} certifies; add {option('certify')} or leave it out")
        for name in ("target", "epsilon", "kl_tau"):
            if getattr(self, name) is not None:
                if not self.certify:
                    raise DyninferError(
                        f"{option(name)} is the bound {option('certify')} certifies; add {option('certify')} or leave it out"
                    )
                if name != "kl_tau":
                    check_between(name, getattr(self, name), 0.0, 1.0)
        for name in ("block_size", "accuracy_level"):
            if self.weights == "full" and getattr(self, name) != getattr(ExportConfig, name):
                raise DyninferError(f"{option(name)} is for {option('weights')} int8 or int4; leave it out or quantize")
        if self.kv_mode is not None:
            check_choice("kv_mode", self.kv_mode, KV_MODES)

    def package_dir(self, artifact: str | os.PathLike) -> Path:
        return Path(self.out) if self.out else Path(artifact) / PACKAGE_DIR

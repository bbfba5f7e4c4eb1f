"""What a package's consistency bound is about, as its manifest records it (`certificate`).

The bound is either computed on the package itself (`early_exit.package_certificate`: its own continuations
through ONNX Runtime) or carried over from calibration on the torch model; then it is about another graph, and
every place that shows it says so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from dyninfer.core.artifact_files import file_sha256
from dyninfer.core.choices import GENERATION_RISK

ON_PACKAGE = "package"  # PackageCertificate.computed_on: this package's graph, through ONNX Runtime


@dataclass
class PackageCertificate:
    computed_on: str  # ON_PACKAGE, or what the bound was computed on instead ("torch ... model")
    original_model: dict  # the model whose continuations the consistency is measured against ({spec, content_hash})
    measure: str  # tokens, prefix or rougeL
    target: float
    epsilon: float
    prompts: int
    prompt_tokens: int
    new_tokens: int
    threshold: float | None  # the certified exit threshold; None: the package never exits
    full_depth_certified: bool  # whether the package with exits disabled met the target with the guarantee
    provider: str | None = None  # the execution provider the package ran on
    curve: list[dict] = field(default_factory=list)  # per candidate tested: threshold, consistency, p-value
    heldout: dict | None = None  # the certified package on held-out prompts: every consistency measure, mean exit
    graph_sha256: dict | None = None  # model file -> sha256, the graph the certificate is about (on the package)
    package_graph: str | None = None  # the package's precision (fp32, fp16, int8, int4): what the bound is not about, when carried over
    notes: list[str] = field(default_factory=list)

    @property
    def on_package(self) -> bool:
        return self.computed_on == ON_PACKAGE

    def statement(self) -> str:
        graph = f" ({self.package_graph})" if self.package_graph else ""
        where = "on this package (ONNX Runtime)" if self.on_package else f"on {self.computed_on}, not on this package's graph{graph}"
        what = "exits disabled" if self.threshold is None else f"exit threshold {self.threshold:.4g}"
        if self.threshold is None and not self.full_depth_certified:
            return (
                f"nothing certified {where}: even with exits disabled the {self.measure} consistency with the original model "
                f"did not reach {self.target:g} with confidence {1 - self.epsilon:g} on {self.prompts} prompts"
            )
        return (
            f"{self.measure} consistency with the original model >= {self.target:g} with probability >= {1 - self.epsilon:g} "
            f"({what}; {self.prompts} prompts of {self.prompt_tokens} tokens, {self.new_tokens} new; certified {where})"
        )

    def to_dict(self) -> dict:
        return asdict(self) | {"statement": self.statement()}

    @classmethod
    def from_dict(cls, data: dict) -> PackageCertificate:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def graph_hashes(package: Path, files: list[str]) -> dict[str, str]:
    """sha256 of each of the package's model files (the graph and its weights)."""
    return {name: file_sha256(Path(package) / name) for name in files}


def carried_over(calibration: dict, original_model: dict, computed_on: str, package_graph: str) -> PackageCertificate | None:
    """The calibration's certified generation bound as the package's certificate, marked as computed on another graph
    (None when calibration certified no generation bound: a teacher-forced risk is about simulated exits)."""
    generated = calibration.get("generated") or {}
    config = calibration.get("config") or {}
    if calibration.get("risk") != GENERATION_RISK or not calibration.get("ltt"):
        return None
    ltt = calibration["ltt"]
    return PackageCertificate(
        computed_on=computed_on,
        original_model=original_model,
        measure=config.get("consistency", "tokens"),
        target=float(calibration["target"]),
        epsilon=float(calibration["epsilon"]),
        prompts=int(ltt.get("n", 0)),
        prompt_tokens=int(config.get("prompt_tokens", 0)),
        new_tokens=int(generated.get("new_tokens", config.get("new_tokens", 0))),
        threshold=(calibration.get("policy") or {}).get("threshold"),
        full_depth_certified=True,  # the torch model at full depth is the original model
        package_graph=package_graph,
    )

"""The ONNX package format, declared once: its files, the step's inputs and outputs in order, and the manifest.

The exporter writes a `PackageManifest`, the runtime reads one, and both go through this module: the IO
contract (`input_names`, `output_names`), the KV layouts, the stop rules the package carries and its
certificate (`PackageCertificate`: what its consistency bound is about). A manifest read from disk is checked
field by field; a damaged one is one `error:` line naming the field. Formats 2 and 3 load (3 added the
buffered KV layout and the `next_token` output); older ones are refused with the way to a new export.

Free of torch and of ONNX Runtime: the package's reader needs numpy only.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from dyninfer.compressors.stop_obey import ProbeVocabulary
from dyninfer.core.artifact_paths import inside, relative_inside
from dyninfer.core.choices import (
    EXPORT_DTYPES,
    EXPORT_WEIGHTS,
    FIDELITY_RISK,
    GENERATION_RISK,
    KV_LAYOUTS,
    ONNX_PROVIDERS,
    PACKAGE_RISKS,
    REASONING,
    STOP_WORKLOADS,
)
from dyninfer.core.errors import DyninferError, is_integer, is_number
from dyninfer.core.policies import ExitPolicy, StopPolicy

PACKAGE_MANIFEST = "dyninfer-onnx.json"
PACKAGE_FORMAT = "dyninfer-onnx"
# 2: the step's stop_confidence output and the stop rules; 3: kv_layout and the next_token output
PACKAGE_VERSION = 3
OLDEST_VERSION = 2
MODEL_FILE = "model.onnx"
BASELINE_DIR = "baseline"  # optimum's export of the plain model, at the package's precision
BASELINE_FULL_DIR = "baseline-full"  # a quantized package's plain model with float weights
EXITS_DISABLED = 2.0  # an exit threshold no confidence (<= 1) reaches

# The step's IO contract, in order.
INPUT_IDS, THRESHOLD_INPUT = "input_ids", "exit_threshold"
POSITIONS_INPUT = "positions"  # buffered KV layout: the positions the buffers hold after the step (its length is read)
LOGITS, EXIT_LAYER, EXIT_CONFIDENCE = "logits", "exit_layer", "exit_confidence"
STOP_OUTPUT = "stop_confidence"  # the max probability of the distribution the next token is picked from
NEXT_TOKEN_OUTPUT = "next_token"  # the greedy token, so greedy decoding brings no logits to the host
PAST_PREFIX, PRESENT_PREFIX = "past_key_values.", "present."
STEP_OUTPUTS = (LOGITS, EXIT_LAYER, EXIT_CONFIDENCE, STOP_OUTPUT, NEXT_TOKEN_OUTPUT)


def input_names(num_layers: int, kv_layout: str = "concat") -> list[str]:
    positions = [POSITIONS_INPUT] if kv_layout == "buffer" else []
    return [INPUT_IDS, THRESHOLD_INPUT, *positions] + [f"{PAST_PREFIX}{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def output_names(num_layers: int) -> list[str]:
    return [*STEP_OUTPUTS] + [f"{PRESENT_PREFIX}{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


ON_PACKAGE = "package"  # PackageCertificate.computed_on: this package's graph, through ONNX Runtime


@dataclass
class PackageCertificate:
    """What a package's consistency bound is about: computed on the package itself (its own continuations through
    ONNX Runtime), or carried over from calibration on the torch model, and then about another graph."""

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
    # generation: free-running consistency with the original model's continuations (`measure`); fidelity: the share
    # of positions with the original's top-1 when fed its continuations (measure top1), and with `kl_tau` the share
    # with KL(original || package) <= kl_tau too
    risk: str = GENERATION_RISK
    kl_tau: float | None = None
    fidelity: dict | None = None  # held-out: same_top1, mean_kl, kl_p99, perplexity_ratio at the certified setting
    weights: str | None = None  # the weights the certified setting runs (the auto choice's, when chosen by certification)

    @property
    def on_package(self) -> bool:
        return self.computed_on == ON_PACKAGE

    def statement(self) -> str:
        graph = f" ({self.package_graph})" if self.package_graph else ""
        where = "on this package (ONNX Runtime)" if self.on_package else f"on {self.computed_on}, not on this package's graph{graph}"
        what = "exits disabled" if self.threshold is None else f"exit threshold {self.threshold:.4g}"
        if self.weights is not None:
            what += f", {self.weights} weights"
        if self.risk == FIDELITY_RISK:
            kept = f"the original model's top-1 token at >= {self.target:g} of positions"
            if self.kl_tau is not None:
                kept += f", and KL(original || package) <= {self.kl_tau:g} at >= {self.target:g} of them,"
            how = "fed the original model's continuations"
        else:
            kept, how = f"{self.measure} consistency with the original model >= {self.target:g}", "free-running, greedy"
        if self.threshold is None and not self.full_depth_certified:
            return (
                f"nothing certified {where}: even with exits disabled, {kept} was not shown with confidence {1 - self.epsilon:g} "
                f"on {self.prompts} prompts"
            )
        return (
            f"{kept} with probability >= {1 - self.epsilon:g} ({what}; {self.prompts} prompts of {self.prompt_tokens} tokens, "
            f"{self.new_tokens} positions, {how}; certified {where})"
        )

    def to_dict(self) -> dict:
        return asdict(self) | {"statement": self.statement()}

    @classmethod
    def from_dict(cls, data: dict) -> PackageCertificate:
        if not isinstance(data, dict):
            raise _invalid("certificate", "is not an object")
        known = {k: v for k, v in data.items() if k in {f.name for f in fields(cls)}}
        try:
            certificate = cls(**known)
        except TypeError:
            raise _invalid("certificate", "lacks fields") from None
        checks = [
            ("computed_on", isinstance(certificate.computed_on, str)),
            ("measure", isinstance(certificate.measure, str)),
            ("target", _fraction(certificate.target)),
            ("epsilon", _fraction(certificate.epsilon)),
            ("threshold", certificate.threshold is None or _finite(certificate.threshold)),
            ("prompts", is_integer(certificate.prompts) and certificate.prompts >= 0),
            ("graph_sha256", certificate.graph_sha256 is None or _str_map(certificate.graph_sha256)),
            ("risk", certificate.risk in PACKAGE_RISKS),
            ("kl_tau", certificate.kl_tau is None or (_finite(certificate.kl_tau) and certificate.kl_tau > 0)),
            ("weights", certificate.weights is None or certificate.weights in EXPORT_WEIGHTS),
        ]
        bad = next((name for name, ok in checks if not ok), None)
        if bad is not None:
            raise _invalid(f"certificate.{bad}", f"is {getattr(certificate, bad)!r}")
        return certificate


@dataclass
class PackageStopRule:
    """A stop rule as a package obeys it: the policy and, for reasoning, its probe vocabulary (no tokenizer there)."""

    policy: StopPolicy
    vocabulary: ProbeVocabulary | None = None

    def to_dict(self) -> dict:
        return {"policy": self.policy.to_dict()} | ({"vocabulary": self.vocabulary.to_dict()} if self.vocabulary else {})

    @classmethod
    def from_dict(cls, workload: str, raw) -> PackageStopRule:
        if not isinstance(raw, dict):
            raise _invalid(f"stop.{workload}", "is not an object")
        policy = StopPolicy.from_dict(raw.get("policy"))
        if policy.workload != workload:
            raise _invalid(f"stop.{workload}", f"holds a {policy.workload} rule")
        vocabulary = ProbeVocabulary.from_dict(raw["vocabulary"]) if workload == REASONING else None
        return cls(policy, vocabulary)


@dataclass
class PackageManifest:
    """Everything a package's runtime needs besides the graph, and what the package was made from."""

    provider: str  # the execution provider it is for
    dtype: str  # the graph's float precision
    family: str
    num_layers: int
    vocab_size: int
    kv_geometry: list[list[int]]  # per layer [kv heads, head dim]
    policy: ExitPolicy | None  # None: a package without exits
    eos_token_id: int | None = None
    base_model: dict | None = None  # {spec, content_hash} of the model it was exported from
    kv_layout: str = "concat"
    model_file: str = MODEL_FILE
    exits_disabled_threshold: float = EXITS_DISABLED
    custom_ops: dict = field(default_factory=dict)  # {domain, nodes: op type -> count}
    notes: list[str] = field(default_factory=list)  # what the export could not do as asked
    fusions: dict = field(default_factory=dict)  # what the graph runs as fused kernels (exporters/fusions.py)
    files: dict[str, int] = field(default_factory=dict)  # file -> size in bytes
    weights: dict | None = None  # the weight-only quantization ({format, block_size, ...}); None: the dtype's weights
    baseline: str | None = None
    baseline_full: str | None = None
    baseline_weights: dict | None = None
    # weights auto: each candidate in the order tested ({weights, decode_tokens_per_s}), slowest first
    weights_candidates: list[dict] = field(default_factory=list)
    stop: dict[str, PackageStopRule] = field(default_factory=dict)
    certificate: PackageCertificate | None = None
    version: int = PACKAGE_VERSION
    path: Path | None = field(default=None, compare=False)  # where it was read from or written to (not stored)

    @property
    def inputs(self) -> list[str]:
        return input_names(self.num_layers, self.kv_layout)

    @property
    def outputs(self) -> list[str]:
        return output_names(self.num_layers)

    @property
    def precision(self) -> str:
        """The weights' precision: int8/int4 when quantized, else the graph's dtype."""
        return (self.weights or {}).get("format") or self.dtype

    def model_files(self) -> list[str]:
        """The graph and its external data."""
        return sorted(name for name in self.files if name.startswith(self.model_file))

    def to_dict(self) -> dict:
        out = {"format": PACKAGE_FORMAT}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "path":
                continue
            if f.name == "policy":
                value = value.to_dict() if value is not None else None
            elif f.name == "stop":
                value = {workload: rule.to_dict() for workload, rule in value.items()}
            elif f.name == "certificate":
                value = value.to_dict() if value is not None else None
            out[f.name] = value
        return out | {"inputs": self.inputs, "outputs": self.outputs}

    def write(self, directory: Path) -> None:
        """Write the manifest into `directory`, with the size of every other file now in it."""
        directory = Path(directory)
        self.files = {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file() and p.name != PACKAGE_MANIFEST}
        (directory / PACKAGE_MANIFEST).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        self.path = directory

    @classmethod
    def from_dict(cls, raw: dict, where: str = "the package") -> PackageManifest:
        """The manifest, every field the runtime reads typed and range-checked."""
        if not isinstance(raw, dict) or raw.get("format") != PACKAGE_FORMAT:
            raise DyninferError(f"{where} has no dyninfer ONNX package manifest; re-run `dyninfer export`")
        version = raw.get("version")
        if not is_integer(version) or version < 1:
            raise _invalid("version", f"is {version!r}")
        if version > PACKAGE_VERSION:
            raise DyninferError(f"{where} was made by a newer dyninfer (package format {version}); upgrade dyninfer")
        if version < OLDEST_VERSION:
            raise DyninferError(f"{where} has package format {version}, which this dyninfer no longer runs; export it again")
        names = {f.name for f in fields(cls)} - {"path", "policy", "stop", "certificate"}
        plain = {k: v for k, v in raw.items() if k in names}
        missing = [n for n in ("provider", "dtype", "family", "num_layers", "vocab_size", "kv_geometry") if n not in plain]
        if missing or "policy" not in raw:
            raise _invalid((missing or ["policy"])[0], "is missing")
        stop = raw.get("stop") or {}
        if not isinstance(stop, dict) or any(w not in STOP_WORKLOADS for w in stop):
            raise _invalid("stop", "is not a map of stop workloads")
        manifest = cls(
            **plain,
            policy=_policy(raw["policy"], plain.get("num_layers")),
            stop={workload: PackageStopRule.from_dict(workload, rule) for workload, rule in stop.items()},
            certificate=None if raw.get("certificate") is None else PackageCertificate.from_dict(raw["certificate"]),
        )
        manifest.validate()
        return manifest

    def validate(self) -> PackageManifest:
        """Refuse a field of the wrong type or out of range (one line naming it)."""
        checks = [
            ("provider", self.provider in ONNX_PROVIDERS),
            ("dtype", self.dtype in EXPORT_DTYPES),
            ("family", isinstance(self.family, str)),
            ("num_layers", is_integer(self.num_layers) and 1 <= self.num_layers <= 100_000),
            ("vocab_size", is_integer(self.vocab_size) and 1 <= self.vocab_size <= 100_000_000),
            ("kv_geometry", _geometry(self.kv_geometry, self.num_layers)),
            ("eos_token_id", self.eos_token_id is None or (is_integer(self.eos_token_id) and 0 <= self.eos_token_id < self.vocab_size)),
            ("base_model", self.base_model is None or _str_map(self.base_model, allow_none=True)),
            ("kv_layout", self.kv_layout in KV_LAYOUTS),
            ("model_file", isinstance(self.model_file, str)),  # inside the package: `read_package` says so by name
            ("exits_disabled_threshold", _finite(self.exits_disabled_threshold) and self.exits_disabled_threshold > 1.0),
            ("custom_ops", isinstance(self.custom_ops, dict)),
            ("fusions", isinstance(self.fusions, dict)),
            ("notes", isinstance(self.notes, list) and all(isinstance(n, str) for n in self.notes)),
            ("files", isinstance(self.files, dict) and all(isinstance(k, str) and is_integer(v) and v >= 0 for k, v in self.files.items())),
            ("weights", self.weights is None or (isinstance(self.weights, dict) and isinstance(self.weights.get("format"), str))),
            ("baseline", self.baseline is None or (isinstance(self.baseline, str) and relative_inside(self.baseline))),
            ("baseline_full", self.baseline_full is None or (isinstance(self.baseline_full, str) and relative_inside(self.baseline_full))),
            ("baseline_weights", self.baseline_weights is None or isinstance(self.baseline_weights, dict)),
            ("weights_candidates", isinstance(self.weights_candidates, list) and all(isinstance(c, dict) for c in self.weights_candidates)),
        ]
        bad = next((name for name, ok in checks if not ok), None)
        if bad is not None:
            raise _invalid(bad, f"is {getattr(self, bad)!r}"[:200])
        return self


def _invalid(name: str, what: str) -> DyninferError:
    return DyninferError(f"the package manifest's `{name}` {what}; the package is damaged, re-run `dyninfer export`")


def _policy(raw, num_layers) -> ExitPolicy | None:
    if raw is None or (isinstance(raw, dict) and raw.get("threshold") is None and not raw.get("exit_points")):
        return None  # exported without exits
    try:
        return ExitPolicy.from_dict(raw, num_layers if is_integer(num_layers) else None)
    except DyninferError as exc:
        raise _invalid("policy", f"is invalid ({exc})") from None


def _finite(value) -> bool:
    return is_number(value) and math.isfinite(value)


def _fraction(value) -> bool:
    return _finite(value) and 0.0 < value < 1.0


def _str_map(value, allow_none: bool = False) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and (isinstance(v, str) or (allow_none and v is None)) for k, v in value.items()
    )


def _geometry(value, num_layers) -> bool:
    return (
        isinstance(value, list)
        and len(value) == num_layers
        and all(isinstance(g, (list, tuple)) and len(g) == 2 and all(is_integer(x) and x >= 1 for x in g) for g in value)
    )


def find_package(path) -> Path:
    """The package at `path`, or in `path`/onnx when `path` is the artifact it was exported from."""
    path = Path(path)
    if not path.exists():
        raise DyninferError(f"'{path}' does not exist; pass an exported package or its artifact directory")
    if (path / PACKAGE_MANIFEST).is_file() or not (path / "onnx" / PACKAGE_MANIFEST).is_file():
        return path
    return path / "onnx"


def read_package(path) -> PackageManifest:
    """The validated manifest of the package at `path` (a one-line DyninferError if unusable), its `path` set."""
    path = find_package(path)
    manifest_path = path / PACKAGE_MANIFEST
    if not manifest_path.is_file():
        hint = " (run `dyninfer export` on the artifact first)" if (path / "dyninfer.json").is_file() else ""
        raise DyninferError(f"'{path}' is not a dyninfer ONNX package: no {PACKAGE_MANIFEST}{hint}")
    try:
        raw = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise DyninferError(f"the package manifest '{manifest_path}' is damaged ({exc}); re-run `dyninfer export`") from None
    manifest = PackageManifest.from_dict(raw, f"the package at '{path}'")
    for name in [manifest.model_file, *manifest.files]:
        if not inside(path, path / name):
            raise DyninferError(
                f"the package at '{path}' names the file {name!r}, which is not a file inside the package (an absolute path, "
                "`..` or a link out of it); re-run `dyninfer export`"
            )
    for name, size in manifest.files.items():
        file = path / name
        if not file.is_file():
            raise DyninferError(f"the package at '{path}' lacks '{name}'; re-run `dyninfer export`")
        if file.stat().st_size != size:
            raise DyninferError(
                f"'{file}' has {file.stat().st_size} bytes, the manifest says {size}: the package "
                "is damaged or incomplete; re-run `dyninfer export`"
            )
    manifest.path = path
    return manifest

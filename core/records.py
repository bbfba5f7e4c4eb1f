"""Typed stage records: each stage's entry in an artifact's manifest, read and written only through these.

A record holds, as typed and checked attributes, the fields other stages read (a calibration's
policy, a probe's agreement, a profile's measured cost, ...), and in `report` everything else the
stage reported, kept as written for reports and JSON summaries. Each record type has a version
(`record_version` in the manifest): a record from a newer dyninfer is refused with one line, and a
record without one (written before records were versioned, release 0.1.0) reads as version 1,
whose layout it has. tests/test_records.py loads an artifact saved by that release.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from dyninfer.core import stages
from dyninfer.core.choices import (
    BUILTIN_CODE,
    BUILTIN_COT,
    COMPLETION,
    CONSISTENCY_MEASURES,
    GENERATION_RISK,
    PROMPT_RISKS,
    RISKS,
    STOP_WORKLOADS,
    TOP1,
)
from dyninfer.core.errors import DyninferError, is_integer, is_number
from dyninfer.core.policies import ExitPolicy, StopPolicy

VERSION_KEY = "record_version"


@dataclass
class StageRecord:
    STAGE: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1

    report: dict = field(default_factory=dict)  # the rest of the stage's summary, as the stage wrote it

    @classmethod
    def read(cls, artifact) -> Any:
        """This stage's record in `artifact` (an `Artifact`), or None when the stage never ran there."""
        raw = artifact.stages.get(cls.STAGE)
        return None if raw is None else cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict) -> Any:
        if not isinstance(raw, dict):
            raise cls._invalid(f"a {type(raw).__name__}, not an object")
        version = raw.get(VERSION_KEY, 1)
        if not is_integer(version) or version < 1:
            raise cls._invalid(f"{VERSION_KEY} {version!r} is not a positive whole number")
        if version > cls.VERSION:
            raise DyninferError(
                f"the artifact's {cls.STAGE} record has version {version}, newer than this dyninfer reads "
                f"({cls.VERSION}); upgrade dyninfer, or run `dyninfer {cls.STAGE}` into the artifact again"
            )
        names = [f.name for f in dataclasses.fields(cls) if f.name != "report"]
        stored = {name: raw[name] for name in names if name in raw}
        record = cls(report={k: v for k, v in raw.items() if k not in stored and k != VERSION_KEY}, **cls._typed(raw, version, stored))
        record.check()
        return record

    @classmethod
    def _typed(cls, raw: dict, version: int, stored: dict) -> dict:
        """The typed fields from the stored JSON (`stored`: the fields' own keys); a record type with nested types, or
        whose older versions kept its fields elsewhere in `raw`, builds them here (the disk boundary)."""
        return stored

    def check(self) -> None:
        """Refuse a record whose read fields have the wrong shape (one line, naming the stage)."""

    def to_dict(self) -> dict:
        typed = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "report"}
        typed = {k: v.to_dict() if hasattr(v, "to_dict") else v for k, v in typed.items() if v is not None}
        return self.report | typed | {VERSION_KEY: self.VERSION}

    def write(self, artifact) -> None:
        artifact.set_stage(self.STAGE, self.to_dict())

    @classmethod
    def clear(cls, artifact) -> None:
        """Drop this stage's record (what it described is gone)."""
        artifact.stages.pop(cls.STAGE, None)

    @classmethod
    def _invalid(cls, what: str) -> DyninferError:
        return DyninferError(f"the artifact's {cls.STAGE} record is invalid ({what}); run `dyninfer {cls.STAGE}` into it again")

    def _expect(self, name: str, kind: type | tuple[type, ...]) -> None:
        value = getattr(self, name)
        if value is not None and not isinstance(value, kind):
            raise self._invalid(f"{name} is {type(value).__name__}")


@dataclass
class ProbeRecord(StageRecord):
    STAGE: ClassVar[str] = stages.PROBE
    lenses: dict = field(default_factory=dict)  # lens -> {agreement: [per depth], accuracy, kl, ...}
    data: dict = field(default_factory=dict)  # the windows' description (spec, seq_len, sequence_start, ...)

    def check(self) -> None:
        self._expect("lenses", dict)
        self._expect("data", dict)

    def agreement(self, lens: str) -> list[float] | None:
        """Per depth, how often `lens`'s top-1 equals the final layer's on held-out text."""
        values = (self.lenses.get(lens) or {}).get("agreement")
        return list(values) if values else None


@dataclass
class ProfileRecord(StageRecord):
    STAGE: ClassVar[str] = stages.PROFILE
    measured_cost: dict | None = None  # CostModel.to_dict() of the measured decode latency
    pruned: bool = False  # measured on the pruned model

    def check(self) -> None:
        self._expect("measured_cost", dict)
        self._expect("pruned", bool)


@dataclass
class CorpusDraw:
    """Where a stage's units were drawn: the corpus, its field, the window length and the split's seed."""

    spec: str
    field: str | None
    seq_len: int
    seed: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw) -> CorpusDraw:
        if not isinstance(raw, dict):
            raise ValueError("corpus is not an object")
        draw = cls(raw.get("spec"), raw.get("field"), raw.get("seq_len"), raw.get("seed"))
        if not (isinstance(draw.spec, str) and (draw.field is None or isinstance(draw.field, str))):
            raise ValueError(f"corpus spec {draw.spec!r} or field {draw.field!r}")
        if not (is_integer(draw.seq_len) and draw.seq_len >= 1 and is_integer(draw.seed)):
            raise ValueError(f"corpus seq_len {draw.seq_len!r} or seed {draw.seed!r}")
        return draw


@dataclass
class ExitCertificate:
    """What calibration certified, as export and bench read it: the bound, its risk and measure, the candidates the
    fixed-sequence test ran through (strict to loose; None: never exit), and the units it was certified on."""

    risk: str
    target: float
    epsilon: float
    candidates: list[float | None]
    units: int  # calibration prompts (generation risk) or windows
    measure: str = "tokens"  # generation risk: the consistency measure; fidelity: top1 (the teacher-forced risks: tokens)
    prompt_tokens: int | None = None  # prompt risks: the prompts' length and the continuations'
    new_tokens: int | None = None
    kl_tau: float | None = None  # fidelity: the KL above which a position counts against the second risk (None: none)

    @property
    def on_prompts(self) -> bool:
        """Certified on prompts and the full model's continuations (generation or fidelity), which the artifact caches."""
        return self.risk in PROMPT_RISKS

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw) -> ExitCertificate:
        if not isinstance(raw, dict):
            raise ValueError("certificate is not an object")
        names = {f.name for f in dataclasses.fields(cls)}
        certificate = cls(**{k: v for k, v in raw.items() if k in names})
        checks = [
            ("risk", certificate.risk in RISKS),
            ("target", is_number(certificate.target) and 0 < certificate.target < 1),
            ("epsilon", is_number(certificate.epsilon) and 0 < certificate.epsilon < 1),
            ("candidates", isinstance(certificate.candidates, list) and all(c is None or is_number(c) for c in certificate.candidates)),
            ("units", is_integer(certificate.units) and certificate.units >= 0),
            ("measure", certificate.measure in (*CONSISTENCY_MEASURES, TOP1)),
            ("kl_tau", certificate.kl_tau is None or (is_number(certificate.kl_tau) and certificate.kl_tau > 0)),
            (
                "prompt_tokens",
                certificate.prompt_tokens is None or (is_integer(certificate.prompt_tokens) and certificate.prompt_tokens > 0),
            ),
            ("new_tokens", certificate.new_tokens is None or (is_integer(certificate.new_tokens) and certificate.new_tokens > 0)),
        ]
        bad = next((name for name, ok in checks if not ok), None)
        if bad is not None:
            raise ValueError(f"certificate {bad} {getattr(certificate, bad)!r}")
        return certificate


@dataclass
class CalibrateRecord(StageRecord):
    """The exit policy, what certified it and on what, and what later stages read of the calibration."""

    STAGE: ClassVar[str] = stages.CALIBRATE
    VERSION: ClassVar[int] = 2  # 2: the certificate, corpus, predicted speedup and cost unit typed
    policy: ExitPolicy | None = None
    certificate: ExitCertificate | None = None
    corpus: CorpusDraw | None = None
    predicted_speedup: float | None = None  # the certified policy's held-out speedup (simulated), as its cost model counts
    cost_unit: str | None = None  # what that speedup is a ratio of: "FLOPs" or "latency"
    continuations_key: str | None = None  # the model state its cached full continuations belong to
    placement: dict | None = None  # where it ran ({device, dtype}): the certificate holds for that dtype

    @classmethod
    def _typed(cls, raw: dict, version: int, stored: dict) -> dict:
        try:
            if version == 1:  # release 0.1.0 kept the certificate's fields across the calibration's summary
                stored |= _calibration_v1(raw)
            if stored.get("policy") is not None:
                stored["policy"] = ExitPolicy.from_dict(stored["policy"])
            for name, kind in (("certificate", ExitCertificate), ("corpus", CorpusDraw)):
                if stored.get(name) is not None:
                    stored[name] = kind.from_dict(stored[name])
        except (ValueError, TypeError) as exc:  # the policy refuses itself, naming its field
            raise cls._invalid(str(exc)) from None
        return stored

    def check(self) -> None:
        self._expect("continuations_key", str)
        self._expect("placement", dict)
        self._expect("cost_unit", str)
        if self.predicted_speedup is not None and not (is_number(self.predicted_speedup) and math.isfinite(self.predicted_speedup)):
            raise self._invalid(f"predicted_speedup is {self.predicted_speedup!r}")

    @property
    def dtype(self) -> str | None:
        """The dtype the calibration ran in (its certificate holds for it)."""
        return (self.placement or {}).get("dtype")


def _calibration_v1(raw: dict) -> dict:
    """A version-1 calibration's typed fields, from where its summary kept them."""
    config, ltt, data = raw.get("config") or {}, raw.get("ltt") or {}, raw.get("data") or {}
    generation = raw.get("risk") == GENERATION_RISK
    typed = {}
    if ltt and raw.get("risk"):
        typed["certificate"] = {
            "risk": raw["risk"],
            "target": raw.get("target"),
            "epsilon": raw.get("epsilon"),
            "candidates": list(ltt.get("lambdas") or []),
            "units": ltt.get("n", 0),
            "measure": config.get("consistency", "tokens") if generation else "tokens",
            "prompt_tokens": config.get("prompt_tokens") if generation else None,
            "new_tokens": ((raw.get("generated") or {}).get("new_tokens") or config.get("new_tokens")) if generation else None,
        }
    if data.get("spec") is not None:
        typed["corpus"] = {"spec": data["spec"], "field": config.get("field"), "seq_len": data.get("seq_len"), "seed": data.get("seed")}
    speedup = (raw.get("heldout") or {}).get("predicted_speedup")
    typed["predicted_speedup"] = float(speedup) if is_number(speedup) else None
    typed["cost_unit"] = "latency" if str((raw.get("cost_model") or {}).get("unit", "")).startswith("ms") else "FLOPs"
    return typed


@dataclass
class PruneRecord(StageRecord):
    STAGE: ClassVar[str] = stages.PRUNE
    plan: dict | None = None  # PruningPlan.describe() (PruningPlan.from_artifact checks it where it loads)


@dataclass
class SteerRecord(StageRecord):
    STAGE: ClassVar[str] = stages.STEER
    methods: dict = field(default_factory=dict)  # method -> its extraction (and sweep) record
    applied: Any = None  # {method, alpha} baked into the weights by every loader (checked where it is baked)
    sweeps: dict = field(default_factory=dict)  # method -> the summary of its direction's last sweep

    def check(self) -> None:
        self._expect("methods", dict)
        self._expect("sweeps", dict)


@dataclass
class TrainedWindows:
    """The corpus windows something trained on (a tuned lens, a tune-exits LoRA): enough to find them again in
    another split of that corpus (runtime/loader.lens_overlaps)."""

    data: str  # the corpus spec
    window_len: int  # corpus tokens per window
    windows: list[int]  # the windows' indices in the corpus

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw) -> TrainedWindows:
        if not isinstance(raw, dict):
            raise ValueError("the trained windows are not an object")
        trained = cls(raw.get("data"), raw.get("window_len"), raw.get("windows"))
        if not isinstance(trained.data, str) or not (is_integer(trained.window_len) and trained.window_len >= 1):
            raise ValueError(f"the trained windows' data {trained.data!r} or window_len {trained.window_len!r}")
        if not isinstance(trained.windows, list) or not all(is_integer(w) and w >= 0 for w in trained.windows):
            raise ValueError("the trained windows' indices are not whole numbers")
        return trained


@dataclass
class TuneRecord(StageRecord):
    STAGE: ClassVar[str] = stages.TUNE
    windows: TrainedWindows | None = None  # the corpus windows the LoRA trained on
    tuned: dict = field(default_factory=dict)  # the tuned model's held-out measures (agreement per depth, ...)
    fingerprint: str | None = None  # the LoRA delta's hash

    @classmethod
    def _typed(cls, raw: dict, version: int, stored: dict) -> dict:
        try:
            if stored.get("windows") is not None:
                stored["windows"] = TrainedWindows.from_dict(stored["windows"])
        except ValueError as exc:
            raise cls._invalid(str(exc)) from None
        return stored

    def check(self) -> None:
        self._expect("tuned", dict)
        self._expect("fingerprint", str)

    def agreement(self) -> list[float] | None:
        values = self.tuned.get("agreement")
        return list(values) if values else None


@dataclass
class LensRecord(StageRecord):
    """Where the tuned lens in the exits group trained: which corpus windows (runtime/loader.lens_provenance)."""

    STAGE: ClassVar[str] = stages.LENS
    data: str | None = None
    window_len: int | None = None
    windows: list | None = None

    def check(self) -> None:
        self._expect("data", str)
        self._expect("window_len", int)
        self._expect("windows", list)

    def provenance(self) -> TrainedWindows | None:
        """The lens's training windows (None: a record without them)."""
        try:
            return TrainedWindows.from_dict({"data": self.data, "window_len": self.window_len, "windows": self.windows})
        except ValueError:
            return None


@dataclass
class StopDraw:
    """Where a stop rule's units came from, enough to draw its held-out units again (bench): the source and its
    seed, the unit counts of each split, the completion lengths or the reasoning prompt's worked examples."""

    workload: str
    data: str
    field: str | None
    seed: int
    fit_prompts: int
    prompts: int
    heldout_prompts: int
    prompt_tokens: int = 64  # completion
    new_tokens: int = 64  # completion
    shots: int = 0  # reasoning

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw) -> StopDraw:
        if not isinstance(raw, dict):
            raise ValueError("its units' draw is not an object")
        names = {f.name for f in dataclasses.fields(cls)}
        draw = cls(**{k: v for k, v in raw.items() if k in names})
        whole = ("seed", "fit_prompts", "prompts", "heldout_prompts", "prompt_tokens", "new_tokens", "shots")
        bad = [n for n in whole if not (is_integer(getattr(draw, n)) and getattr(draw, n) >= 0)]
        if draw.workload not in STOP_WORKLOADS or not isinstance(draw.data, str) or bad:
            raise ValueError(f"its units' draw has a bad {(bad or ['workload or data'])[0]}")
        return draw


@dataclass
class StopRule:
    """One workload's certified rule, where its units came from, and the stop job's summary (for reports)."""

    policy: StopPolicy
    draw: StopDraw | None = None  # None: a rule recorded before draws were typed (its summary's config has it)
    summary: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"policy": self.policy.to_dict(), "draw": None if self.draw is None else self.draw.to_dict(), "summary": self.summary}


@dataclass
class StopRecord(StageRecord):
    """The certified stop rules, one per workload."""

    STAGE: ClassVar[str] = stages.STOP
    VERSION: ClassVar[int] = 2  # 2: each rule's draw typed (version 1 kept it in its summary's config)
    rules: dict[str, StopRule] = field(default_factory=dict)

    @classmethod
    def _typed(cls, raw: dict, version: int, stored: dict) -> dict:
        rules = stored.get("rules", {})
        if not isinstance(rules, dict):
            raise cls._invalid("rules is not an object")
        typed = {}
        for workload, rule in rules.items():
            if workload not in STOP_WORKLOADS or not isinstance(rule, dict) or not isinstance(rule.get("policy"), dict):
                raise cls._invalid(f"the {workload} rule has no policy")
            summary = rule.get("summary") if isinstance(rule.get("summary"), dict) else {}
            draw = rule.get("draw") if version > 1 else _stop_draw_v1(workload, summary)
            try:
                typed[workload] = StopRule(
                    StopPolicy.from_dict(rule["policy"]), None if draw is None else StopDraw.from_dict(draw), summary
                )
            except (ValueError, TypeError) as exc:
                raise cls._invalid(f"the {workload} rule: {exc}") from None
        return stored | {"rules": typed}

    def to_dict(self) -> dict:
        return self.report | {"rules": {w: rule.to_dict() for w, rule in self.rules.items()}, VERSION_KEY: self.VERSION}

    def put(self, workload: str, rule: StopRule) -> None:
        self.rules = self.rules | {workload: rule}


def _stop_draw_v1(workload: str, summary: dict) -> dict | None:
    """A version-1 rule's draw, from the stop job's config in its summary."""
    config = summary.get("config")
    if not isinstance(config, dict):
        return None
    default = BUILTIN_CODE if workload == COMPLETION else BUILTIN_COT
    names = ("field", "seed", "fit_prompts", "prompts", "heldout_prompts", "prompt_tokens", "new_tokens", "shots")
    return {"workload": workload, "data": config.get("data") or default} | {k: config[k] for k in names if k in config}


@dataclass
class AuditRecord(StageRecord):
    STAGE: ClassVar[str] = stages.AUDIT


RECORDS: dict[str, type[StageRecord]] = {
    r.STAGE: r
    for r in (ProbeRecord, ProfileRecord, CalibrateRecord, PruneRecord, SteerRecord, TuneRecord, LensRecord, StopRecord, AuditRecord)
}


def read_all(artifact) -> dict[str, StageRecord]:
    """Every stage record the artifact holds, typed (a stage this release does not know is kept as a plain record)."""
    return {name: RECORDS.get(name, StageRecord).from_dict(raw) for name, raw in artifact.stages.items()}

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
from dataclasses import dataclass, field
from typing import Any, ClassVar

from dyninfer.core import stages
from dyninfer.core.errors import DyninferError, is_integer

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
        typed = {name: raw[name] for name in names if name in raw}
        record = cls(report={k: v for k, v in raw.items() if k not in typed and k != VERSION_KEY}, **typed)
        record.check()
        return record

    def check(self) -> None:
        """Refuse a record whose read fields have the wrong shape (one line, naming the stage)."""

    def to_dict(self) -> dict:
        typed = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "report"}
        return self.report | {k: v for k, v in typed.items() if v is not None} | {VERSION_KEY: self.VERSION}

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
class CalibrateRecord(StageRecord):
    STAGE: ClassVar[str] = stages.CALIBRATE
    policy: dict | None = None  # ExitPolicy.to_dict() (early_exit/policy.py checks its fields)
    continuations_key: str | None = None  # the model state its cached full continuations belong to
    placement: dict | None = None  # where it ran ({device, dtype}): the certificate holds for that dtype

    def check(self) -> None:  # the policy's own fields: ExitPolicy.from_dict, where the loader reads it
        self._expect("continuations_key", str)
        self._expect("placement", dict)


@dataclass
class PruneRecord(StageRecord):
    STAGE: ClassVar[str] = stages.PRUNE
    plan: dict | None = None  # PruningPlan.describe() (PruningPlan.from_artifact checks it where it loads)


@dataclass
class SteerRecord(StageRecord):
    STAGE: ClassVar[str] = stages.STEER
    methods: dict = field(default_factory=dict)  # method -> its extraction (and sweep) record
    applied: Any = None  # {method, alpha} baked into the weights by every loader (checked where it is baked)

    def check(self) -> None:
        self._expect("methods", dict)


@dataclass
class TuneRecord(StageRecord):
    STAGE: ClassVar[str] = stages.TUNE
    windows: dict | None = None  # the corpus windows the LoRA trained on (lens_provenance)
    tuned: dict = field(default_factory=dict)  # the tuned model's held-out measures (agreement per depth, ...)
    fingerprint: str | None = None  # the LoRA delta's hash

    def check(self) -> None:
        self._expect("windows", dict)
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

    def provenance(self) -> dict:
        return {"data": self.data, "window_len": self.window_len, "windows": self.windows}


@dataclass
class StopRecord(StageRecord):
    """The certified stop rules, one per workload: {workload: {"policy": StopPolicy.to_dict(), "summary": the stop job's}}."""

    STAGE: ClassVar[str] = stages.STOP
    rules: dict = field(default_factory=dict)

    def check(self) -> None:
        self._expect("rules", dict)
        for workload, rule in self.rules.items():
            if not isinstance(rule, dict) or not isinstance(rule.get("policy"), dict):
                raise self._invalid(f"the {workload} rule has no policy")

    def policy(self, workload: str) -> dict | None:
        rule = self.rules.get(workload)
        return None if rule is None else rule["policy"]

    def put(self, workload: str, policy: dict, summary: dict) -> None:
        self.rules = self.rules | {workload: {"policy": policy, "summary": summary}}


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

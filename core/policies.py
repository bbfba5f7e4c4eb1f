"""The decisions an artifact and a package store, as typed records: the early-exit policy and the stop rule.

Each is what a stage decided (calibrate, stop) in the form every later stage reads: checked field by field
when it comes from disk, so a damaged or foreign one is one `error:` line. How the decisions are made and
obeyed lives above (early_exit/, compressors/stop_*.py); these are only their records.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from dyninfer.core.choices import (
    COMPLETION,
    FULL,
    KV_MODES,
    LENS_KINDS,
    MEASURES,
    STOP_CONDITIONS,
    STOP_MODES,
    STOP_PROBE_SITES,
    STOP_SIGNALS,
    STOP_VALUE_UNITS,
    STOP_WORKLOADS,
)
from dyninfer.core.errors import DyninferError, is_integer, is_number

PROBE_SUFFIX = "\nThe answer is"  # a reasoning probe's forced answer continuation


@dataclass
class ExitPolicy:
    """What the dynamic model does: where it may exit, how it decides, and what it costs."""

    lens: str
    measure: str
    exit_points: list[int]  # hidden-state indices (after decoder layer i), ascending
    threshold: float | None  # exit when confidence >= threshold; None: never exit (nothing certified)
    vocab_top_k: int  # 0: full vocabulary at every check; K: after the first check, only its top-K
    kv_mode: str = "propagate"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, num_layers: int | None = None) -> ExitPolicy:
        """The policy an artifact holds, every field checked (exit points against `num_layers`)."""

        def invalid(what: str) -> DyninferError:
            return DyninferError(f"the artifact's early-exit policy is invalid ({what}); run `dyninfer calibrate` into it again")

        if not isinstance(d, dict):
            raise invalid(f"a {type(d).__name__}, not an object")
        missing = [k for k in ("lens", "measure", "exit_points", "threshold", "vocab_top_k") if k not in d]
        if missing:
            raise invalid(f"no {', '.join(missing)}")
        for name, allowed in (("lens", LENS_KINDS), ("measure", MEASURES), ("kv_mode", KV_MODES)):
            if d.get(name, allowed[0]) not in allowed:
                raise invalid(f"{name} {d.get(name)!r} is not one of {', '.join(allowed)}")
        points, threshold, top_k = d["exit_points"], d["threshold"], d["vocab_top_k"]
        if not isinstance(points, list) or not all(is_integer(p) for p in points) or points != sorted(set(points)):
            raise invalid(f"exit_points {points!r} is not a list of ascending layer numbers")
        if threshold is not None and not (is_number(threshold) and not math.isnan(threshold)):
            raise invalid(f"threshold {threshold!r} is not a number")
        if not is_integer(top_k) or top_k < 0:
            raise invalid(f"vocab_top_k {top_k!r} is not a whole number >= 0")
        policy = cls(
            d["lens"], d["measure"], list(points), None if threshold is None else float(threshold), top_k, d.get("kv_mode", KV_MODES[0])
        )
        return policy if num_layers is None else policy.check_points(num_layers)

    def check_points(self, num_layers: int) -> ExitPolicy:
        """Refuse exit points that are not layers of a `num_layers`-layer model (a policy made for another model)."""
        if any(not 1 <= p < num_layers for p in self.exit_points):
            raise DyninferError(
                f"the artifact's early-exit policy is invalid (exit_points {self.exit_points} are not all between 1 and "
                f"{num_layers - 1} for this {num_layers}-layer model); run `dyninfer calibrate` into it again"
            )
        return self


@dataclass
class StopPolicy:
    """A certified stop rule, as the artifact stores it and both runtimes obey it (compressors/stop_obey.py)."""

    workload: str
    signal: str
    threshold: float | None  # None: never stop (nothing could be certified, or the strictest was all that held)
    target: float  # 1 - delta: the value (completion) or right answers (reasoning) kept
    epsilon: float
    new_tokens: int  # the completion length (or chain budget) it was certified for
    value_unit: str = "tokens"
    condition: str = "valued"
    mode: str = FULL  # the generation it was certified on
    model_state: str = ""  # the model state (weights, steering, pruning) it was certified on
    probe_suffix: str = PROBE_SUFFIX  # reasoning: the forced answer continuation
    probe_tokens: int = 6  # reasoning: tokens a probe may generate
    statement: str = ""
    probe_at: str = "sentences"  # reasoning: the probe sites (rules made before it probed at sentences)

    def check(self) -> StopPolicy:
        """Refuse a damaged or foreign rule with one line (it comes from an artifact or a package on disk)."""

        def number(value, low: float, high: float) -> bool:
            return is_number(value) and math.isfinite(value) and low < value < high

        def whole(value) -> bool:
            return is_integer(value) and value >= 1

        problems = [
            (self.workload in STOP_WORKLOADS, "workload"),
            (self.signal in STOP_SIGNALS.get(self.workload, ()), "signal"),
            (self.value_unit in STOP_VALUE_UNITS, "value_unit"),
            (self.condition in STOP_CONDITIONS, "condition"),
            (self.mode in STOP_MODES, "mode"),
            (self.threshold is None or number(self.threshold, -math.inf, math.inf), "threshold"),
            (number(self.target, 0.0, 1.0) and number(self.epsilon, 0.0, 1.0), "target or epsilon"),
            (whole(self.new_tokens) and whole(self.probe_tokens), "new_tokens or probe_tokens"),
            (isinstance(self.probe_suffix, str) and isinstance(self.model_state, str), "probe_suffix or model_state"),
            (isinstance(self.statement, str), "statement"),
            (self.probe_at in STOP_PROBE_SITES, "probe_at"),
        ]
        bad = [name for ok, name in problems if not ok]
        if bad:
            raise DyninferError(f"the stop rule's {bad[0]} is invalid; run `dyninfer stop` again to make a new one")
        return self

    @property
    def delta(self) -> float:
        return 1.0 - self.target

    @property
    def stops_ever(self) -> bool:
        """Whether the rule can stop at all (a rule without a finite threshold never does, and never probes)."""
        return self.threshold is not None and math.isfinite(self.threshold)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> StopPolicy:
        if not isinstance(raw, dict):
            raise DyninferError("the stored stop rule is not an object; run `dyninfer stop` into the artifact again")
        names = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in raw.items() if k in names}).check()
        except TypeError as exc:
            raise DyninferError(f"the stored stop rule is incomplete ({exc}); run `dyninfer stop` into the artifact again") from None

    def describe(self) -> str:
        if self.threshold is None:
            return f"{self.workload} stop: never stops (nothing looser was certified)"
        if self.workload == COMPLETION:
            return f"{self.workload} stop: stops when the {self.signal} score is < {self.threshold:.4g}"
        return f"{self.workload} stop: probes at {self.probe_at[:-1]} ends, stops when the {self.signal} score is >= {self.threshold:.4g}"

"""The early-exit policy: what the dynamic model does (where it may exit, how it decides) and what an
artifact holds of it, every field checked on load."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from dyninfer.core.choices import KV_MODES, LENS_KINDS, MEASURES
from dyninfer.core.errors import DyninferError, is_integer, is_number


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
        if num_layers is not None and any(not 1 <= p < num_layers for p in points):
            raise invalid(f"exit_points {points} are not all between 1 and {num_layers - 1} for this {num_layers}-layer model")
        if threshold is not None and not (is_number(threshold) and not math.isnan(threshold)):
            raise invalid(f"threshold {threshold!r} is not a number")
        if not is_integer(top_k) or top_k < 0:
            raise invalid(f"vocab_top_k {top_k!r} is not a whole number >= 0")
        return cls(
            d["lens"], d["measure"], list(points), None if threshold is None else float(threshold), top_k, d.get("kv_mode", KV_MODES[0])
        )

"""The one exception type that reaches users, and how its messages name options.

Library code raises `DyninferError` for anything the user can fix (bad spec, missing
file, data too short, mismatched artifact). The CLI prints its message as one line and
exits with code 2; anything else is a bug and keeps its traceback.

Library code never spells a command-line flag. A message names an option by its config
field in backticks (`` `fit_tokens` ``, see `option`; `` `no_verify` `` for a switch turned
off); the CLI shows the flag its command gives that field instead, and a library caller reads
the field name it passed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

OPTION_REFERENCE = re.compile(r"`([a-z][a-z0-9_]*)`")


class DyninferError(Exception):
    """A user-facing error: the message says what is wrong and what to do."""


def option(field: str) -> str:
    """How a message names the option behind config field `field`."""
    return f"`{field}`"


def check_choice(field: str, value, allowed: Iterable) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise DyninferError(f"{option(field)} must be one of {', '.join(map(str, allowed))}, got '{value}'")


def check_at_least(field: str, value, low) -> None:
    if not _finite(value) or value < low:
        raise DyninferError(f"{option(field)} must be at least {low}, got {value}")


def check_between(field: str, value, low: float, high: float, *, low_open: bool = True, high_open: bool = True) -> None:
    """`value` between low and high, each end excluded (open) or included; NaN and infinities fail."""
    above = _finite(value) and (value > low if low_open else value >= low)
    if not (above and (value < high if high_open else value <= high)):
        if low_open == high_open:
            where = f"between {low:g} and {high:g}" + (" (exclusive)" if low_open else "")
        else:
            where = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise DyninferError(f"{option(field)} must be {where}, got {value}")


SEED_LIMIT = 2**32  # numpy's and the ONNX backend's generators take seeds in [0, 2^32)


def check_seed(value) -> None:
    if not is_integer(value) or not 0 <= value < SEED_LIMIT:
        raise DyninferError(f"{option('seed')} must be an integer from 0 to {SEED_LIMIT - 1}, got {value}")


def check_positive(field: str, value) -> None:
    if not (_finite(value) and value > 0):
        raise DyninferError(f"{option(field)} must be positive, got {value}")


def is_integer(value) -> bool:
    """An int that is not a bool (JSON's true is not a layer number)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

"""Paired chains of thought for `steer`: one question, a long step-by-step solution and a short one.

The built-in generator writes arithmetic word problems with known answers (seeded): each
problem applies 2-4 operations (or a chosen number) (add, take away, groups of, share equally) to a quantity,
and the long chain states every intermediate result as "a op b = c" while the short chain
is one expression. User data comes from JSONL with the fields `question`, `long`, `short`,
`answer`. `extract_answer` reads the final number of a generated solution.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from dyninfer.core.choices import BUILTIN_COT
from dyninfer.core.errors import DyninferError

FIELDS = ("question", "long", "short", "answer")
_NAMES = ("Ada", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivo", "Jun", "Kofi", "Lena")
_ITEMS = ("apples", "marbles", "books", "stickers", "coins", "pencils", "shells", "cards")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_ANSWER = re.compile(r"answer is\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)


@dataclass(frozen=True)
class CotExample:
    question: str
    long: str  # step-by-step chain ending with "The answer is N."
    short: str  # the same solution in one line
    answer: float

    def to_dict(self) -> dict:
        return asdict(self)


def _step(rng: random.Random, value: int, item: str) -> tuple[str, str, str, int]:
    """One operation on the running quantity: (question clause, long step, operator, new value)."""
    kinds = ["add", "take"] + (["groups"] if value <= 20 else []) + (["share"] if value % 2 == 0 and value > 2 else [])
    kind = rng.choice(kinds)
    if kind == "add":
        n = rng.randint(2, 30)
        return (f"gets {n} more {item}", f"After getting {n} more, that is {value} + {n} = {value + n} {item}.", f"+ {n}", value + n)
    if kind == "take" and value > 2:
        n = rng.randint(1, value - 1)
        return (f"gives away {n} {item}", f"After giving away {n}, that is {value} - {n} = {value - n} {item}.", f"- {n}", value - n)
    if kind == "groups":
        n = rng.randint(2, 5)
        return (
            f"ends up with {n} times as many {item}",
            f"Having {n} times as many means {value} * {n} = {value * n} {item}.",
            f"* {n}",
            value * n,
        )
    divisors = [d for d in range(2, 6) if value % d == 0]
    if kind == "share" and divisors:
        n = rng.choice(divisors)
        return (
            f"shares them equally among {n} friends and keeps one share",
            f"Sharing equally among {n} leaves one share of {value} / {n} = {value // n} {item}.",
            f"/ {n}",
            value // n,
        )
    n = rng.randint(2, 30)  # fallback when the chosen kind does not fit the value
    return (f"gets {n} more {item}", f"After getting {n} more, that is {value} + {n} = {value + n} {item}.", f"+ {n}", value + n)


def generate_problems(count: int, seed: int = 0, operations: tuple[int, int] = (2, 4)) -> list[CotExample]:
    """`count` arithmetic word problems of `operations` (min, max) steps with long and short
    solutions (deterministic per seed)."""
    if count < 1:
        raise DyninferError(f"the number of problems must be at least 1, got {count}")
    if not 1 <= operations[0] <= operations[1]:
        raise DyninferError(f"problems need at least one operation, got {operations[0]}-{operations[1]}")
    rng = random.Random(seed)
    problems = []
    for _ in range(count):
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        start = value = rng.randint(3, 40)
        clauses, steps, expression = [], [f"{name} starts with {start} {item}."], str(start)
        for _ in range(rng.randint(*operations)):
            clause, step, operation, value = _step(rng, value, item)
            clauses.append(clause)
            steps.append(step)
            expression = f"({expression} {operation})"
        question = f"{name} has {start} {item}. Then {name} " + ", then ".join(clauses) + f". How many {item} does {name} have now?"
        long = " ".join(steps) + f" The answer is {value}."
        short = f"{expression[1:-1] if expression.startswith('(') else expression} = {value}. The answer is {value}."
        problems.append(CotExample(question, long, short, float(value)))
    return problems


def extract_answer(text: str) -> float | None:
    """The final answer of a solution: the number after the last "answer is", else the last number."""
    marked = _ANSWER.findall(text)
    if marked:
        return float(marked[-1])
    numbers = _NUMBER.findall(text)
    return float(numbers[-1]) if numbers else None


def load_cot_jsonl(path: str | Path, required: tuple[str, ...] = FIELDS) -> list[CotExample]:
    """Paired chains from JSONL (`question`, `long`, `short`, `answer` on every line; with `required` only
    `question` and `answer`, the chains are optional and empty when absent)."""
    path = Path(path)
    if not path.is_file():
        raise DyninferError(f"CoT data file '{path}' does not exist; pass a .jsonl file or builtin:arithmetic")
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DyninferError(f"'{path}' line {number} is not valid JSON ({exc.msg}); one object per line") from None
        if not isinstance(record, dict):
            raise DyninferError(f"'{path}' line {number} is not a JSON object; expected {', '.join(FIELDS)}")
        missing = [f for f in required if f not in record]
        if missing:
            raise DyninferError(f"'{path}' line {number} lacks {', '.join(missing)}; every line needs {', '.join(required)}")
        for field in ("question", "long", "short"):
            if field not in required and field not in record:
                record[field] = ""
            elif not isinstance(record[field], str) or not record[field].strip():
                raise DyninferError(f"'{path}' line {number}: '{field}' must be a non-empty string")
        answer = record["answer"]
        parsed = extract_answer(str(answer)) if not isinstance(answer, bool) else None
        if parsed is None:
            raise DyninferError(f"'{path}' line {number}: answer {answer!r} is not a number")
        examples.append(CotExample(record["question"], record["long"], record["short"], parsed))
    if not examples:
        raise DyninferError(f"'{path}' holds no examples; write one JSON object per line")
    return examples


def is_builtin(spec: str) -> bool:
    return spec == BUILTIN_COT or spec.startswith(BUILTIN_COT + ":")


def builtin_problems(spec: str, seed: int, count: int) -> list[CotExample]:
    """`count` problems with distinct questions from the seeded generator: `builtin:arithmetic` has 2-4 operations
    per problem, `builtin:arithmetic:K` exactly K (1-6). A longer request keeps the same prefix."""
    steps = (2, 4)
    if spec != BUILTIN_COT:
        tail = spec[len(BUILTIN_COT) + 1 :]
        if not tail.isdigit() or not 1 <= int(tail) <= 6:
            raise DyninferError(f"'{spec}': the number of operations after {BUILTIN_COT}: must be 1 to 6, e.g. {BUILTIN_COT}:2")
        steps = (int(tail), int(tail))
    examples, seen = [], set()
    for example in generate_problems(4 * count, seed, steps):
        if example.question not in seen:
            seen.add(example.question)
            examples.append(example)
        if len(examples) == count:
            break
    return examples


def load_problems(spec: str, seed: int, count: int) -> list[CotExample]:
    """Up to `count` distinct problems in the random order of `seed`: the built-in generator's, or a JSONL file's,
    whose lines need only `question` and `answer`."""
    if is_builtin(spec):
        return builtin_problems(spec, seed, count)
    if spec.startswith("builtin:"):
        raise DyninferError(f"unknown built-in problems '{spec}'; use {BUILTIN_COT}[:K] or a .jsonl file with question and answer")
    examples = load_cot_jsonl(spec, required=("question", "answer"))
    random.Random(seed).shuffle(examples)
    return examples[:count]

"""The built-in paired chain-of-thought generator and the JSONL loader for `steer`."""

from __future__ import annotations

import json
import re

import pytest

from dyninfer.compressors.cot_data import extract_answer, generate_problems, load_cot_jsonl
from dyninfer.core.errors import DyninferError

STEP = re.compile(r"(-?\d+) ([-+*/]) (\d+) = (-?\d+)")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}


@pytest.mark.parametrize("operations", [(2, 4), (1, 1), (3, 3)])
def test_generated_answers_are_right_by_independent_arithmetic(operations):
    for example in generate_problems(200, seed=3, operations=operations):
        # every step of the long chain is correct arithmetic, and the steps chain together
        steps = STEP.findall(example.long)
        assert operations[0] <= len(steps) <= operations[1]
        for (a, op, b, result), following in zip(steps, steps[1:] + [None]):
            assert OPS[op](int(a), int(b)) == int(result)
            if following:
                assert following[0] == result
        assert float(steps[-1][3]) == example.answer
        # the short chain is one expression that Python evaluates to the answer
        expression = example.short.split(" = ")[0]
        assert eval(expression, {"__builtins__": {}}) == example.answer
        assert extract_answer(example.long) == extract_answer(example.short) == example.answer
        assert example.answer >= 0 and float(example.answer).is_integer()
        assert len(example.long) > 2 * len(example.short)
        assert steps[0][0] in example.question


def test_generator_is_seeded():
    assert generate_problems(20, seed=5) == generate_problems(20, seed=5)
    assert generate_problems(20, seed=5) != generate_problems(20, seed=6)
    with pytest.raises(DyninferError, match="at least 1"):
        generate_problems(0)
    with pytest.raises(DyninferError, match="at least one operation"):
        generate_problems(3, operations=(0, 2))


@pytest.mark.parametrize(
    "text,expected",
    [
        ("so 3 + 4 = 7. The answer is 7.", 7.0),
        ("The answer is -2.5, not 3", -2.5),
        ("first 12, then 40", 40.0),
        ("no digits here", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_jsonl_round_trip_and_clear_errors(tmp_path):
    good = tmp_path / "cot.jsonl"
    examples = generate_problems(3, seed=1)
    good.write_text("\n".join(json.dumps(e.to_dict()) for e in examples) + "\n\n")
    assert load_cot_jsonl(good) == examples
    cases = {
        "missing.jsonl": (json.dumps({"question": "q", "long": "l", "short": "s"}), "lacks answer"),
        "notjson.jsonl": ("{oops", "not valid JSON"),
        "list.jsonl": ("[1, 2]", "not a JSON object"),
        "empty_field.jsonl": (json.dumps({"question": " ", "long": "l", "short": "s", "answer": 1}), "non-empty"),
        "answer.jsonl": (json.dumps({"question": "q", "long": "l", "short": "s", "answer": "many"}), "not a number"),
        "blank.jsonl": ("\n\n", "no examples"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_text(content)
        with pytest.raises(DyninferError, match=message):
            load_cot_jsonl(path)
    with pytest.raises(DyninferError, match="does not exist"):
        load_cot_jsonl(tmp_path / "nowhere.jsonl")

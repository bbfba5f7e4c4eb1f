"""The README's library example runs as written (on a tiny model and random text instead of the bundled ones)."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import random_text, save_tiny

from dyninfer.core.artifacts import Artifact

README = Path(__file__).parents[1] / "README.md"


def _library_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 1, "the README has one library example"
    return blocks[0]


def test_readme_library_example_runs(tmp_path, monkeypatch, capsys):
    model = save_tiny("llama", tmp_path / "model")
    data = tmp_path / "text.txt"
    data.write_text(random_text(80000))  # enough windows for the default 128 calibration prompts
    code = _library_example()
    line = 'model, data = "default", "builtin:pydocs"'
    assert line in code
    monkeypatch.chdir(tmp_path)
    exec(code.replace(line, f"model, data = {str(model)!r}, {str(data)!r}"), {})
    printed = capsys.readouterr().out
    assert re.search(r"oracle saving of the logit lens: -?\d+\.\d%", printed), printed
    assert re.search(r"exit after layers \[[\d, ]*\]: held-out consistency \d+\.\d%", printed), printed
    saved = Artifact.load(tmp_path / "my-artifact")
    assert {"probe", "calibrate"} <= set(saved.stages)
    assert (tmp_path / "my-artifact" / "calibrate" / "curve.csv").is_file()

"""The `dyninfer` command through Typer's CliRunner: outputs, artifacts and one-line errors."""

from __future__ import annotations

import json

import pytest
from conftest import save_tiny
from typer.testing import CliRunner

from dyninfer.cli.app import app
from dyninfer.core.artifacts import Artifact

runner = CliRunner()
SMALL = ["--tokens", "64", "--seq-len", "16"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    # Progress log lines may precede it; the error itself is one line, and the last.
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


HEAVY = ("torch", "transformers", "numpy", "scipy", "pandas")


@pytest.mark.parametrize(
    "args",
    [["--help"], ["probe", "--help"], ["steer", "extract", "--help"], ["tune-exits", "--help"], ["audit", "--help"], ["models", "--json"]],
)
def test_help_and_models_load_no_model_library(args):
    """What keeps `--help` and `models` fast on a CI runner: none of the libraries that take seconds to import is
    loaded (checked in a fresh interpreter, through the console entry point)."""
    import subprocess
    import sys

    probe = (
        "import sys\nsys.argv = ['dyninfer', *sys.argv[1:]]\nfrom dyninfer.cli import main\n"
        "try:\n    main()\nfinally:\n    print(sorted(m for m in " + repr(HEAVY) + " if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout[-500:]


def test_the_command_list_shows_each_commands_own_first_line():
    """`dyninfer --help` lists the commands without importing them: its lines must be the modules' own."""
    import importlib

    from dyninfer.cli.app import COMMANDS

    for name, (module, attribute, line) in COMMANDS.items():
        command_module = importlib.import_module(f"dyninfer.cli.{module}")
        assert command_module.HELP.splitlines()[0] == line, name
        assert callable(getattr(command_module, attribute))
    listing = invoke("--help").stdout
    assert all(name in listing for name in COMMANDS)


def test_the_option_vocabularies_match_what_the_code_accepts():
    """core/choices.py holds the names the Configs check; the modules that act on them hold their own tables."""
    from dyninfer.core import choices
    from dyninfer.exporters import quantize, step_export
    from dyninfer.runtime import onnx_decoder

    assert tuple(step_export.DTYPES) == tuple(onnx_decoder._NUMPY_DTYPES) == choices.EXPORT_DTYPES
    assert ("full", *quantize.WEIGHT_BITS, quantize.SOURCE) == choices.EXPORT_WEIGHTS
    assert set(choices.EXPORT_KV_LAYOUTS) == {"auto", *choices.KV_LAYOUTS}


def test_help_lists_probe_with_examples():
    result = invoke("--help")
    assert result.exit_code == 0 and "probe" in result.stdout
    probe_help = invoke("probe", "--help")
    assert probe_help.exit_code == 0 and "Examples" in probe_help.stdout and "--lens" in probe_help.stdout


def test_json_output_is_only_json(tiny_llama_dir, text_file):
    result = invoke("probe", tiny_llama_dir, "--data", text_file, *SMALL, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    logit = summary["lenses"]["logit"]
    assert summary["n_tokens"] == 64
    assert len(logit["agreement"]) == 4  # embedding + 3 layers
    assert logit["agreement"][-1] == 1.0
    assert sum(logit["depth_fraction"]) == pytest.approx(1.0, abs=1e-5)
    assert 0.0 <= logit["oracle"]["saving"] < 1.0
    assert summary["throughput"]["forward_tokens_per_s"] > 0


def test_table_output(tiny_llama_dir, text_file):
    result = invoke("probe", tiny_llama_dir, "--data", text_file, *SMALL)
    assert result.exit_code == 0, result.output
    assert "Exit probe" in result.stdout and "oracle exit saving" in result.stdout
    rows = [line.split() for line in result.stdout.splitlines()]
    assert any(r[:1] == ["embed"] for r in rows)
    final = next(r for r in rows if r[:1] == ["3"])  # the last layer agrees with itself
    assert final[1] == "100.0%"


def test_out_writes_artifact_tables_and_plot_then_reuses_the_lens(tiny_llama_dir, text_file, tmp_path):
    out = tmp_path / "art"
    result = invoke(
        "probe",
        tiny_llama_dir,
        "--data",
        text_file,
        *SMALL,
        "--lens",
        "both",
        "--lens-train-tokens",
        "512",
        "--lens-steps",
        "2",
        "--out",
        out,
        "--json",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert set(summary["lenses"]) == {"logit", "tuned"}
    artifact = Artifact.load(out)
    assert "probe" in artifact.stages
    assert artifact.tensors["exits"]["tuned_lens.weight"].shape == (3, 32, 32)
    for name in ("layers.csv", "layers.parquet", "depth.csv", "summary.json", "probe.png"):
        assert (out / "probe" / name).is_file(), name
    assert (out / "probe" / "probe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import pandas as pd

    table = pd.read_parquet(out / "probe" / "layers.parquet")
    assert set(table["lens"]) == {"logit", "tuned"} and len(table) == 8

    again = invoke("probe", tiny_llama_dir, "--data", text_file, *SMALL, "--lens", "tuned", "--lens-from", out, "--json")
    assert again.exit_code == 0, again.output
    reused = json.loads(again.stdout)
    assert "tuned_lens_training" not in reused  # loaded, not retrained
    assert reused["lenses"]["tuned"]["kl"] == pytest.approx(summary["lenses"]["tuned"]["kl"], rel=1e-6)
    assert reused["lenses"]["logit"] == summary["lenses"]["logit"]  # the logit baseline comes along

    # Extending the artifact with a logit-only run still reports its tuned lens side by side.
    extended = invoke("probe", tiny_llama_dir, "--data", text_file, *SMALL, "--out", out, "--json")
    assert extended.exit_code == 0, extended.output
    assert set(json.loads(extended.stdout)["lenses"]) == {"logit", "tuned"}
    assert "tuned_lens.weight" in Artifact.load(out).tensors["exits"]


def test_deterministic(tiny_llama_dir, text_file):
    first = json.loads(invoke("probe", tiny_llama_dir, "--data", text_file, *SMALL, "--json").stdout)
    second = json.loads(invoke("probe", tiny_llama_dir, "--data", text_file, *SMALL, "--json").stdout)
    assert first["lenses"] == second["lenses"]


def test_unknown_model():
    assert_one_line_error(invoke("probe", "./missing-model", "--json"), "does not exist")


def test_missing_data_file(tiny_llama_dir, tmp_path):
    assert_one_line_error(invoke("probe", tiny_llama_dir, "--data", tmp_path / "nope.jsonl"), "does not exist")


def test_empty_data(tiny_llama_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert_one_line_error(invoke("probe", tiny_llama_dir, "--data", empty))


def test_tokens_larger_than_data(tiny_llama_dir, text_file):
    assert_one_line_error(invoke("probe", tiny_llama_dir, "--data", text_file, "--tokens", "100000", "--seq-len", "16"), "--tokens")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--lens", "fancy"], "unknown lens fancy"),
        (["--tokens", "0"], "--tokens must be at least 1"),
        (["--seq-len", "1"], "--seq-len must be at least 2"),
        (["--lens-steps", "-1"], "--lens-steps"),
    ],
)
def test_out_of_range_options(tiny_llama_dir, text_file, args, fragment):
    assert_one_line_error(invoke("probe", tiny_llama_dir, "--data", text_file, *args), fragment)


def test_corrupt_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNINFER_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf at all")
    assert_one_line_error(invoke("probe", bad), "corrupt")


def test_unsupported_architecture(tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    OPTForCausalLM(
        OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2, word_embed_proj_dim=16)
    ).save_pretrained(tmp_path / "opt")
    assert_one_line_error(invoke("probe", tmp_path / "opt"), "unsupported architecture", "standard rotary layout")


def test_artifact_of_another_model_is_refused_and_kept(tiny_llama_dir, text_file, tmp_path):
    out = tmp_path / "art"
    assert invoke("probe", tiny_llama_dir, "--data", text_file, *SMALL, "--out", out).exit_code == 0
    manifest_before = (out / "dyninfer.json").read_bytes()
    other = save_tiny("llama", tmp_path / "other", seed=7)
    result = invoke("probe", other, "--data", text_file, *SMALL, "--out", out)
    assert_one_line_error(result, "made for model")
    assert (out / "dyninfer.json").read_bytes() == manifest_before  # nothing lost or half-written


def test_out_is_a_file(tiny_llama_dir, text_file, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    assert_one_line_error(invoke("probe", tiny_llama_dir, "--data", text_file, *SMALL, "--out", target), "is a file")


def test_python_dash_m_entry_point(tiny_llama_dir, text_file):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "dyninfer", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("dyninfer ")


def test_models_lists_the_tested_families_and_their_stages():
    result = invoke("models", "--json")
    assert result.exit_code == 0, result.output
    rows = {row["model_type"]: row for row in json.loads(result.stdout)["model_types"]}
    assert len(rows) >= 20 and rows["llama"]["prune"] == "yes" and rows["llama"]["export"] == "yes"
    assert rows["qwen3_moe"]["prune"].startswith("no: mixture-of-experts")
    assert rows["mamba"]["export"].startswith("no:")
    assert "phi3" in invoke("models").stdout


def test_a_model_whose_tokenizer_adds_bos_sees_it_in_every_window_and_prompt(tmp_path):
    from conftest import CALIBRATE_ARGS, random_text, tiny_model, word_tokenizer
    from tokenizers import processors

    tokenizer = word_tokenizer()
    bos = tokenizer.convert_tokens_to_ids("tok0")  # a word id the text never uses (random_text draws from tok0..39)
    tokenizer.bos_token = "tok0"
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="tok0 $A", special_tokens=[("tok0", bos)])
    tiny_model("llama").save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "text.txt").write_text(" ".join(w for w in random_text(20000).split() if w != "tok0"))
    base = [tmp_path / "model", "--data", tmp_path / "text.txt", "--out", tmp_path / "art", "--json"]
    probe = invoke("probe", *base, *SMALL)
    assert probe.exit_code == 0, probe.output
    assert json.loads(probe.stdout)["data"]["sequence_start"] == [bos]
    calibrate = invoke("calibrate", *base, *CALIBRATE_ARGS)
    assert calibrate.exit_code == 0, calibrate.output
    assert json.loads(calibrate.stdout)["data"]["sequence_start"] == [bos]
    prompts = Artifact.load(tmp_path / "art").tensors["generation"]["calibration.prompts"]
    assert (prompts[:, 0] == bos).all() and (prompts[:, 1:] != bos).all()  # every prompt starts as a sequence does


@pytest.mark.parametrize("rank, joined_before", [(0, False), (1, False), (1, True)])
def test_a_launched_command_joins_the_group_when_it_runs_and_leaves_after(monkeypatch, rank, joined_before):
    """Under torchrun (WORLD_SIZE > 1) a command joins the process group once its options parsed and leaves it when
    it ends; ranks other than 0 print nothing; a caller that joined the group itself (tests/ddp_commands.py) keeps it."""
    from dyninfer.cli import app as app_module
    from dyninfer.core import distributed

    events = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed, "current", lambda: distributed.World(rank, 2 if joined_before else 1))
    monkeypatch.setattr(distributed, "join", lambda: events.append("join") or distributed.World(rank, 2))
    monkeypatch.setattr(distributed, "leave", lambda: events.append("leave"))
    monkeypatch.setattr(app_module, "_silence", lambda: events.append("silence"))
    wrapped = app_module._in_launched_group(lambda value: events.append(f"run {value}") or value)
    assert wrapped(7) == 7
    if joined_before:
        assert events == ["run 7"]
    else:
        assert events == ["join", *(["silence"] if rank else []), "run 7", "leave"]
    monkeypatch.setenv("WORLD_SIZE", "1")  # no launcher: nothing is joined
    events.clear()
    assert wrapped(3) == 3 and events == ["run 3"]


def test_progress_lines_estimate_the_time_left_at_the_pace_so_far():
    from dyninfer.cli.output import time_left

    assert time_left(12.0, 0, 10) == ""  # nothing done yet: no pace to go by
    assert time_left(12.0, 3, 12) == ", 12 s elapsed, about 36 s left"
    assert time_left(90.0, 1, 2) == ", 1 min 30 s elapsed, about 1 min 30 s left"
    assert time_left(125.4, 5, 5) == ", 2 min 5 s"  # done: how long it took


def test_progress_log_clocks_a_task_from_the_end_of_the_work_before_it(monkeypatch, capsys):
    """Off a terminal: a task first reported with work already done started when the previous report was made,
    and a task whose words come back for the next target starts its clock again."""
    from dyninfer.cli import output

    clock = iter([0.0, 10.0, 40.0, 100.0, 130.0, 190.0])
    monkeypatch.setattr(output.time, "monotonic", lambda: next(clock))
    with output.progress_reporter() as report:  # the reporter reads the clock once (0 s)
        report("loading", 1, 1)  # 10 s: started at 0 s
        report("generating", 1, 2)  # 40 s: started at 10 s, 30 s a half
        report("generating", 2, 2)  # 100 s
        report("generating", 1, 2)  # 130 s: the next target, started at 100 s
        report("generating", 2, 2)  # 190 s
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "loading: 1/1, 10 s",
        "generating: 1/2, 30 s elapsed, about 30 s left",
        "generating: 2/2, 1 min 30 s",
        "generating: 1/2, 30 s elapsed, about 30 s left",
        "generating: 2/2, 1 min 30 s",
    ]


def test_paths_that_read_as_markup_or_emoji_codes_are_shown_as_typed(tmp_path, tiny_llama_dir):
    """Rich would turn `[bold]` into a style and `:a:` into an emoji: a model or data path is shown as the user typed it."""
    import shutil

    from conftest import random_text

    model = tmp_path / "m[bold]odel:a:"
    shutil.copytree(tiny_llama_dir, model)
    data = tmp_path / "d[red]ata:smile:.txt"
    data.write_text(random_text(3000))
    out = tmp_path / "o[i]ut"
    result = runner.invoke(app, ["probe", str(model), "--data", str(data), "--seq-len", "16", "--tokens", "64", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"Exit probe: {model} on {data}" in " ".join(result.stdout.split())
    assert f"wrote {out}" in result.stderr

"""`dyninfer steer extract|sweep|apply` on a tiny model, and the steered model in run, bench, calibrate and export."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CALIBRATE_ARGS, random_text, save_tiny
from test_steering import PROMPT, _word_examples
from typer.testing import CliRunner

from dyninfer.cli.app import app
from dyninfer.compressors.steering import Steering, hooked
from dyninfer.core.models import load_model
from dyninfer.runtime.loader import load_dynamic

# One xdist worker runs this module: its module fixture is built once.
pytestmark = pytest.mark.xdist_group("steer_cli")

runner = CliRunner()
QUICK = ["--examples", "12", "--heldout", "3", "--shots", "1", "--batch-size", "4"]


@pytest.fixture(scope="module")
def steer_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("steer")
    model = save_tiny("llama", root / "model")
    data = root / "chains.jsonl"
    data.write_text("\n".join(json.dumps(e.to_dict()) for e in _word_examples(20)) + "\n")
    artifact = root / "artifact"
    activation = runner.invoke(
        app,
        [
            "steer",
            "extract",
            str(model),
            "--data",
            str(data),
            "--method",
            "activation",
            "--layers",
            "1,2",
            *QUICK,
            "--out",
            str(artifact),
            "--json",
        ],
    )
    assert activation.exit_code == 0, activation.output
    valve = runner.invoke(
        app,
        [
            "steer",
            "extract",
            str(model),
            "--data",
            str(data),
            "--method",
            "valve",
            "--rank",
            "2",
            "--steps",
            "3",
            *QUICK,
            "--out",
            str(artifact),
            "--json",
        ],
    )
    assert valve.exit_code == 0, valve.output
    return model, data, artifact, json.loads(activation.stdout), json.loads(valve.stdout)


def test_extract_stores_both_directions_with_their_recipe(steer_setup):
    _, data, artifact, activation, valve = steer_setup
    assert activation["layers"] == [1, 2] and set(activation["norms"]) == {"1", "2"}
    assert valve["source"] == "lora" and valve["rank"] == 2 and valve["parameters"] == 21
    stage = json.loads((artifact / "dyninfer.json").read_text())["stages"]["steer"]
    assert set(stage["methods"]) == {"activation", "valve"}
    assert stage["methods"]["valve"]["split"] == {"data": str(data), "seed": 0, "examples": 12, "heldout": 3, "shots": 1}
    assert (artifact / "steering.safetensors").is_file()


def test_sweep_writes_a_report_and_records_it(steer_setup):
    _, _, artifact, _, _ = steer_setup
    result = runner.invoke(
        app, ["steer", "sweep", str(artifact), "--method", "activation", "--alphas", "-1,1", "--max-new-tokens", "4", "--json"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert [p["alpha"] for p in summary["points"]] == [-1.0, 0.0, 1.0] and summary["questions"] == 3
    assert (artifact / "steer" / "sweep-activation" / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stored = json.loads((artifact / "steer" / "sweep-activation" / "sweep.json").read_text())
    assert stored["spearman"] == summary["spearman"]
    stage = json.loads((artifact / "dyninfer.json").read_text())["stages"]["steer"]
    assert [p["alpha"] for p in stage["sweeps"]["activation"]["points"]] == [-1.0, 0.0, 1.0]
    table = runner.invoke(app, ["steer", "sweep", str(artifact), "--method", "valve", "--alphas", "0,1", "--max-new-tokens", "3"])
    assert table.exit_code == 0 and "Spearman" in table.output


@pytest.mark.slow
def test_applied_steering_is_baked_for_run_bench_calibrate_and_export(steer_setup, tmp_path):
    model, _, artifact, _, _ = steer_setup
    applied = runner.invoke(app, ["steer", "apply", str(artifact), "--method", "activation", "--alpha", "2", "--json"])
    assert applied.exit_code == 0, applied.output
    assert json.loads(applied.stdout)["control_vector"] == str(artifact / "control_vector.gguf")
    dyn = load_dynamic(str(artifact), require_policy=False)
    reference = load_model(str(model))
    steering = Steering.from_artifact(dyn.artifact).activation
    with torch.no_grad():
        with hooked(reference.layered, steering, 2.0):
            expected = reference.model(PROMPT).logits
        plain = reference.model(PROMPT).logits
        ours = dyn.loaded.model(PROMPT).logits
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)  # baked, no hooks on the loaded model
    assert not torch.allclose(ours, plain, atol=1e-3)
    bench = runner.invoke(app, ["bench", str(artifact), "--prompts", "1", "--prompt-tokens", "6", "--new-tokens", "3", "--json"])
    assert bench.exit_code == 0, bench.output
    assert any("steered" in n for n in json.loads(bench.stdout)["notes"])
    data = tmp_path / "text.txt"
    data.write_text(random_text(20000))
    calibrated = runner.invoke(app, ["calibrate", str(model), "--data", str(data), *CALIBRATE_ARGS, "--out", str(artifact)])
    assert calibrated.exit_code == 0, calibrated.output
    exported = runner.invoke(app, ["export", str(artifact), "--no-baseline", "--json"])
    assert exported.exit_code == 0, exported.output
    assert json.loads(exported.stdout)["verify_max_abs_diff"] < 1e-3  # against the steered torch model
    args = ["run", str(artifact), "tok3 tok9 tok4", "--raw", "-n", "8", "--mode", "full", "--json"]
    torch_run, onnx_run = runner.invoke(app, args), runner.invoke(app, args + ["--backend", "onnx"])
    assert torch_run.exit_code == 0 and onnx_run.exit_code == 0, onnx_run.output
    ids = [t["id"] for t in json.loads(torch_run.stdout)["tokens"]]
    assert ids == [t["id"] for t in json.loads(onnx_run.stdout)["tokens"]]
    prompt = reference.tokenizer("tok3 tok9 tok4", return_tensors="pt").input_ids
    with torch.no_grad(), hooked(reference.layered, steering, 2.0):
        hooked_ids = reference.model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert ids == hooked_ids[0, prompt.shape[1] :].tolist()
    again = runner.invoke(app, ["steer", "apply", str(artifact), "--method", "activation", "--alpha", "1", "--json"])
    assert again.exit_code == 0 and any("export" in n for n in json.loads(again.stdout)["notes"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["steer", "apply", "{artifact}", "--alpha", "nan"], "finite"),
        (["steer", "apply", "{artifact}", "--alpha", "1"], "pick one with --method"),
        (["steer", "sweep", "{artifact}", "--method", "valve", "--alphas", "0,x"], "comma-separated"),
        (["steer", "sweep", "{artifact}", "--method", "valve", "--alphas", "0"], "two different"),
        (["steer", "sweep", "{artifact}", "--method", "nope"], "must be one of"),
        (["steer", "sweep", "{missing}"], "does not exist"),
        (["steer", "extract", "{model}", "--data", "{empty}", "--out", "{new}"], "no examples"),
        (["steer", "extract", "{model}", "--layers", "7", "--data", "{data}", "--out", "{new}"], "--layers"),
        (["steer", "extract", "{model}", "--method", "valve", "--delta-from", "base", "--out", "{new}"], "go together"),
        (["steer", "extract", "{model}", "--shots", "5", "--examples", "3", "--out", "{new}"], "--shots"),
    ],
)
def test_bad_input_gets_one_line_errors_and_writes_nothing(steer_setup, tmp_path, args, message):
    model, data, artifact, _, _ = steer_setup
    (tmp_path / "empty.jsonl").write_text("\n")
    before = (artifact / "dyninfer.json").read_text()
    values = {
        "artifact": artifact,
        "missing": tmp_path / "missing",
        "model": model,
        "data": data,
        "empty": tmp_path / "empty.jsonl",
        "new": tmp_path / "new",
    }
    result = runner.invoke(app, [a.format(**values) for a in args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert [line.startswith("error:") for line in result.output.strip().splitlines()][-1:] == [True]
    assert sum(line.startswith("error:") for line in result.output.splitlines()) == 1
    assert (artifact / "dyninfer.json").read_text() == before and not (tmp_path / "new").exists()


def test_artifact_of_another_model_is_refused(steer_setup, tmp_path):
    _, _, artifact, _, _ = steer_setup
    other = save_tiny("llama", tmp_path / "other", seed=5)
    result = runner.invoke(app, ["steer", "sweep", str(artifact), "--method", "valve", "--model", str(other)])
    assert result.exit_code == 2 and "Traceback" not in result.output

"""`dyninfer run` and `dyninfer bench` on a calibrated tiny artifact."""

from __future__ import annotations

import json

import pytest
from conftest import CALIBRATE_ARGS, calibrate_tiny, save_tiny
from typer.testing import CliRunner

from dyninfer.cli.app import app

# One xdist worker runs this module: its module fixture is built once.
pytestmark = pytest.mark.xdist_group("run_bench")

runner = CliRunner()
CAL = CALIBRATE_ARGS


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    return calibrate_tiny(tmp_path_factory.mktemp("runbench"))


def test_run_json_records_each_tokens_exit(calibrated):
    _, _, artifact = calibrated
    result = runner.invoke(app, ["run", str(artifact), "tok1 tok2 tok3", "-n", "10", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert len(out["tokens"]) == 10
    assert all(1 <= t["exit_layer"] <= 3 for t in out["tokens"])
    assert out["mean_exit_layer"] == pytest.approx(sum(t["exit_layer"] for t in out["tokens"]) / 10)


def test_run_speculative_equals_full(calibrated):
    _, _, artifact = calibrated
    texts = {}
    for mode in ("full", "speculative"):
        result = runner.invoke(app, ["run", str(artifact), "tok4 tok5", "-n", "12", "--mode", mode, "--json"])
        assert result.exit_code == 0, result.output
        texts[mode] = [t["id"] for t in json.loads(result.stdout)["tokens"]]
    assert texts["speculative"] == texts["full"]


def test_run_table_output(calibrated):
    _, _, artifact = calibrated
    result = runner.invoke(app, ["run", str(artifact), "tok1", "-n", "5"])
    assert result.exit_code == 0 and "mean exit layer" in result.stdout and "exit layer:" in result.stdout


def test_bench_reports_every_mode_and_gates(calibrated):
    _, _, artifact = calibrated
    args = ["bench", str(artifact), "--prompts", "2", "--prompt-tokens", "8", "--new-tokens", "6", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    modes = {m["mode"]: m for m in out["modes"]}
    assert set(modes) == {"baseline (transformers)", "early-exit", "speculative", "full"}
    assert modes["speculative"]["consistency"] == 1.0 and modes["full"]["consistency"] == 1.0  # lossless paths
    assert modes["full"]["perplexity"] == pytest.approx(modes["baseline (transformers)"]["perplexity"], rel=1e-4)
    assert out["predicted_speedup"] > 0 and out["gates_failed"] == []
    failing = runner.invoke(app, args + ["--min-speedup", "1000"])
    assert failing.exit_code == 1 and "--min-speedup" in failing.stderr
    unreachable = runner.invoke(app, args + ["--min-consistency", "1.01"])  # consistency never exceeds 1
    assert unreachable.exit_code == 2 and "--min-consistency must be between 0 and 1" in unreachable.stderr
    recompute = runner.invoke(app, args + ["--kv-mode", "recompute"])
    assert recompute.exit_code == 0 and json.loads(recompute.stdout)["kv_mode"] == "recompute"
    assert runner.invoke(app, args + ["--kv-mode", "magic"]).exit_code == 2


def test_bench_uses_the_calibrations_held_out_prompts_and_shows_its_bound(calibrated):
    """Defaults: the calibration's prompt and continuation lengths, prompts from its held-out split, and the
    certified bound beside the early-exit consistency in the calibration's measure."""
    from dyninfer.core import stages
    from dyninfer.core.artifacts import Artifact
    from dyninfer.jobs.bench import BenchConfig, bench_prompts
    from dyninfer.runtime.loader import load_dynamic

    _, _, artifact = calibrated
    result = runner.invoke(app, ["bench", str(artifact), "--prompts", "3", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["new_tokens"] == 6 and out["prompt_tokens"] == 12  # CALIBRATE_ARGS' generation setting
    early = next(m for m in out["modes"] if m["mode"] == "early-exit")
    certified = out["certified"]
    assert certified["risk"] == "generation" and certified["measure"] == "tokens" and certified["bound"] == 0.6
    assert certified["measured"] == early["consistency"]
    # The prompts are held-out windows of the calibration's own split: none is a calibration prompt.
    _, prompts, _ = bench_prompts(BenchConfig(prompts=3), load_dynamic(str(artifact)))
    calibration_prompts = Artifact.load(artifact).tensors[stages.GENERATION_GROUP]["calibration.prompts"]
    assert not any((calibration_prompts == p).all(1).any() for p in prompts)
    rendered = runner.invoke(app, ["bench", str(artifact), "--prompts", "2"])
    assert "certified by calibrate (generation risk): tokens consistency >= 0.6" in rendered.stdout


def test_artifact_without_policy_and_for_another_model(calibrated, tmp_path):
    model, data, artifact = calibrated
    probe_only = tmp_path / "probe-only"
    assert (
        runner.invoke(
            app, ["probe", str(model), "--data", str(data), "--tokens", "32", "--seq-len", "16", "--out", str(probe_only)]
        ).exit_code
        == 0
    )
    result = runner.invoke(app, ["run", str(probe_only), "tok1"])
    assert result.exit_code == 2 and "run `dyninfer calibrate" in result.stderr
    other = save_tiny("llama", tmp_path / "other", seed=3)
    result = runner.invoke(app, ["bench", str(artifact), "--model", str(other)])
    assert result.exit_code == 2 and "made for model" in result.stderr


@pytest.mark.slow
def test_calibrate_with_lens_from_stores_the_lens(calibrated, tmp_path):
    model, data, _ = calibrated
    probed = tmp_path / "probed"
    assert (
        runner.invoke(
            app,
            [
                "probe",
                str(model),
                "--data",
                str(data),
                "--tokens",
                "32",
                "--seq-len",
                "32",
                "--lens",
                "tuned",
                "--lens-train-tokens",
                "512",
                "--lens-steps",
                "1",
                "--out",
                str(probed),
            ],
        ).exit_code
        == 0
    )
    out = tmp_path / "calibrated"
    args = [a for a in CAL if a not in ("--lens", "logit")]
    result = runner.invoke(
        app, ["calibrate", str(model), "--data", str(data), *args, "--lens", "tuned", "--lens-from", str(probed), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    from dyninfer.core.artifacts import Artifact

    assert "tuned_lens.weight" in Artifact.load(out).tensors["exits"]
    assert runner.invoke(app, ["run", str(out), "tok1", "-n", "4"]).exit_code == 0


def test_run_bad_inputs(calibrated):
    _, _, artifact = calibrated
    assert runner.invoke(app, ["run", str(artifact), "   "]).exit_code == 2
    assert runner.invoke(app, ["run", str(artifact), "x", "--mode", "turbo"]).exit_code == 2
    assert runner.invoke(app, ["run", "/no/such/artifact", "x"]).exit_code == 2
    assert runner.invoke(app, ["bench", str(artifact), "--new-tokens", "0"]).exit_code == 2

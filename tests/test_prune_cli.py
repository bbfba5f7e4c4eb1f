"""`dyninfer prune` end to end on a tiny llama: artifact, report, run/bench/calibrate/export with masks."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from conftest import CALIBRATE_ARGS, random_text, save_tiny
from typer.testing import CliRunner

from dyninfer.cli.app import app
from dyninfer.compressors.pruning import SparseMLP, pruned
from dyninfer.profilers.bench import greedy_generate
from dyninfer.runtime.loader import load_dynamic

# One xdist worker runs this module: its module fixture is built once.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("prune_cli")]

runner = CliRunner()
QUICK = [
    "--seq-len",
    "32",
    "--calibration-tokens",
    "1024",
    "--heldout-tokens",
    "512",
    "--prompts",
    "2",
    "--prompt-tokens",
    "8",
    "--new-tokens",
    "4",
]


@pytest.fixture(scope="module")
def pruned_artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune")
    model = save_tiny("llama", root / "model")
    data = root / "text.txt"
    data.write_text(random_text(20000))
    artifact = root / "artifact"
    result = runner.invoke(
        app, ["prune", str(model), "--data", str(data), "--sparsity", "0.5", "--sweep", "0.3", *QUICK, "--out", str(artifact), "--json"]
    )
    assert result.exit_code == 0, result.output
    return model, data, artifact, json.loads(result.stdout)


def test_prune_reports_quality_cost_and_speed_and_saves_the_masks(pruned_artifact):
    model, _, artifact, report = pruned_artifact
    assert [p["sparsity"] for p in report["points"]] == [0.3, 0.5]
    main = report["main"]
    assert abs(main["achieved_sparsity"] - 0.5) <= 0.02
    assert len(main["layer_sparsity"]) == 3
    # threshold method: gate and up stay dense, the down projection (a third of the MLP) skips rows
    assert main["flops_saved"] == pytest.approx(main["achieved_sparsity"] / 3, abs=1e-6)
    assert main["mlp_bytes_sparse"] < main["mlp_bytes_dense"]
    assert main["speed"]["backend"] == "cpu" and main["speed"]["mlp_sparse_ms"] > 0
    assert report["dense_perplexity"] > 1 and main["perplexity"] > 1 and 0 <= main["agreement"] <= 1
    masks = safetensors.torch.load_file(artifact / "masks.safetensors")
    assert masks["thresholds"].shape == (3,)
    stage = json.loads((artifact / "dyninfer.json").read_text())["stages"]["prune"]
    assert stage["plan"]["method"] == "threshold" and stage["plan"]["sparsity"] == 0.5
    assert (artifact / "prune" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((artifact / "prune" / "summary.json").read_text())["main"]["sparsity"] == 0.5


def test_run_and_bench_use_the_masks(pruned_artifact):
    _, _, artifact, _ = pruned_artifact
    result = runner.invoke(app, ["run", str(artifact), "tok3 tok9 tok4", "--raw", "-n", "6", "--mode", "full", "--json"])
    assert result.exit_code == 0, result.output
    tokens = [t["id"] for t in json.loads(result.stdout)["tokens"]]
    dyn = load_dynamic(str(artifact), require_policy=False)
    lm = dyn.loaded.layered
    assert all(isinstance(lm.mlp(i), SparseMLP) for i in range(lm.num_layers))
    prompt = dyn.loaded.tokenizer("tok3 tok9 tok4", return_tensors="pt").input_ids
    with pruned(lm, dyn.pruning, "masked"):  # the same masks, computed densely
        assert greedy_generate(lm.model, prompt, 6)[0].tolist() == tokens
    bench = runner.invoke(app, ["bench", str(artifact), "--prompts", "2", "--prompt-tokens", "8", "--new-tokens", "4", "--json"])
    assert bench.exit_code == 0, bench.output
    out = json.loads(bench.stdout)
    assert [m["mode"] for m in out["modes"]] == ["baseline (transformers)", "full"]
    assert out["gated_mode"] == "full" and any("full depth" in n for n in out["notes"])


def test_pruned_model_calibrates_and_exports(pruned_artifact, tmp_path):
    model, data, artifact, _ = pruned_artifact
    no_policy = runner.invoke(app, ["export", str(artifact)])
    assert no_policy.exit_code == 2 and "calibrate" in no_policy.output
    calibrated = runner.invoke(app, ["calibrate", str(model), "--data", str(data), *CALIBRATE_ARGS, "--out", str(artifact)])
    assert calibrated.exit_code == 0, calibrated.output
    stages = json.loads((artifact / "dyninfer.json").read_text())["stages"]
    assert {"prune", "calibrate"} <= set(stages)
    exported = runner.invoke(app, ["export", str(artifact), "--no-baseline", "--json"])
    assert exported.exit_code == 0, exported.output
    assert json.loads(exported.stdout)["verify_max_abs_diff"] < 1e-3  # against the torch model *with* masks
    args = ["run", str(artifact), "tok3 tok9 tok4", "--raw", "-n", "10", "--json"]
    torch_run, onnx_run = runner.invoke(app, args), runner.invoke(app, args + ["--backend", "onnx"])
    assert torch_run.exit_code == 0 and onnx_run.exit_code == 0, onnx_run.output
    ours, reference = json.loads(onnx_run.stdout)["tokens"], json.loads(torch_run.stdout)["tokens"]
    assert [t["id"] for t in ours] == [t["id"] for t in reference]


def test_predictor_method_reports_recall(pruned_artifact, tmp_path):
    model, data, _, _ = pruned_artifact
    result = runner.invoke(
        app,
        [
            "prune",
            str(model),
            "--data",
            str(data),
            "--method",
            "predictor",
            "--sparsity",
            "0.4",
            "--rank",
            "4",
            "--steps",
            "20",
            "--no-speed",
            *QUICK,
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    main = json.loads(result.stdout)["main"]
    assert len(main["recall"]) == 3 and 0 < main["mean_recall"] <= 1
    assert main["speed"] is None and main["plan"]["rank"] == 4


@pytest.mark.parametrize(
    "args,message",
    [
        (["--sparsity", "1.5"], "between 0 and 1"),
        (["--method", "magic"], "--method"),
        (["--sweep", "0.2,abc"], "--sweep"),
        (["--method", "predictor", "--input-sparsity", "0.2"], "--input-sparsity"),
        (["--sparse-backend", "gpu"], "--sparse-backend"),
        (["--rank", "0", "--method", "predictor"], "--rank"),
    ],
)
def test_bad_options_get_one_line_errors_and_write_nothing(pruned_artifact, tmp_path, args, message):
    model, data, _, _ = pruned_artifact
    out = tmp_path / "never"
    result = runner.invoke(app, ["prune", str(model), "--data", str(data), *args, "--out", str(out)])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_models_without_mlp_and_foreign_artifacts_are_refused(pruned_artifact, tmp_path):
    _, data, artifact, _ = pruned_artifact
    mamba = save_tiny("mamba", tmp_path / "mamba")
    result = runner.invoke(app, ["prune", str(mamba), "--data", str(data), *QUICK])
    assert result.exit_code == 2 and "no MLP" in result.output
    other = save_tiny("llama", tmp_path / "other", seed=7)
    before = (artifact / "masks.safetensors").read_bytes()
    result = runner.invoke(app, ["prune", str(other), "--data", str(data), *QUICK, "--out", str(artifact)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert (artifact / "masks.safetensors").read_bytes() == before


def test_torch_reference_backend_on_a_pruned_artifact(pruned_artifact):
    """Every sparse backend available here decodes the same tokens (reference vs numba)."""
    _, _, artifact, _ = pruned_artifact
    dyn = load_dynamic(str(artifact), require_policy=False)
    lm = dyn.loaded.layered
    prompt = torch.tensor([[5, 9, 4, 7]])
    outputs = []
    for backend in ("reference", "cpu"):
        with pruned(lm, dyn.pruning, backend):
            outputs.append(greedy_generate(lm.model, prompt, 8))
    assert torch.equal(outputs[0], outputs[1])

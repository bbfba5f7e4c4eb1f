"""`dyninfer export`, `run --backend onnx` and `bench --backend onnx` on a calibrated tiny artifact."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import calibrate_tiny, save_tiny, tree_state
from typer.testing import CliRunner

from dyninfer.cli.app import app
from dyninfer.core.errors import DyninferError
from dyninfer.exporters import onnx_export
from dyninfer.profilers.genai_row import MISSING_NOTE, local_genai_python
from dyninfer.runtime.package_format import PACKAGE_MANIFEST

# One xdist worker runs this module: its module fixture is built once.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("export_cli")]

runner = CliRunner()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model, data, artifact = calibrate_tiny(tmp_path_factory.mktemp("export"))
    stop_args = ["--prompt-tokens", "12", "--new-tokens", "8", "--fit-prompts", "8", "--prompts", "24", "--heldout-prompts", "4"]
    stopped = runner.invoke(
        app, ["stop", str(model), "--data", str(data), *stop_args, "--condition", "all", "--target", "0.7", "--out", str(artifact)]
    )
    assert stopped.exit_code == 0, stopped.output
    result = runner.invoke(app, ["export", str(artifact), "--json"])
    assert result.exit_code == 0, result.output
    return model, data, artifact, json.loads(result.stdout)


def test_export_writes_a_verified_package_with_baseline(exported):
    _, _, artifact, report = exported
    package = artifact / "onnx"
    assert report["path"] == str(package)
    manifest = json.loads((package / PACKAGE_MANIFEST).read_text())
    assert manifest["inputs"][2:5] == ["positions", "past_key_values.0.key", "past_key_values.0.value"]
    assert manifest["kv_layout"] == report["kv_layout"] == "buffer"
    assert manifest["outputs"][3:7] == ["stop_confidence", "next_token", "present.0.key", "present.0.value"]
    stop = json.loads((artifact / "dyninfer.json").read_text())["stages"]["stop"]["rules"]["completion"]["policy"]
    assert manifest["stop"] == {"completion": {"policy": stop}}  # the word tokenizer spells no number: no reasoning rule
    assert report["custom_nodes"]["ExitGate"] == len(report["exit_points"]) > 0
    assert report["verify_max_abs_diff"] < 1e-3
    for name in ("model.onnx", "model.onnx.data", "tokenizer.json", "config.json", "source-artifact.json"):
        assert (package / name).is_file()
    assert (package / "baseline" / "model.onnx").is_file()  # optimum's export of the plain model
    assert not [p for p in artifact.iterdir() if p.name.startswith(".onnx")]  # no temporary leftovers
    from dyninfer.core.artifact_paths import file_mode

    modes = {str(p.relative_to(package)): p.stat().st_mode & 0o777 for p in package.rglob("*") if p.is_file()}
    assert set(modes.values()) == {file_mode()}, modes  # model.onnx.data too (onnx writes it 0600)


def test_run_onnx_backend_equals_torch_backend(exported):
    _, _, artifact, _ = exported
    args = ["run", str(artifact), "tok3 tok9 tok4", "--raw", "-n", "12", "--json"]
    torch_run = runner.invoke(app, args)
    onnx_run = runner.invoke(app, args + ["--backend", "onnx"])
    assert torch_run.exit_code == 0 and onnx_run.exit_code == 0, onnx_run.output
    ours, reference = json.loads(onnx_run.stdout), json.loads(torch_run.stdout)
    assert [t["id"] for t in ours["tokens"]] == [t["id"] for t in reference["tokens"]]
    assert [t["exit_layer"] for t in ours["tokens"]] == [t["exit_layer"] for t in reference["tokens"]]
    assert ours["backend"] == "onnx"
    sampled = runner.invoke(app, args + ["--backend", "onnx", "--sample", "--seed", "3"])
    again = runner.invoke(app, args + ["--backend", "onnx", "--sample", "--seed", "3"])
    assert sampled.exit_code == 0 and json.loads(sampled.stdout)["tokens"] == json.loads(again.stdout)["tokens"]
    assert runner.invoke(app, args + ["--backend", "onnx", "--mode", "speculative"]).exit_code == 2
    assert runner.invoke(app, args + ["--backend", "tpu"]).exit_code == 2


def test_run_onnx_backend_obeys_the_stop_rule_as_torch_does(exported):
    _, _, artifact, _ = exported
    for prompt in ("tok3 tok9 tok4", "tok1 tok1 tok7 tok30", "tok12"):
        args = ["run", str(artifact), prompt, "--raw", "-n", "8", "--stop", "completion", "--json"]
        torch_run, onnx_run = runner.invoke(app, args), runner.invoke(app, args + ["--backend", "onnx"])
        assert torch_run.exit_code == 0 and onnx_run.exit_code == 0, onnx_run.output
        ours, reference = json.loads(onnx_run.stdout), json.loads(torch_run.stdout)
        assert [t["id"] for t in ours["tokens"]] == [t["id"] for t in reference["tokens"]]
        assert ours["stop"] == reference["stop"]
        assert any("certified on the full mode" in note for note in ours["notes"])  # run in early-exit: said so
    missing = runner.invoke(app, ["run", str(artifact), "tok3", "--raw", "--backend", "onnx", "--stop", "reasoning"])
    assert missing.exit_code == 2 and "no reasoning stop rule" in missing.output


def test_bench_onnx_backend_compares_with_optimum_in_one_run(exported):
    _, _, artifact, _ = exported
    args = ["bench", str(artifact), "--backend", "onnx", "--prompts", "2", "--prompt-tokens", "8", "--new-tokens", "6", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    modes = {m["mode"]: m for m in out["modes"]}
    assert list(modes) == ["transformers (original model)", "optimum fp32", "package early-exit", "package exits disabled"]
    assert out["speedup_reference"] == "optimum fp32" and modes["optimum fp32"]["speedup"] == 1.0
    for row in modes.values():  # every row against the reference, and the perplexity change against the original's
        assert abs(row["ratios"]["vs optimum fp32"] - row["tokens_per_s"] / modes["optimum fp32"]["tokens_per_s"]) < 1e-9
        original = modes["transformers (original model)"]["perplexity"]
        assert abs(row["perplexity_change"] - (row["perplexity"] / original - 1)) < 1e-9
    # fp32 graphs decode the original model's greedy tokens
    assert modes["package exits disabled"]["consistency"] == modes["optimum fp32"]["consistency"] == 1.0
    assert out["gated_mode"] == "package early-exit"
    if local_genai_python() is None:  # the user is told how to add onnxruntime-genai's export as a row
        assert MISSING_NOTE in out["notes"]
    for row in modes.values():  # the prefill and the decode apart, for every row
        assert row["prefill_ms"] > 0 and row["decode_tokens_per_s"] > 0
    # each row's memory comes from its own process; the package's imports no torch, optimum's and transformers' do
    memory = {name: row["memory"] for name, row in modes.items()}
    assert all(m["peak_rss_mib"] >= m["imports_rss_mib"] > 0 for m in memory.values())
    assert memory["package exits disabled"]["imports_rss_mib"] < memory["optimum fp32"]["imports_rss_mib"] - 50
    # so the package's whole peak is below optimum's imports alone (a peak inherited from this process would not be)
    assert memory["package exits disabled"]["peak_rss_mib"] < memory["optimum fp32"]["imports_rss_mib"]
    certified = out["certified"]  # the fp32 package was not certified itself: the bound is calibration's, and says so
    assert certified["computed_on"].startswith("the torch dynamic model") and certified["mode"] == "package early-exit"
    failing = runner.invoke(app, args + ["--min-speedup", "1000"])
    assert failing.exit_code == 1 and "--min-speedup" in failing.stderr and "against optimum fp32" in failing.stderr


@pytest.mark.parametrize("weights", ["int4", "int8"])
def test_a_quantized_package_decodes_as_the_baseline_quantized_alike(exported, tmp_path, weights):
    """With exits disabled, the package is the plain model: quantized by the same quantizer, it must decode the
    baseline's greedy tokens. Both graphs hold the same weights in the same MatMulNBits blocks and run the same
    kernels, so their logits differ only by the order of float sums (the fp32 package matches torch to ~1e-5);
    1e-3 on logits of a few units leaves room for that and none for a differently quantized weight."""
    import numpy as np
    import torch

    from dyninfer.exporters.baseline import load_optimum_baseline
    from dyninfer.runtime.onnx_decoder import OnnxDecoder

    _, _, artifact, full = exported
    out = tmp_path / weights
    result = runner.invoke(app, ["export", str(artifact), "--weights", weights, "--block-size", "16", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    manifest = json.loads((out / PACKAGE_MANIFEST).read_text())
    assert report["weights"] == manifest["weights"] and manifest["weights"]["format"] == weights
    assert manifest["weights"]["block_size"] == 16 and manifest["weights"]["quantized_matmuls"] > 0
    assert manifest["baseline_weights"]["quantized_matmuls"] > 0
    assert (out / "model.onnx.data").stat().st_size < (artifact / "onnx" / "model.onnx.data").stat().st_size
    assert report["verify_max_abs_diff"] < 1e-3 and report["quantized_max_abs_diff"] > report["verify_max_abs_diff"]
    prompt = torch.tensor([[3, 9, 4, 7, 1, 12]])
    package = OnnxDecoder(out, provider="cpu")
    ours = package.generate(prompt.numpy(), 8, mode="full", return_logits=True)
    baseline = load_optimum_baseline(out, "CPUExecutionProvider").model
    ids, past = prompt, None
    for step, logits in enumerate(ours.logits):
        reference = baseline(input_ids=ids, attention_mask=torch.ones(1, prompt.shape[1] + step), past_key_values=past, use_cache=True)
        expected = reference.logits[0, -1].numpy()
        assert np.abs(logits[0] - expected).max() < 1e-3, step
        assert int(ours.tokens[0, step]) == int(expected.argmax())
        ids, past = torch.tensor([[int(ours.tokens[0, step])]]), reference.past_key_values
    bench_args = ["--prompts", "2", "--prompt-tokens", "8", "--new-tokens", "6", "--no-memory", "--json"]
    bench = runner.invoke(app, ["bench", str(artifact), "--backend", "onnx", "--package", str(out), *bench_args])
    assert bench.exit_code == 0, bench.output
    report = json.loads(bench.stdout)
    modes = {m["mode"]: m for m in report["modes"]}
    assert list(modes)[:3] == ["transformers (original model)", "optimum fp32", f"optimum {weights}"]
    assert report["speedup_reference"] == f"optimum {weights}"
    # the same tokens as the same-precision baseline (above), so the same consistency with the original model
    assert modes["package exits disabled"]["consistency"] == modes[f"optimum {weights}"]["consistency"]
    assert modes["optimum fp32"]["consistency"] == 1.0
    assert all(m["memory"] is None for m in modes.values())  # --no-memory


def _sha256(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_certified_fp32_package_reproduces_calibration_on_torch(exported, tmp_path):
    """The fp32 package decodes as the torch dynamic model, so certifying it on its own ONNX Runtime continuations
    (the generation risk, as calibration's) must retrace calibration's test: the same consistency and p-value at
    every candidate, the same threshold."""
    _, _, artifact, _ = exported
    out = tmp_path / "certified"
    args = ["export", str(artifact), "--certify", "--certify-risk", "generation", "--no-baseline", "--out", str(out), "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    calibration = json.loads((artifact / "dyninfer.json").read_text())["stages"]["calibrate"]
    manifest = json.loads((out / PACKAGE_MANIFEST).read_text())
    certificate = manifest["certificate"]
    assert certificate == report["certificate"] and certificate["computed_on"] == "package"
    assert certificate["threshold"] == calibration["ltt"]["chosen"] == manifest["policy"]["threshold"] == report["threshold"]
    assert (certificate["target"], certificate["epsilon"], certificate["prompts"]) == (
        calibration["target"],
        calibration["epsilon"],
        calibration["ltt"]["n"],
    )
    base_model = json.loads((artifact / "dyninfer.json").read_text())["base_model"]
    assert certificate["original_model"]["content_hash"] == base_model["content_hash"]
    ours = [(p["consistency"], p["p_value"]) for p in certificate["curve"]]
    theirs = [(p["consistency"], p["p_value"]) for p in calibration["curve"]]
    assert len(ours) == len(theirs) > 2
    for (c, p), (c_ref, p_ref) in zip(ours, theirs):
        assert abs(c - c_ref) < 1e-9 and abs(p - p_ref) < 1e-9
    assert certificate["heldout"]["tokens"] == calibration["generated"]["tokens"]
    assert certificate["graph_sha256"] == {name: _sha256(out / name) for name in ("model.onnx", "model.onnx.data")}


def test_a_certified_quantized_package_measures_its_own_tokens(exported, tmp_path):
    """int4 weights change tokens: the generation certificate's exits-disabled point is the package's own full-depth
    consistency with the original model's continuations, recomputed here from the calibration prompts the artifact
    keeps, with the betting p-value of those shares."""
    import numpy as np

    from dyninfer.compressors.ltt import betting_p_value
    from dyninfer.core.artifacts import Artifact
    from dyninfer.runtime.onnx_decoder import OnnxDecoder

    _, _, artifact, _ = exported
    out = tmp_path / "int4"
    args = ["export", str(artifact), "--weights", "int4", "--block-size", "16", "--certify", "--certify-risk", "generation"]
    result = runner.invoke(app, [*args, "--no-baseline", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    certificate = json.loads((out / PACKAGE_MANIFEST).read_text())["certificate"]
    group = Artifact.load(artifact).tensors["generation"]
    prompts, reference = group["calibration.prompts"].numpy(), group["calibration.continuations"].numpy()
    package = OnnxDecoder(out, provider="cpu")
    tokens = np.stack([package.generate(p[None], reference.shape[1], mode="full").tokens[0] for p in prompts])
    shares = (tokens == reference).mean(axis=1)
    assert shares.mean() < 1.0  # the quantized graph does change tokens: the point measures something
    first = certificate["curve"][0]
    assert first["threshold"] is None and abs(first["consistency"] - shares.mean()) < 1e-9
    assert abs(first["p_value"] - betting_p_value(1 - shares, 1 - certificate["target"], certificate["epsilon"])) < 1e-12
    certified = first["p_value"] <= certificate["epsilon"]
    assert certificate["full_depth_certified"] == certified
    if not certified:  # nothing certified: the package ships never exiting, and says so
        assert certificate["threshold"] is None and "nothing certified" in certificate["statement"]
        run = package.generate(prompts[:1], 4)
        assert run.exit_layers == [package.num_layers] * 4


def test_a_package_certified_on_fidelity_measures_its_step_against_the_original_model(exported, tmp_path):
    """The default certificate: the int4 package's step, fed the original model's cached continuations, against the
    original model's distributions, recomputed here from the stored prompts with the package's own runtime and
    transformers' forward of the original model."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from dyninfer.compressors.ltt import betting_p_value, betting_prefix_p_value
    from dyninfer.core.artifacts import Artifact
    from dyninfer.runtime.decoding import teacher_forced
    from dyninfer.runtime.onnx_decoder import OnnxDecoder

    model, _, artifact, _ = exported
    out = tmp_path / "int4-fidelity"
    args = ["export", str(artifact), "--weights", "int4", "--block-size", "16", "--certify", "--target", "0.5", "--epsilon", "0.2"]
    result = runner.invoke(app, [*args, "--no-baseline", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    certificate = json.loads((out / PACKAGE_MANIFEST).read_text())["certificate"]
    assert certificate["risk"] == "fidelity" and certificate["measure"] == "top1"
    assert "top-1 token" in certificate["statement"] and "fed the original model's continuations" in certificate["statement"]
    group = Artifact.load(artifact).tensors["generation"]
    prompts, reference = group["calibration.prompts"].numpy(), group["calibration.continuations"].numpy()
    package, original = OnnxDecoder(out, provider="cpu"), AutoModelForCausalLM.from_pretrained(model).eval()
    disagree = []
    for prompt, continuation in zip(prompts, reference):
        ours = teacher_forced(package, prompt[None], continuation, None).logits
        with torch.no_grad():
            theirs = original(torch.from_numpy(np.concatenate([prompt, continuation]))[None]).logits[0, len(prompt) - 1 : -1]
        disagree.append((ours.argmax(-1) != theirs.argmax(-1).numpy()).mean())
    first = certificate["curve"][0]
    # the test stops reading prompts once its betting test is decided: the point covers the first `prompts` of them
    counted, disagree = first["prompts"], np.array(disagree)
    assert 0 < counted <= len(disagree)
    assert first["threshold"] is None and abs(first["same_top1"] - (1 - disagree[:counted].mean())) < 1e-9
    assert 0 < disagree.mean() < 0.5  # int4 moves some top-1 tokens, not most
    assert abs(first["p_values"][0] - betting_prefix_p_value(disagree[:counted], 0.5, 0.2, len(disagree))) < 1e-12
    # and it decided as the betting test over every prompt does
    assert certificate["full_depth_certified"] == (first["p_values"][0] <= 0.2) == (betting_p_value(disagree, 0.5, 0.2) <= 0.2)
    assert (
        set(certificate["fidelity"] or {}) >= {"same_top1", "mean_kl", "kl_p99", "perplexity_ratio"}
        or not certificate["full_depth_certified"]
    )


def test_weights_auto_ships_the_fastest_candidate_that_certifies(exported, tmp_path):
    """The candidates (int8, int4: the tiny model came from no GGUF) are timed and tested slowest first along one
    fixed sequence; the package holds the last one certified before the first failure, and it is the graph certified."""
    import numpy as np

    from dyninfer.certification.fidelity import decoder_logits, measure_fidelity
    from dyninfer.core.artifact_paths import file_sha256
    from dyninfer.core.artifacts import Artifact
    from dyninfer.core.layered import LayeredModel
    from dyninfer.runtime.onnx_decoder import OnnxDecoder

    model, _, artifact, _ = exported
    out = tmp_path / "auto"
    args = ["export", str(artifact), "--weights", "auto", "--block-size", "16", "--certify", "--target", "0.5", "--epsilon", "0.2"]
    result = runner.invoke(app, [*args, "--no-baseline", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / PACKAGE_MANIFEST).read_text())
    candidates = manifest["weights_candidates"]
    assert sorted(c["weights"] for c in candidates) == ["int4", "int8"]
    speeds = [c["decode_tokens_per_s"] for c in candidates]
    assert speeds == sorted(speeds) and speeds[0] > 0  # slowest first
    certificate = manifest["certificate"]
    curve = certificate["curve"]
    order = [c["weights"] for c in candidates]
    assert [p["weights"] for p in curve[: len(order)]] == order[: len(curve)]  # the path's order, as far as it went
    passed = [max(p["p_values"]) <= 0.2 for p in curve]
    chosen = passed.index(False) - 1 if False in passed else len(passed) - 1
    if chosen < 0:  # nothing certified: the most faithful candidate ships, uncertified
        assert certificate["weights"] == order[0] and not certificate["full_depth_certified"]
    else:
        assert certificate["weights"] == curve[chosen]["weights"] and certificate["threshold"] == curve[chosen]["threshold"]
    assert manifest["weights"]["format"] == certificate["weights"]
    assert not (out / "weight-candidates").exists()
    for name, digest in certificate["graph_sha256"].items():  # the graph certified is the graph shipped
        assert file_sha256(out / name) == digest
    # and it computes what the certificate measured for its candidate (teacher-forced on the calibration prompts)
    group = Artifact.load(artifact).tensors["generation"]
    prompts, reference = group["calibration.prompts"].numpy(), group["calibration.continuations"].numpy()
    from transformers import AutoModelForCausalLM

    lm = LayeredModel(AutoModelForCausalLM.from_pretrained(model).eval())
    point = next(p for p in curve if p["weights"] == certificate["weights"] and p["threshold"] is None)
    counted = point["prompts"]  # the prompts read before its test was decided
    run = measure_fidelity(decoder_logits(OnnxDecoder(out, provider="cpu")), lm, (prompts[:counted], reference[:counted]), None)
    assert abs(run.measures()["same_top1"] - point["same_top1"]) < 1e-9
    assert np.isfinite(point["mean_kl"])


def test_an_uncertified_package_says_its_bound_is_about_another_graph(exported, tmp_path):
    _, _, artifact, _ = exported
    out = tmp_path / "int8"
    result = runner.invoke(app, ["export", str(artifact), "--weights", "int8", "--no-baseline", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    certificate = json.loads((out / PACKAGE_MANIFEST).read_text())["certificate"]
    assert certificate["computed_on"].startswith("the torch dynamic model") and certificate["package_graph"] == "int8"
    assert "not on this package's graph (int8)" in certificate["statement"]
    assert any("certify" in note and "not on this package's graph" in note for note in json.loads(result.stdout)["notes"])
    run = runner.invoke(app, ["run", str(out), "tok3 tok9", "--raw", "-n", "3", "--backend", "onnx"])
    assert run.exit_code == 0 and "not on this package's graph" in run.output, run.output


def test_certify_needs_calibration_on_prompts(exported, tmp_path):
    from conftest import CALIBRATE_ARGS

    model, data, _, _ = exported
    simulated = tmp_path / "simulated"
    args = ["calibrate", str(model), "--data", str(data), *CALIBRATE_ARGS, "--risk", "teacher-forced-consistency", "--out", str(simulated)]
    assert runner.invoke(app, args).exit_code == 0
    result = runner.invoke(app, ["export", str(simulated), "--certify", "--no-baseline", "--out", str(tmp_path / "p")])
    assert result.exit_code == 2 and "--certify needs a calibration on prompts" in result.stderr
    assert "with the generation or fidelity risk" in result.stderr
    assert result.stderr.count("error:") == 1 and "Traceback" not in result.stderr and not (tmp_path / "p").exists()


def test_export_bad_inputs(exported, tmp_path):
    model, data, artifact, _ = exported
    probe_only = tmp_path / "probe-only"
    assert (
        runner.invoke(
            app, ["probe", str(model), "--data", str(data), "--tokens", "32", "--seq-len", "16", "--out", str(probe_only)]
        ).exit_code
        == 0
    )
    result = runner.invoke(app, ["export", str(probe_only)])
    assert result.exit_code == 2 and "calibrate" in result.stderr
    assert not (probe_only / "onnx").exists()
    other = save_tiny("llama", tmp_path / "other", seed=3)
    result = runner.invoke(app, ["export", str(artifact), "--model", str(other), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "made for model" in result.stderr and not (tmp_path / "x").exists()
    for options, message in (
        (["--provider", "tpu"], "--provider"),
        (["--dtype", "int3"], "--dtype"),
        (["--dtype", "fp16"], "fp16"),
        (["--kv-mode", "recompute"], "--kv-mode propagate"),
        (["--weights", "int3"], "--weights"),
        (["--weights", "int4", "--block-size", "48"], "--block-size"),
        (["--weights", "int4", "--block-size", "8"], "--block-size"),
        (["--block-size", "64"], "is for --weights int8 or int4"),
        (["--weights", "int4", "--accuracy-level", "5"], "--accuracy-level"),
        (["--accuracy-level", "1"], "is for --weights int8 or int4"),
        (["--target", "0.5"], "add --certify"),
        (["--certify", "--epsilon", "1.5"], "--epsilon"),
        (["--kv-layout", "paged"], "--kv-layout"),
    ):
        result = runner.invoke(app, ["export", str(artifact), "--out", str(tmp_path / "y"), *options])
        assert result.exit_code == 2 and message in result.stderr, result.output
        assert not (tmp_path / "y").exists()
    if onnx_export.provider_problem("cuda"):  # this machine has no usable CUDA
        result = runner.invoke(app, ["export", str(artifact), "--provider", "cuda", "--out", str(tmp_path / "z")])
        assert result.exit_code == 2 and "CUDAExecutionProvider" in result.stderr and not (tmp_path / "z").exists()
        # A real process, so that ONNX Runtime's native (file descriptor 2) logging is seen too.
        process = subprocess.run(
            [sys.executable, "-m", "dyninfer", "run", str(artifact), "tok1", "--backend", "onnx", "--provider", "cuda", "-n", "3"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert process.returncode == 0 and "fell back to CPUExecutionProvider" in process.stderr
        assert "onnxruntime" not in process.stderr.replace("CPUExecutionProvider", ""), process.stderr
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert runner.invoke(app, ["export", str(artifact), "--out", str(a_file)]).exit_code == 2
    assert runner.invoke(app, ["export", str(artifact), "--out", str(a_file / "sub")]).exit_code == 2
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    result = runner.invoke(app, ["export", str(artifact), "--out", str(busy)])
    assert result.exit_code == 2 and "non-empty" in result.stderr and (busy / "notes.txt").read_text() == "keep me"


def test_a_failed_export_leaves_the_previous_package_untouched(exported, monkeypatch):
    _, _, artifact, _ = exported
    package = artifact / "onnx"
    before = {p.name: p.stat().st_mtime_ns for p in package.iterdir()}

    def half_written(directory, *args, **kwargs):
        (directory / "model.onnx").write_bytes(b"partial")
        raise DyninferError("the ONNX exporter failed: simulated")

    monkeypatch.setattr(onnx_export, "write_package", half_written)
    result = runner.invoke(app, ["export", str(artifact)])
    assert result.exit_code == 2 and "simulated" in result.stderr
    assert {p.name: p.stat().st_mtime_ns for p in package.iterdir()} == before
    assert not [p for p in artifact.iterdir() if p.name.startswith(".onnx")]


def test_an_export_onto_a_full_disk_is_one_error_line_and_changes_nothing(exported, tmp_path):
    from test_faults import _fill, _small_filesystem

    _, _, artifact, _ = exported
    mount = _small_filesystem(tmp_path, "1m")
    try:
        _fill(mount, 100_000)  # less than the package needs
        before = tree_state(mount)
        result = runner.invoke(app, ["export", str(artifact), "--out", str(mount / "pkg"), "--no-baseline"])
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.exit_code == 2 and len(errors) == 1 and "No space left" in errors[0], result.output
        assert "Traceback" not in result.output and tree_state(mount) == before
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_damaged_or_missing_packages_get_clear_errors(exported, tmp_path):
    _, _, artifact, _ = exported
    import shutil

    copy = tmp_path / "package"
    shutil.copytree(artifact / "onnx", copy, ignore=shutil.ignore_patterns("baseline"))
    data = copy / "model.onnx.data"
    os.truncate(data, data.stat().st_size // 2)
    result = runner.invoke(app, ["run", str(copy), "tok1", "--backend", "onnx"])
    assert result.exit_code == 2 and "damaged or incomplete" in result.stderr
    manifest = json.loads((copy / PACKAGE_MANIFEST).read_text())
    (copy / PACKAGE_MANIFEST).write_text(json.dumps({**manifest, "kv_layout": "paged"}))
    result = runner.invoke(app, ["run", str(copy), "tok1", "--backend", "onnx"])
    assert result.exit_code == 2 and "`kv_layout` is 'paged'" in result.stderr
    (copy / PACKAGE_MANIFEST).write_text("{not json")
    result = runner.invoke(app, ["run", str(copy), "tok1", "--backend", "onnx"])
    assert result.exit_code == 2 and "damaged" in result.stderr
    result = runner.invoke(app, ["run", str(tmp_path), "tok1", "--backend", "onnx"])
    assert result.exit_code == 2 and "not a dyninfer ONNX package" in result.stderr

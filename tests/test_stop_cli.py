"""`dyninfer stop`, and `run`/`bench` obeying its rule, on tiny models; bad input gets one line and exit 2."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import char_tokenizer, random_text, save_tiny, tree_state
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from dyninfer.cli.app import app

runner = CliRunner()
COMPLETION_ARGS = ["--prompt-tokens", "12", "--new-tokens", "8", "--fit-prompts", "16", "--prompts", "48", "--heldout-prompts", "8"]
REASONING_ARGS = ["--workload", "reasoning", "--chain-tokens", "40", "--fit-prompts", "8", "--prompts", "24", "--heldout-prompts", "4"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def completion_artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("stop")
    model = save_tiny("llama", root / "model")
    data = root / "text.txt"
    data.write_text(random_text(6000))
    out = root / "artifact"
    result = invoke("stop", model, "--data", data, *COMPLETION_ARGS, "--target", "0.7", "--condition", "all", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    return model, data, out, json.loads(result.stdout)


@pytest.fixture(scope="module")
def char_model(tmp_path_factory):
    """A tiny llama with a character tokenizer: its chains have digits, full stops and newlines to probe at."""
    directory = tmp_path_factory.mktemp("char-model")
    tiny_model("llama", seed=4).save_pretrained(directory)
    char_tokenizer().save_pretrained(directory)
    return directory


def test_stop_certifies_a_completion_rule_and_records_it(completion_artifact):
    _, _, out, summary = completion_artifact
    policy = summary["policy"]
    assert policy["workload"] == "completion" and policy["signal"] in ("confidence", "prefix")
    cert = summary["certificate"]
    assert cert["ltt"]["n"] == 48  # condition all: every calibration prompt is a unit
    assert cert["ltt"]["lambdas"][0] is None  # the strictest candidate never stops
    assert "with probability >= 0.95" in summary["statement"]
    assert set(cert["heldout"]) >= {"tokens_saved", "value_kept", "precision_shown", "precision_without"}
    manifest = json.loads((out / "dyninfer.json").read_text())
    assert manifest["stages"]["stop"]["rules"]["completion"]["policy"] == policy
    assert (out / "stop-completion" / "curve.csv").is_file()
    assert {"commit", "command", "packages"} <= set(summary["provenance"]) and "torch" in summary["provenance"]["packages"]


def _shown_under_rule(model_dir, prompt: str, policy: dict, new_tokens: int) -> int:
    """Tokens a completion rule shows, from transformers' own greedy scores (independent of dyninfer's runtime)."""
    tokenizer, model = AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, output_scores=True, return_dict_in_generate=True)
    confidence = torch.stack([torch.softmax(s[0].float(), -1).max() for s in out.scores])
    score = confidence if policy["signal"] == "confidence" else torch.cumprod(confidence, 0)
    below = (score < policy["threshold"]).nonzero()
    return int(below[0]) if len(below) else new_tokens


def test_run_obeys_the_rule_and_shows_a_prefix_of_the_full_generation(completion_artifact):
    model, data, out, summary = completion_artifact
    assert summary["policy"]["threshold"] is not None
    for words in (12, 20):
        prompt = " ".join(data.read_text().split()[:words])
        full = json.loads(invoke("run", out, prompt, "--raw", "--mode", "full", "-n", "8", "--json").stdout)
        stopped = invoke("run", out, prompt, "--raw", "--mode", "full", "-n", "8", "--stop", "completion", "--json")
        assert stopped.exit_code == 0, stopped.output
        stopped = json.loads(stopped.stdout)
        shown = [t["id"] for t in stopped["tokens"]]
        assert shown == [t["id"] for t in full["tokens"]][: len(shown)]
        assert len(shown) == _shown_under_rule(model, prompt, summary["policy"], 8)
        assert stopped["stop"]["reason"] == ("rule" if len(shown) < 8 else "budget")


def test_bench_measures_the_rule_side_by_side_per_request(completion_artifact):
    _, _, out, certified = completion_artifact
    # a random model's completions have no value: the certified rule stops every held-out prompt at once
    assert certified["certificate"]["heldout"]["tokens_saved"] == 1.0
    result = invoke("bench", out, "--stop", "completion", "--prompts", "3", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    names = [r["name"] for r in summary["runners"]]
    assert names == ["full (no stop)", "full + stop"]
    assert summary["baseline"]["name"] == "baseline (transformers)"
    for r in summary["runners"]:
        assert r["seconds_per_request"] > 0 and r["request_speedup"] > 0
    assert {"commit", "command", "packages"} <= set(summary["provenance"])  # every measurement says what made it
    full, stopped = summary["runners"]
    assert full["tokens_per_request"] == 8 and full["ended"] == {"budget": 3}
    assert stopped["tokens_per_request"] == 0 and stopped["ended"] == {"rule": 3}


@pytest.mark.slow
def test_reasoning_rule_on_a_character_model_and_run_answers_with_it(char_model, tmp_path):
    out = tmp_path / "artifact"
    result = invoke("stop", char_model, *REASONING_ARGS, "--data", "builtin:arithmetic:1", "--condition", "all", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["policy"]["workload"] == "reasoning"
    # --probe-at auto: both probe sites (and both signals) were weighed on the fit problems
    assert summary["policy"]["probe_at"] in ("sentences", "lines")
    assert {f"{s} at {p} ends" for s in ("confidence", "stable") for p in ("sentence", "line")} == set(summary["fit"])
    assert summary["certificate"]["heldout_never"]["tokens_saved"] == 0  # a rule that never stops runs no probe
    run = invoke(
        "run", out, "Ada has 3 apples and gets 4 more. How many?", "--raw", "--mode", "full", "-n", "40", "--stop", "reasoning", "--json"
    )
    assert run.exit_code == 0, run.output
    assert json.loads(run.stdout)["stop"]["reason"] in ("answered", "budget", "end of sequence")


def _unchanged(path, before):
    return tree_state(path) == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["--target", "1.5"], "--target"),
        (["--target", "nan"], "--target"),
        (["--prompts", "0"], "--prompts"),
        (["--signal", "stable"], "--signal"),
        (["--workload", "reasoning", "--value-unit", "lines"], "is for --workload completion"),
        (["--chain-tokens", "10"], "--chain-tokens"),
        (["--probe-at", "lines"], "--probe-at"),
        (["--workload", "reasoning", "--probe-at", "words"], "--probe-at"),
        (["--prompts", "100000"], "--prompts"),
        (
            ["--prompt-tokens", "500", "--new-tokens", "64", "--fit-prompts", "1", "--prompts", "1", "--heldout-prompts", "1"],
            "beyond the model's 512",
        ),
    ],
)
def test_bad_stop_options_get_one_line_and_exit_2(completion_artifact, args, message):
    model, data, out, _ = completion_artifact
    before = tree_state(out)
    result = invoke("stop", model, "--data", data, *COMPLETION_ARGS, *args, "--out", out)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.output
    assert _unchanged(out, before)


def test_data_without_reference_continuations_is_refused(completion_artifact, tmp_path):
    model, _, _, _ = completion_artifact
    short = tmp_path / "short.txt"
    short.write_text(random_text(15))
    result = invoke("stop", model, "--data", short, *COMPLETION_ARGS, "--out", tmp_path / "a")
    assert result.exit_code == 2 and "error:" in result.output
    assert not (tmp_path / "a").exists()


def test_problems_without_answers_and_tokenizers_without_digits_are_refused(completion_artifact, tmp_path):
    model, _, _, _ = completion_artifact
    lines = tmp_path / "problems.jsonl"
    lines.write_text(json.dumps({"question": "How many?"}) + "\n")
    result = invoke("stop", model, "--workload", "reasoning", "--data", lines, "--out", tmp_path / "a")
    assert result.exit_code == 2 and "lacks answer" in result.output
    # the word tokenizer spells no number: no trial answer could be read
    result = invoke("stop", model, *REASONING_ARGS, "--data", "builtin:arithmetic:1", "--out", tmp_path / "b")
    assert result.exit_code == 2 and "spells a number" in result.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_rule_certified_on_another_model_state_is_refused(completion_artifact, tmp_path):
    _, data, out, _ = completion_artifact
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(out, copy)
    manifest = json.loads((copy / "dyninfer.json").read_text())
    manifest["stages"]["stop"]["rules"]["completion"]["policy"]["model_state"] = "0" * 16
    (copy / "dyninfer.json").write_text(json.dumps(manifest))
    prompt = " ".join(data.read_text().split()[:12])
    result = invoke("run", copy, prompt, "--raw", "--mode", "full", "--stop", "completion")
    assert result.exit_code == 2 and "certified on another model" in result.output
    manifest["stages"]["stop"]["rules"]["completion"]["policy"]["threshold"] = "high"
    (copy / "dyninfer.json").write_text(json.dumps(manifest))
    result = invoke("run", copy, prompt, "--raw", "--mode", "full", "--stop", "completion")
    assert result.exit_code == 2 and "stop rule's threshold is invalid" in result.output and "Traceback" not in result.output
    result = invoke("run", out, prompt, "--raw", "--mode", "full", "--stop", "reasoning")
    assert result.exit_code == 2 and "no reasoning stop rule" in result.output
    result = invoke("run", out, prompt, "--raw", "--mode", "speculative", "--stop", "completion")
    assert result.exit_code == 2 and "--stop" in result.output


def test_a_stop_rule_for_another_model_is_refused(completion_artifact, tmp_path):
    _, data, out, _ = completion_artifact
    other = save_tiny("llama", tmp_path / "other", seed=9)
    before = tree_state(out)
    result = invoke("stop", other, "--data", data, *COMPLETION_ARGS, "--out", out)
    assert result.exit_code == 2 and "error:" in result.output
    assert _unchanged(out, before)

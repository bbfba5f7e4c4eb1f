"""`dyninfer stop`, and `run`/`bench` obeying its rule, on tiny models; bad input gets one line and exit 2."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import answering_model, random_text, save_tiny, tree_state
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


def _greedy_scores(model_dir, prompt: str, new_tokens: int) -> torch.Tensor:
    """The max probability of each greedy token, from transformers' own generate (independent of dyninfer's runtime)."""
    tokenizer, model = AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, output_scores=True, return_dict_in_generate=True)
    return torch.stack([torch.softmax(s[0].float(), -1).max() for s in out.scores])


def _shown_under_rule(model_dir, prompt: str, policy: dict, new_tokens: int) -> int:
    """Tokens a completion rule shows: those before the first whose score is below the threshold."""
    confidence = _greedy_scores(model_dir, prompt, new_tokens)
    score = confidence if policy["signal"] == "confidence" else torch.cumprod(confidence, 0)
    below = (score < policy["threshold"]).nonzero()
    return int(below[0]) if len(below) else new_tokens


@pytest.fixture(scope="module")
def mid_completion_rule(completion_artifact, tmp_path_factory):
    """The certified artifact with its rule moved to a prefix threshold that stops both test prompts mid-completion
    (the certified one stops a random model before its first token, which would leave nothing to compare): this
    fixture is about obeying a rule, `test_stop_certifies_a_completion_rule_and_records_it` about certifying one."""
    import shutil

    model, data, out, _ = completion_artifact
    prompts = [" ".join(data.read_text().split()[:words]) for words in (12, 20)]
    prefix = [torch.cumprod(_greedy_scores(model, p, 8), 0) for p in prompts]
    low, high = max(float(s[5]) for s in prefix), min(float(s[0]) for s in prefix)
    assert low < high, "no prefix threshold stops both prompts between their first and seventh token"
    moved = tmp_path_factory.mktemp("mid-rule") / "artifact"
    shutil.copytree(out, moved)
    manifest = json.loads((moved / "dyninfer.json").read_text())
    policy = manifest["stages"]["stop"]["rules"]["completion"]["policy"]
    policy |= {"signal": "prefix", "threshold": (low * high) ** 0.5}
    (moved / "dyninfer.json").write_text(json.dumps(manifest))
    return model, prompts, moved, policy


def test_run_obeys_the_rule_and_shows_a_prefix_of_the_full_generation(mid_completion_rule):
    model, prompts, out, policy = mid_completion_rule
    for prompt in prompts:
        full = json.loads(invoke("run", out, prompt, "--raw", "--mode", "full", "-n", "8", "--json").stdout)
        stopped = invoke("run", out, prompt, "--raw", "--mode", "full", "-n", "8", "--stop", "completion", "--json")
        assert stopped.exit_code == 0, stopped.output
        stopped = json.loads(stopped.stdout)
        shown = [t["id"] for t in stopped["tokens"]]
        assert 1 <= len(shown) < 8  # the rule stops mid-completion: the comparison below has tokens on both sides
        assert shown == [t["id"] for t in full["tokens"]][: len(shown)]
        assert len(shown) == _shown_under_rule(model, prompt, policy, 8)
        assert stopped["stop"]["reason"] == "rule" and stopped["stop"]["spent"] == len(shown)


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


@pytest.fixture(scope="module")
def answering(tmp_path_factory):
    return answering_model(tmp_path_factory.mktemp("answering-model"))


@pytest.mark.slow
def test_reasoning_rule_on_a_character_model_and_run_answers_with_it(answering, tmp_path):
    """The certified rule of a model whose every probe answers: `run` answers at the probe the recorded chain says
    the rule fires at, showing the chain up to it, the forced continuation and the answer."""
    from dyninfer.compressors.stop_obey import ProbeVocabulary, ReasoningStopper
    from dyninfer.compressors.stop_simulate import Probe, ReasoningRun
    from dyninfer.core.layered import LayeredModel
    from dyninfer.core.policies import StopPolicy
    from dyninfer.runtime.dynamic import DynamicModel

    out = tmp_path / "artifact"
    # 24 calibration problems certify target 0.8 at epsilon 0.05 when nothing is lost (0.8^24 < 0.05; 0.95 needs 59)
    args = [*REASONING_ARGS, "--data", "builtin:arithmetic:1", "--condition", "all", "--target", "0.8"]
    result = invoke("stop", answering, *args, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    policy = summary["policy"]
    assert policy["workload"] == "reasoning" and policy["threshold"] is not None  # stopping at once loses no answer
    # --probe-at auto: both probe sites (and both signals) were weighed on the fit problems
    assert policy["probe_at"] in ("sentences", "lines")
    assert {f"{s} at {p} ends" for s in ("confidence", "stable") for p in ("sentence", "line")} == set(summary["fit"])
    assert summary["certificate"]["heldout_never"]["tokens_saved"] == 0  # a rule that never stops runs no probe
    # The question's full chain with every probe recorded, by the library's own loop, and where the rule fires on it.
    prompt = "Ada has 3 apples and gets 4 more. How many?"
    tokenizer = AutoTokenizer.from_pretrained(answering)
    vocabulary = ProbeVocabulary.from_tokenizer(tokenizer, policy["probe_suffix"])
    recorder = ReasoningStopper(StopPolicy.from_dict(policy | {"threshold": None}), vocabulary, record_only=True)
    model = DynamicModel(LayeredModel(AutoModelForCausalLM.from_pretrained(answering)), None, None)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    chain = model.generate(ids, 40, mode="full", eos_token_id=tokenizer.eos_token_id, stop=recorder).tokens[0].tolist()
    sites = vocabulary.sites(policy["probe_at"])
    probes = [(b, t) for b, t in recorder.probes if chain[b - 1] in sites]
    recorded = ReasoningRun(len(chain), None, 0.0, [Probe(b, t.value(vocabulary), t.confidence, t.cost) for b, t in probes])
    fires = [score >= policy["threshold"] for score in recorded.probe_scores(policy["signal"])]
    assert any(fires), "the rule never fires on this chain: the run below would prove nothing"
    boundary, trial = probes[fires.index(True)]
    run = invoke("run", out, prompt, "--raw", "--mode", "full", "-n", "40", "--stop", "reasoning", "--json")
    assert run.exit_code == 0, run.output
    shown = json.loads(run.stdout)
    assert shown["stop"]["reason"] == "answered" and shown["stop"]["probes"] == fires.index(True) + 1
    assert [t["id"] for t in shown["tokens"]] == chain[:boundary] + vocabulary.suffix + trial.ids
    assert tokenizer.decode(trial.ids).strip() == "7" and shown["stop"]["spent"] == recorded.stop(policy["signal"], policy["threshold"])[1]


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

"""A standing catalogue of bad inputs and faults: every case gets its exit code, one `error:` line (or
`interrupted`), no traceback, and leaves every file it could have touched byte-identical (a hash of the
whole tree before and after).

The cases are command lines a new user could type, on tiny local models; artifacts damaged the way
a hand edit or a broken copy damages them; and faults while a command saves: a full disk (a patched
`open`, a failing rename) and Ctrl-C at each rename of the swap. Library-level tests below check the
same save more finely (a signal during the swap, concurrent writers and readers).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import stat
import sys
from pathlib import Path

import pytest
import transformers as tf
from conftest import CALIBRATE_ARGS, random_text, save_tiny, tree_state, word_tokenizer
from typer.testing import CliRunner

from dyninfer.cli.app import app
from dyninfer.core import artifact_files, artifacts
from dyninfer.core.artifacts import Artifact
from dyninfer.core.errors import DyninferError

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from concurrent_saves import concurrent_saves, versioned_artifact

pytestmark = pytest.mark.xdist_group("bad_input")  # one worker builds the shared workspace once
runner = CliRunner()


def _edit_manifest(edit):
    def damage(artifact: Path) -> None:
        manifest = json.loads((artifact / "dyninfer.json").read_text())
        edit(manifest)
        (artifact / "dyninfer.json").write_text(json.dumps(manifest))

    return damage


def _policy(**changes):
    return _edit_manifest(lambda m: m["stages"]["calibrate"]["policy"].update(changes))


# Damage done to a copy of a calibrated artifact ({broken} in a case's arguments).
DAMAGE = {
    "manifest-not-json": lambda a: (a / "dyninfer.json").write_text("{ not json"),
    "manifest-not-utf8": lambda a: (a / "dyninfer.json").write_bytes(b"\xff\xfe\x00garbage"),
    "manifest-a-list": lambda a: (a / "dyninfer.json").write_text("[1, 2]"),
    "schema-too-new": _edit_manifest(lambda m: m.update(schema_version=99)),
    "schema-missing": _edit_manifest(lambda m: m.pop("schema_version")),
    "base-model-missing": _edit_manifest(lambda m: m.pop("base_model")),
    "base-model-field-missing": _edit_manifest(lambda m: m["base_model"].pop("num_layers")),
    "stages-a-list": _edit_manifest(lambda m: m.update(stages=[1])),
    "files-bad-name": _edit_manifest(lambda m: m["files"].update({"../escape.safetensors": "0" * 64})),
    "checksum-mismatch": lambda a: (a / "exits.safetensors").write_bytes((a / "exits.safetensors").read_bytes()[:-4] + b"\x00\x00\x00\x00"),
    "tensor-file-missing": lambda a: (a / "exits.safetensors").unlink(),
    "policy-missing-key": _edit_manifest(lambda m: m["stages"]["calibrate"]["policy"].pop("threshold")),
    "policy-a-string": _edit_manifest(lambda m: m["stages"]["calibrate"].update(policy="exit early")),
    "calibrate-without-policy": _edit_manifest(lambda m: m["stages"]["calibrate"].pop("policy")),
    "threshold-a-string": _policy(threshold="high"),
    "threshold-a-bool": _policy(threshold=True),
    "exit-points-out-of-range": _policy(exit_points=[99]),
    "exit-points-unsorted": _policy(exit_points=[2, 1]),
    "exit-points-not-ints": _policy(exit_points=["1"]),
    "measure-unknown": _policy(measure="vibes"),
    "lens-unknown": _policy(lens="fancy"),
    "kv-mode-unknown": _policy(kv_mode="teleport"),
    "vocab-top-k-negative": _policy(vocab_top_k=-3),
    "applied-steering-garbage": _edit_manifest(lambda m: m["stages"].update(steer={"applied": "yes please"})),
    "applied-steering-nan": _edit_manifest(
        lambda m: m["stages"].update(steer={"applied": {"method": "activation", "alpha": float("nan")}})
    ),
    "prune-plan-garbage": _edit_manifest(lambda m: m["stages"].update(prune={"plan": "half"})),
    "profile-cost-garbage": _edit_manifest(lambda m: m["stages"].update(profile={"measured_cost": {"layers": "x"}})),
    "tensor-file-links-outside": lambda a: _link_outside(a / "exits.safetensors"),
}


def _link_outside(path: Path) -> None:
    """The tensor file moved out of the artifact, a link left in its place (the checksum still matches)."""
    outside = path.parent.parent / f"outside-{path.parent.name}.safetensors"
    shutil.move(path, outside)
    path.symlink_to(outside)


CASES = [
    # --- models
    ("model-missing", ["probe", "./no-such-model"], "does not exist"),
    ("model-a-text-file", ["probe", "{file_txt}"], "not a .gguf model"),
    ("model-dir-without-config", ["probe", "{empty_dir}"], "without config.json"),
    ("model-corrupt-gguf", ["probe", "{corrupt_gguf}"], "corrupt"),
    ("model-hub-offline", ["probe", "no-org/no-such-model"], "not in the Hugging Face cache"),
    ("model-empty-spec", ["probe", " "], "empty model spec"),
    ("model-unsupported", ["probe", "{bloom}"], "unsupported architecture"),
    ("model-without-layers", ["probe", "{no_layers}", "--data", "{text}"], "no decoder layers"),
    ("model-without-tokenizer", ["probe", "{no_tokenizer}"], "tokenizer"),
    # --- data
    ("data-missing", ["probe", "{model}", "--data", "{tmp}/missing.txt"], "does not exist"),
    ("data-a-directory", ["probe", "{model}", "--data", "{empty_dir}"], "is a directory"),
    ("data-empty-file", ["probe", "{model}", "--data", "{empty_txt}"], "empty"),
    ("data-unknown-type", ["probe", "{model}", "--data", "{xyz}"], "unsupported type"),
    ("data-bad-jsonl", ["probe", "{model}", "--data", "{bad_jsonl}"], "not valid JSON"),
    ("data-jsonl-not-objects", ["probe", "{model}", "--data", "{list_jsonl}"], "not an object"),
    ("data-jsonl-no-field", ["probe", "{model}", "--data", "{good_jsonl}", "--field", "body"], "--field"),
    ("data-csv-no-column", ["probe", "{model}", "--data", "{csv}", "--field", "nope"], "no column 'nope'"),
    ("data-not-utf8", ["probe", "{model}", "--data", "{latin1}"], "not valid UTF-8"),
    ("data-hf-offline", ["probe", "{model}", "--data", "hf:no-org/no-dataset"], "could not load dataset"),
    ("data-unknown-builtin", ["probe", "{model}", "--data", "builtin:novels"], "unknown builtin corpus"),
    ("data-too-short", ["probe", "{model}", "--data", "{short_txt}"], "need at least 2 windows"),
    # --- inputs that do not fit each other
    ("model-config-more-layers-than-weights", ["probe", "{more_layers}", "--data", "{text}"], "do not fit its config.json"),
    ("model-tokenizer-larger-than-vocabulary", ["probe", "{small_vocab}", "--data", "{text}"], "tokenizer"),
    ("probe-seq-len-beyond-positions", ["probe", "{short_gpt2}", "--data", "{text}", "--seq-len", "64"], "beyond the model's 16 positions"),
    ("data-a-fifo", ["probe", "{model}", "--data", "{fifo}"], "not a regular file"),
    ("data-a-device", ["probe", "{model}", "--data", "/dev/zero"], "not a regular file"),
    ("seed-beyond-2-32", ["probe", "{model}", "--data", "{text}", "--seed", str(2**32)], "--seed must be an integer from 0"),
    ("seed-negative-onnx", ["run", "{art}", "--backend", "onnx", "--seed", "-1", "hello"], "--seed must be an integer from 0"),
    ("run-draft-layer-in-full-mode", ["run", "{art}", "--mode", "full", "--draft-layer", "2", "hello"], "--draft-layer does not apply"),
    ("run-kv-mode-on-onnx", ["run", "{art}", "--backend", "onnx", "--kv-mode", "recompute", "hello"], "--kv-mode does not apply"),
    ("run-temperature-greedy", ["run", "{art}", "--temperature", "0.3", "hello"], "--temperature does not apply"),
    ("bench-provider-on-torch", ["bench", "{art}", "--provider", "cpu"], "--provider does not apply"),
    (
        "calibrate-vocab-top-k-above-vocabulary",
        ["calibrate", "{model}", "--data", "{text}", *CALIBRATE_ARGS, "--vocab-top-k", "100000"],
        "more than the model's",
    ),
    (
        "prune-predictor-rank-above-hidden",
        ["prune", "{model}", "--data", "{text}", "--method", "predictor", "--rank", "100000000"],
        "more than the model's hidden size",
    ),
    ("steer-apply-alpha-overflows", ["steer", "apply", "{steered}", "--alpha", "1e39"], "past what float32 can square"),
    (
        "steer-valve-adapter-rank-0",
        ["steer", "extract", "{model}", "--method", "valve", "--delta-from", "base", "--delta-to", "{rank0_adapter}", "--out", "{tmp}/v"],
        "r = 0",
    ),
    (
        "tune-merge-out-is-out",
        ["tune-exits", "{model}", "--data", "{text}", "--out", "{tmp}/tuned", "--merge-out", "{tmp}/tuned"],
        "overlap",
    ),
    ("path-with-rich-markup", ["probe", "{tmp}/[/]odd[bold]name"], "[/]odd[bold]name"),
    ("path-with-emoji-code", ["probe", "{tmp}/:a:model:smile:"], ":a:model:smile:"),
    # --- probe options
    ("probe-tokens-0", ["probe", "{model}", "--data", "{text}", "--tokens", "0"], "--tokens must be at least 1"),
    ("probe-tokens-too-many", ["probe", "{model}", "--data", "{text}", "--tokens", "900000"], "lower --tokens"),
    ("probe-seq-len-1", ["probe", "{model}", "--seq-len", "1"], "--seq-len must be at least 2"),
    ("probe-batch-0", ["probe", "{model}", "--batch-size", "0"], "--batch-size must be at least 1"),
    ("probe-lens-unknown", ["probe", "{model}", "--lens", "fancy"], "unknown lens fancy"),
    ("probe-lens-steps-negative", ["probe", "{model}", "--lens-steps", "-1"], "--lens-steps"),
    ("probe-lens-train-tokens-0", ["probe", "{model}", "--lens-train-tokens", "0"], "--lens-train-tokens"),
    ("probe-lens-from-without-tuned", ["probe", "{model}", "--lens-from", "{art}"], "--lens-from only makes sense"),
    (
        "probe-lens-from-missing",
        ["probe", "{model}", "--data", "{text}", "--lens", "tuned", "--lens-from", "{tmp}/nowhere"],
        "does not exist",
    ),
    ("probe-lens-from-other-model", ["probe", "{other}", "--data", "{text}", "--lens", "tuned", "--lens-from", "{art}"], "made for model"),
    ("probe-out-a-file", ["probe", "{model}", "--out", "{file_txt}"], "is a file"),
    ("probe-out-foreign-dir", ["probe", "{model}", "--out", "{foreign}"], "not empty"),
    ("probe-out-under-a-file", ["probe", "{model}", "--out", "{file_txt}/sub"], "which is a file"),
    (
        "probe-out-other-models-artifact",
        ["probe", "{other}", "--data", "{text}", "--seq-len", "16", "--tokens", "64", "--out", "{art}"],
        "made for model",
    ),
    ("probe-tokens-not-a-number", ["probe", "{model}", "--tokens", "many"], "'--tokens'"),
    ("probe-unknown-option", ["probe", "{model}", "--bogus"], "No such option"),
    ("unknown-command", ["compress"], "No such command"),
    # --- calibrate options
    ("calibrate-target-0", ["calibrate", "{model}", "--target", "0"], "--target must be between 0 and 1"),
    ("calibrate-target-1", ["calibrate", "{model}", "--target", "1"], "--target must be between 0 and 1"),
    ("calibrate-target-nan", ["calibrate", "{model}", "--target", "nan"], "--target must be between 0 and 1"),
    ("calibrate-epsilon-0", ["calibrate", "{model}", "--epsilon", "0"], "--epsilon"),
    ("calibrate-epsilon-nan", ["calibrate", "{model}", "--epsilon", "nan"], "--epsilon"),
    ("calibrate-prompts-0", ["calibrate", "{model}", "--prompts", "0"], "--prompts must be at least 1"),
    ("calibrate-new-tokens-0", ["calibrate", "{model}", "--new-tokens", "0"], "--new-tokens must be at least 1"),
    ("calibrate-consistency-unknown", ["calibrate", "{model}", "--consistency", "bleu"], "--consistency must be one of"),
    ("calibrate-measure-unknown", ["calibrate", "{model}", "--measure", "vibes"], "--measure must be one of"),
    ("calibrate-risk-unknown", ["calibrate", "{model}", "--risk", "vibes"], "--risk must be one of"),
    ("calibrate-kv-mode-unknown", ["calibrate", "{model}", "--kv-mode", "teleport"], "--kv-mode must be one of"),
    ("calibrate-cost-unknown", ["calibrate", "{model}", "--cost", "vibes"], "--cost must be one of"),
    (
        "calibrate-cost-measured-without-profile",
        ["calibrate", "{model}", "--data", "{text}", *CALIBRATE_ARGS, "--cost", "measured"],
        "--cost measured needs a profile",
    ),
    ("calibrate-targets-not-numbers", ["calibrate", "{model}", "--targets", "0.9,x"], "comma-separated numbers"),
    ("calibrate-targets-out-of-range", ["calibrate", "{model}", "--targets", "1.5"], "--targets must be between"),
    ("calibrate-vocab-top-k-negative", ["calibrate", "{model}", "--vocab-top-k", "-1"], "--vocab-top-k"),
    ("calibrate-max-points-0", ["calibrate", "{model}", "--max-points", "0"], "--max-points"),
    (
        "calibrate-fit-tokens-too-many",
        [
            "calibrate",
            "{model}",
            "--data",
            "{text}",
            "--seq-len",
            "16",
            "--fit-tokens",
            "900000",
            "--prompt-tokens",
            "8",
            "--lens",
            "logit",
        ],
        "--fit-tokens and --prompts 128 prompts need",
    ),
    ("calibrate-prompts-longer-than-windows", ["calibrate", "{model}", "--seq-len", "16"], "--prompt-tokens 64 is longer"),
    ("calibrate-seq-len-1", ["calibrate", "{model}", "--seq-len", "1"], "--seq-len"),
    ("calibrate-out-a-file", ["calibrate", "{model}", "--out", "{file_txt}"], "is a file"),
    ("calibrate-out-foreign-dir", ["calibrate", "{model}", "--out", "{foreign}"], "not empty"),
    (
        "calibrate-into-broken-profile",
        ["calibrate", "{model}", "--data", "{text}", *CALIBRATE_ARGS, "--out", "{broken:profile-cost-garbage}"],
        "invalid measured cost",
    ),
    # --- prune options
    ("prune-sparsity-0", ["prune", "{model}", "--sparsity", "0"], "--sparsity must be between 0 and 1"),
    ("prune-sparsity-over-1", ["prune", "{model}", "--sparsity", "1.2"], "--sparsity must be between 0 and 1"),
    ("prune-sparsity-nan", ["prune", "{model}", "--sparsity", "nan"], "--sparsity"),
    ("prune-sweep-not-numbers", ["prune", "{model}", "--sweep", "0.5,x"], "comma-separated numbers"),
    ("prune-sweep-out-of-range", ["prune", "{model}", "--sweep", "1.5"], "--sweep"),
    ("prune-allocation-unknown", ["prune", "{model}", "--allocation", "random"], "--allocation must be one of"),
    ("prune-label-unknown", ["prune", "{model}", "--label", "vibes"], "--label must be one of"),
    ("prune-mass-out-of-range", ["prune", "{model}", "--label", "mass", "--mass", "1.5"], "--mass"),
    ("prune-input-sparsity-1", ["prune", "{model}", "--input-sparsity", "1"], "--input-sparsity must be in [0, 1)"),
    (
        "prune-input-sparsity-with-predictor",
        ["prune", "{model}", "--method", "predictor", "--input-sparsity", "0.3"],
        "--input-sparsity applies to --method threshold",
    ),
    ("prune-rank-0", ["prune", "{model}", "--rank", "0"], "--rank"),
    ("prune-steps-0", ["prune", "{model}", "--steps", "0"], "--steps"),
    ("prune-backend-unknown", ["prune", "{model}", "--sparse-backend", "gpu"], "--sparse-backend must be one of"),
    ("prune-method-unknown", ["prune", "{model}", "--method", "random"], "--method must be one of"),
    (
        "prune-recurrent-model",
        ["prune", "{mamba}", "--data", "{text}", "--seq-len", "16", "--calibration-tokens", "64", "--heldout-tokens", "64", "--no-speed"],
        "no MLP block",
    ),
    # --- profile options
    ("profile-device-unknown", ["profile", "{model}", "--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N"),
    ("profile-device-cuda-without-cuda", ["profile", "{model}", "--device", "cuda"], "sees no CUDA GPU"),
    # --device and --dtype on every command that loads a model (#17)
    *[
        (f"{cmd[0]}-device-cuda-without-cuda", [*cmd, "--device", "cuda:0"], "sees no CUDA GPU")
        for cmd in (
            ["probe", "{model}"],
            ["calibrate", "{model}"],
            ["prune", "{model}"],
            ["audit", "{model}"],
            ["run", "{art}", "hi"],
            ["bench", "{art}"],
            ["steer", "extract", "{model}", "--out", "{tmp}/steer"],
        )
    ],
    *[
        (f"{cmd[0]}-dtype-unknown", [*cmd, "--dtype", "float8"], "--dtype must be one of auto, float32, bfloat16")
        for cmd in (
            ["probe", "{model}"],
            ["calibrate", "{model}"],
            ["run", "{art}", "hi"],
            ["bench", "{art}"],
            ["profile", "{model}"],
            ["audit", "{model}"],
        )
    ],
    ("probe-device-misspelt", ["probe", "{model}", "--device", "gpu"], "--device must be auto, cpu, cuda or cuda:N"),
    ("probe-max-memory-cannot-hold", ["probe", "{model}", "--device-map", "auto", "--max-memory", "cpu=1KB"], "do not fit --max-memory"),
    ("probe-max-memory-gpu-without-cuda", ["probe", "{model}", "--device-map", "auto", "--max-memory", "0=1GB"], "names GPU 0"),
    (
        "probe-max-memory-all-on-disk",
        ["probe", "{model}", "--device-map", "auto", "--max-memory", "cpu=1KB,disk=1GB"],
        "leaves no device room",
    ),
    ("probe-max-memory-without-device-map", ["probe", "{model}", "--max-memory", "cpu=1GB"], "goes with --device-map"),
    (
        "prune-offloaded-model",
        ["prune", "{model}", "--data", "{text}", "--device-map", "auto", "--max-memory", "cpu=100KB,disk=1GB"],
        "offloads some of them",
    ),
    ("probe-memory-budget-0", ["probe", "{model}", "--memory-budget", "0"], "--memory-budget must be at least 1"),
    ("profile-repeats-2", ["profile", "{model}", "--repeats", "2"], "--repeats must be at least 3"),
    ("profile-context-0", ["profile", "{model}", "--context", "0"], "--context"),
    ("profile-energy-seconds-0", ["profile", "{model}", "--energy-seconds", "0"], "--energy-seconds must be positive"),
    ("profile-energy-seconds-nan", ["profile", "{model}", "--energy-seconds", "nan"], "--energy-seconds"),
    # --- run
    ("run-mode-unknown", ["run", "{art}", "tok1", "--mode", "turbo"], "--mode must be one of"),
    ("run-backend-unknown", ["run", "{art}", "tok1", "--backend", "tpu"], "--backend must be one of"),
    ("run-temperature-nan", ["run", "{art}", "tok1", "--sample", "--temperature", "nan"], "--temperature"),
    ("run-temperature-negative", ["run", "{art}", "tok1", "--temperature", "-1"], "--temperature must be positive"),
    ("run-temperature-0-sampling", ["run", "{art}", "tok1", "--sample", "--temperature", "0"], "--temperature"),
    ("run-max-new-tokens-0", ["run", "{art}", "tok1", "--max-new-tokens", "0"], "--max-new-tokens"),
    ("run-draft-threshold-nan", ["run", "{art}", "tok1", "--mode", "speculative", "--draft-threshold", "nan"], "--draft-threshold"),
    ("run-draft-layer-0", ["run", "{art}", "tok1", "--draft-layer", "0"], "--draft-layer"),
    (
        "run-draft-layer-too-deep",
        ["run", "{art}", "tok1", "--raw", "--mode", "speculative", "--draft-layer", "99"],
        "--draft-layer must be between 1 and",
    ),
    ("run-speculative-sampling", ["run", "{art}", "tok1", "--raw", "--mode", "speculative", "--sample"], "greedy"),
    ("run-onnx-speculative", ["run", "{art}", "tok1", "--backend", "onnx", "--mode", "speculative"], "the ONNX backend runs"),
    ("run-empty-prompt", ["run", "{art}", "   "], "the prompt is empty"),
    ("run-artifact-missing", ["run", "{tmp}/nowhere", "tok1"], "does not exist"),
    ("run-not-an-artifact", ["run", "{foreign}", "tok1"], "not a dyninfer artifact"),
    ("run-artifact-without-policy", ["run", "{probe_art}", "tok1"], "no early-exit policy"),
    ("run-with-another-model", ["run", "{art}", "tok1", "--model", "{other}"], "made for model"),
    ("run-kv-mode-unknown", ["run", "{art}", "tok1", "--kv-mode", "teleport"], "--kv-mode must be one of"),
    ("run-onnx-without-package", ["run", "{art}", "tok1", "--backend", "onnx"], "not a dyninfer ONNX package"),
    # --- bench
    ("bench-prompts-0", ["bench", "{art}", "--prompts", "0"], "--prompts must be at least 1"),
    ("bench-new-tokens-0", ["bench", "{art}", "--new-tokens", "0"], "--new-tokens"),
    ("bench-prompt-tokens-0", ["bench", "{art}", "--prompt-tokens", "0"], "--prompt-tokens"),
    ("bench-min-speedup-nan", ["bench", "{art}", "--min-speedup", "nan"], "--min-speedup must be positive"),
    ("bench-min-speedup-0", ["bench", "{art}", "--min-speedup", "0"], "--min-speedup must be positive"),
    ("bench-min-consistency-over-1", ["bench", "{art}", "--min-consistency", "1.5"], "--min-consistency"),
    ("bench-backend-unknown", ["bench", "{art}", "--backend", "tpu"], "--backend must be one of"),
    ("bench-draft-threshold-nan", ["bench", "{art}", "--draft-threshold", "nan"], "--draft-threshold"),
    ("bench-provider-unknown", ["bench", "{art}", "--provider", "tpu"], "--provider must be one of"),
    ("bench-too-many-prompts", ["bench", "{art}", "--prompts", "5000", "--prompt-tokens", "8"], "lower --prompts"),
    ("bench-onnx-without-package", ["bench", "{art}", "--backend", "onnx"], "no ONNX package at"),
    ("bench-genai-python-missing", ["bench", "{art}", "--backend", "onnx", "--genai-python", "{art}/no-python"], "--genai-python"),
    ("bench-genai-python-on-torch", ["bench", "{art}", "--genai-python", "/bin/sh"], "--genai-python does not apply"),
    ("bench-onnx-not-a-package", ["bench", "{art}", "--backend", "onnx", "--package", "{foreign}"], "not a dyninfer ONNX package"),
    # --- export
    ("export-provider-unknown", ["export", "{art}", "--provider", "tpu"], "--provider must be one of"),
    ("export-auto-without-certify", ["export", "{art}", "--weights", "auto"], "--weights auto picks the fastest weights"),
    ("export-dtype-unknown", ["export", "{art}", "--dtype", "fp64"], "--dtype must be one of"),
    ("export-fp16-on-cpu", ["export", "{art}", "--dtype", "fp16"], "fp16"),
    ("export-out-a-file", ["export", "{art}", "--out", "{file_txt}"], "is a file"),
    ("export-out-foreign-dir", ["export", "{art}", "--out", "{foreign}"], "not a dyninfer ONNX package"),
    ("export-without-policy", ["export", "{probe_art}", "--no-baseline"], "no early-exit policy"),
    ("export-not-an-artifact", ["export", "{foreign}", "--out", "{tmp}/pkg"], "not a dyninfer artifact"),
    # --- steer
    ("steer-extract-method-unknown", ["steer", "extract", "{model}", "--out", "{tmp}/new", "--method", "magic"], "--method must be one of"),
    ("steer-extract-kind-unknown", ["steer", "extract", "{model}", "--out", "{tmp}/new", "--kind", "median"], "--kind must be one of"),
    ("steer-extract-examples-1", ["steer", "extract", "{model}", "--out", "{tmp}/new", "--examples", "1"], "--examples must be at least 2"),
    ("steer-extract-shots-too-many", ["steer", "extract", "{model}", "--out", "{tmp}/new", "--shots", "5", "--examples", "3"], "--shots"),
    ("steer-extract-lr-0", ["steer", "extract", "{model}", "--out", "{tmp}/new", "--lr", "0"], "--lr"),
    ("steer-extract-lr-nan", ["steer", "extract", "{model}", "--out", "{tmp}/new", "--lr", "nan"], "--lr"),
    (
        "steer-extract-delta-alone",
        ["steer", "extract", "{model}", "--out", "{tmp}/new", "--method", "valve", "--delta-from", "base"],
        "go together",
    ),
    (
        "steer-extract-delta-activation",
        ["steer", "extract", "{model}", "--out", "{tmp}/new", "--delta-from", "base", "--delta-to", "base"],
        "CoT-Valve",
    ),
    (
        "steer-extract-layers-out-of-range",
        ["steer", "extract", "{model}", "--out", "{tmp}/new", "--layers", "99", "--examples", "4", "--heldout", "2"],
        "--layers must name decoder layers",
    ),
    (
        "steer-extract-layers-not-numbers",
        ["steer", "extract", "{model}", "--out", "{tmp}/new", "--layers", "1,x"],
        "comma-separated numbers",
    ),
    ("steer-extract-no-examples", ["steer", "extract", "{model}", "--out", "{tmp}/new", "--data", "{empty_jsonl}"], "no examples"),
    ("steer-extract-out-a-file", ["steer", "extract", "{model}", "--out", "{file_txt}"], "is a file"),
    ("steer-sweep-missing", ["steer", "sweep", "{tmp}/nowhere"], "does not exist"),
    ("steer-sweep-no-direction", ["steer", "sweep", "{art}"], "holds no steering direction"),
    ("steer-sweep-method-unknown", ["steer", "sweep", "{art}", "--method", "nope"], "--method must be one of"),
    ("steer-sweep-alphas-not-numbers", ["steer", "sweep", "{art}", "--alphas", "0,x"], "comma-separated numbers"),
    ("steer-sweep-alphas-nan", ["steer", "sweep", "{art}", "--alphas", "nan,1"], "--alphas must be finite"),
    ("steer-sweep-keep-0", ["steer", "sweep", "{art}", "--keep", "0"], "--keep"),
    ("steer-sweep-questions-0", ["steer", "sweep", "{art}", "--questions", "0"], "--questions"),
    ("steer-apply-alpha-nan", ["steer", "apply", "{art}", "--alpha", "nan"], "--alpha must be a finite number"),
    ("steer-apply-no-direction", ["steer", "apply", "{art}", "--alpha", "1"], "holds no steering direction"),
    ("steer-apply-missing", ["steer", "apply", "{tmp}/nowhere", "--alpha", "1"], "does not exist"),
    # --- audit
    (
        "audit-min-consistency-over-1",
        ["audit", "{model}", "--min-consistency", "1.5", "--out", "{tmp}/a"],
        "--min-consistency must be between 0 and 1",
    ),
    ("audit-min-speedup-nan", ["audit", "{model}", "--min-speedup", "nan", "--out", "{tmp}/a"], "--min-speedup"),
    ("audit-min-oracle-saving-negative", ["audit", "{model}", "--min-oracle-saving", "-0.1", "--out", "{tmp}/a"], "--min-oracle-saving"),
    ("audit-lens-unknown", ["audit", "{model}", "--lens", "fancy", "--out", "{tmp}/a"], "--lens must be one of"),
    ("audit-steer-unknown", ["audit", "{model}", "--steer", "magic", "--out", "{tmp}/a"], "--steer must be one of"),
    ("audit-repeats-1", ["audit", "{model}", "--repeats", "1", "--out", "{tmp}/a"], "--repeats must be at least 3"),
    ("audit-targets-not-numbers", ["audit", "{model}", "--targets", "x", "--out", "{tmp}/a"], "comma-separated"),
    ("audit-out-a-file", ["audit", "{model}", "--out", "{file_txt}"], "is a file"),
    ("audit-out-foreign-dir", ["audit", "{model}", "--out", "{foreign}"], "not empty"),
    (
        "audit-out-other-models-artifact",
        [
            "audit",
            "{other}",
            "--data",
            "{text}",
            "--seq-len",
            "16",
            "--tokens",
            "32",
            "--prompt-tokens",
            "8",
            "--lens",
            "logit",
            "--out",
            "{art}",
        ],
        "made for model",
    ),
    # --- tune-exits
    ("tune-steps-0", ["tune-exits", "{model}", "--steps", "0", "--out", "{tmp}/t"], "--steps must be at least 1"),
    ("tune-rank-0", ["tune-exits", "{model}", "--rank", "0", "--out", "{tmp}/t"], "--rank must be at least 1"),
    ("tune-lr-nan", ["tune-exits", "{model}", "--lr", "nan", "--out", "{tmp}/t"], "--lr"),
    ("tune-layer-dropout-1", ["tune-exits", "{model}", "--layer-dropout", "1", "--out", "{tmp}/t"], "--layer-dropout"),
    ("tune-kl-weight-negative", ["tune-exits", "{model}", "--kl-weight", "-1", "--out", "{tmp}/t"], "--kl-weight"),
    ("tune-curriculum-unknown", ["tune-exits", "{model}", "--curriculum", "random", "--out", "{tmp}/t"], "--curriculum must be one of"),
    (
        "tune-exit-layers-out-of-range",
        ["tune-exits", "{model}", "--data", "{text}", "--seq-len", "16", "--exit-layers", "3", "--out", "{tmp}/t"],
        "--exit-layers 3 is out of range",
    ),
    (
        "tune-exit-layers-0",
        ["tune-exits", "{model}", "--data", "{text}", "--seq-len", "16", "--exit-layers", "0", "--out", "{tmp}/t"],
        "--exit-layers 0 is out of range",
    ),
    (
        "tune-recurrent-model",
        ["tune-exits", "{mamba}", "--data", "{text}", "--seq-len", "16", "--heldout-tokens", "32", "--out", "{tmp}/t"],
        "does not apply to mamba",
    ),
    ("tune-into-a-calibrated-artifact", ["tune-exits", "{model}", "--data", "{text}", "--out", "{art}"], "made on the untuned model"),
    ("tune-into-a-tuned-artifact", ["tune-exits", "{model}", "--data", "{text}", "--out", "{tuned}"], "already tuned"),
    ("tune-merge-out-an-artifact", ["tune-exits", "{model}", "--merge-out", "{art}", "--out", "{tmp}/t"], "is a dyninfer artifact"),
    ("tune-out-missing", ["tune-exits", "{model}"], "--out"),
    ("tuned-artifact-with-another-model", ["run", "{tuned}", "tok1", "--model", "{other}"], "made for model"),
    (
        "probe-other-model-into-tuned",
        ["probe", "{other}", "--data", "{text}", "--seq-len", "16", "--tokens", "64", "--out", "{tuned}"],
        "made for model",
    ),
    # --- damaged artifacts
    *[
        (f"run-damaged-{name}", ["run", "{broken:" + name + "}", "tok1", "--raw", "-n", "2"], fragment)
        for name, fragment in [
            ("manifest-not-json", "is not valid JSON"),
            ("manifest-not-utf8", "not UTF-8"),
            ("manifest-a-list", "not a JSON object"),
            ("schema-too-new", "newer dyninfer"),
            ("schema-missing", "schema_version is missing"),
            ("base-model-missing", "base_model is missing"),
            ("base-model-field-missing", "missing field(s) num_layers"),
            ("stages-a-list", "stages must be"),
            ("files-bad-name", "not a valid tensor file name"),
            ("checksum-mismatch", "does not match its checksum"),
            ("tensor-file-missing", "is incomplete"),
            ("policy-missing-key", "(no threshold)"),
            ("policy-a-string", "policy is invalid (a str"),
            ("calibrate-without-policy", "without a policy"),
            ("threshold-a-string", "threshold 'high' is not a number"),
            ("threshold-a-bool", "threshold True"),
            ("exit-points-out-of-range", "exit_points [99] are not all between 1 and"),
            ("exit-points-unsorted", "ascending"),
            ("exit-points-not-ints", "ascending layer numbers"),
            ("measure-unknown", "measure 'vibes'"),
            ("lens-unknown", "lens 'fancy'"),
            ("kv-mode-unknown", "kv_mode 'teleport'"),
            ("vocab-top-k-negative", "vocab_top_k -3"),
            ("applied-steering-garbage", "applied steering is invalid"),
            ("applied-steering-nan", "applied steering is invalid"),
            ("prune-plan-garbage", "no valid plan"),
            ("tensor-file-links-outside", "a link to a file outside it"),
        ]
    ],
    ("bench-schema-too-new", ["bench", "{broken:schema-too-new}"], "newer dyninfer"),
    ("export-checksum-mismatch", ["export", "{broken:checksum-mismatch}"], "does not match its checksum"),
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Everything the cases read: tiny models, data files, artifacts, a foreign folder, a plain file."""
    root = tmp_path_factory.mktemp("bad-input")
    places = {"tmp": root}
    places["model"] = save_tiny("llama", root / "model")
    places["other"] = save_tiny("llama", root / "other", seed=3)
    places["mamba"] = save_tiny("mamba", root / "mamba")
    no_layers = tf.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=0, num_attention_heads=4, num_key_value_heads=2
    )
    tf.AutoModelForCausalLM.from_config(no_layers).save_pretrained(root / "no-layers")
    word_tokenizer().save_pretrained(root / "no-layers")
    places["no_layers"] = root / "no-layers"
    shutil.copytree(places["model"], root / "no-tokenizer", ignore=lambda d, names: [n for n in names if "tok" in n or "vocab" in n])
    places["no_tokenizer"] = root / "no-tokenizer"
    bloom = tf.BloomConfig(vocab_size=128, hidden_size=32, n_layer=2, n_head=4)
    tf.AutoModelForCausalLM.from_config(bloom).save_pretrained(root / "bloom")
    word_tokenizer().save_pretrained(root / "bloom")
    places["bloom"] = root / "bloom"
    files = {
        "text": random_text(20000),
        "file_txt": "just a file",
        "empty_txt": "",
        "short_txt": "tok1 tok2 tok3",
        "xyz": "text",
        "bad_jsonl": '{"text": "ok"}\n{broken\n',
        "list_jsonl": "[1, 2]\n",
        "good_jsonl": json.dumps({"text": random_text(50)}) + "\n",
        "csv": "text\n" + random_text(40) + "\n",
        "empty_jsonl": "\n",
    }
    suffixes = {
        "bad_jsonl": ".jsonl",
        "list_jsonl": ".jsonl",
        "good_jsonl": ".jsonl",
        "empty_jsonl": ".jsonl",
        "csv": ".csv",
        "xyz": ".xyz",
    }
    for name, text in files.items():
        places[name] = root / f"{name}{suffixes.get(name, '.txt')}"
        places[name].write_text(text)
    places["latin1"] = root / "latin1.txt"
    places["latin1"].write_bytes("café tok1".encode("latin-1"))
    places["corrupt_gguf"] = root / "broken.gguf"
    places["corrupt_gguf"].write_bytes(b"GGUF\x03\x00\x00\x00" + os.urandom(64))
    (root / "empty-dir").mkdir()
    places["empty_dir"] = root / "empty-dir"
    places["foreign"] = root / "foreign"
    places["foreign"].mkdir()
    (places["foreign"] / "thesis.tex").write_text("mine")
    more_layers = root / "more-layers"  # the config says 3 layers, the weights hold 2
    shutil.copytree(places["model"], more_layers)
    config = json.loads((more_layers / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (more_layers / "config.json").write_text(json.dumps(config))
    places["more_layers"] = more_layers
    small = tf.LlamaConfig(
        vocab_size=len(word_tokenizer()) - 8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    tf.AutoModelForCausalLM.from_config(small).save_pretrained(root / "small-vocab")
    word_tokenizer().save_pretrained(root / "small-vocab")
    places["small_vocab"] = root / "small-vocab"
    short = tf.GPT2Config(vocab_size=len(word_tokenizer()), n_embd=32, n_layer=2, n_head=4, n_positions=16)
    tf.AutoModelForCausalLM.from_config(short).save_pretrained(root / "short-gpt2")
    word_tokenizer().save_pretrained(root / "short-gpt2")
    places["short_gpt2"] = root / "short-gpt2"
    specials = tmp_path_factory.mktemp("specials")  # outside the tree the cases hash: a FIFO blocks a reader
    places["fifo"] = specials / "data.txt"
    os.mkfifo(places["fifo"])
    adapter = root / "rank0-adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 0, "lora_alpha": 8}))
    from safetensors.torch import save_file as save_tensors

    save_tensors({"x.lora_A.weight": __import__("torch").zeros(1, 32)}, str(adapter / "adapter_model.safetensors"))
    places["rank0_adapter"] = adapter
    places["art"] = root / "art"
    result = runner.invoke(
        app,
        [
            "calibrate",
            str(places["model"]),
            "--data",
            str(places["text"]),
            *CALIBRATE_ARGS,
            "--measure",
            "classifier",
            "--out",
            str(places["art"]),
        ],
    )  # a tensor file to damage
    assert result.exit_code == 0, result.output
    places["steered"] = root / "steered"  # an activation direction, and foreign entries a save carries over
    result = runner.invoke(
        app,
        ["steer", "extract", str(places["model"]), "--examples", "4", "--heldout", "2", "--layers", "1", "--out", str(places["steered"])],
    )
    assert result.exit_code == 0, result.output
    (places["steered"] / "probe").mkdir()
    (places["steered"] / "probe" / "layers.csv").write_text("mine")
    (places["steered"] / "report.md").write_text("# an audit")
    places["tuned"] = root / "tuned"
    result = runner.invoke(
        app,
        [
            "tune-exits",
            str(places["model"]),
            "--data",
            str(places["text"]),
            "--seq-len",
            "16",
            "--steps",
            "2",
            "--heldout-tokens",
            "32",
            "--out",
            str(places["tuned"]),
        ],
    )
    assert result.exit_code == 0, result.output
    places["probe_art"] = root / "probe-art"
    result = runner.invoke(
        app,
        [
            "probe",
            str(places["model"]),
            "--data",
            str(places["text"]),
            "--seq-len",
            "16",
            "--tokens",
            "64",
            "--out",
            str(places["probe_art"]),
        ],
    )
    assert result.exit_code == 0, result.output
    return places


def test_the_catalogue_is_large():
    assert len(CASES) >= 100 and len({name for name, _, _ in CASES}) == len(CASES)


@pytest.mark.parametrize("args, fragment", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_is_one_error_line_and_changes_nothing(workspace, tmp_path, monkeypatch, args, fragment):
    monkeypatch.setenv("DYNINFER_CACHE", str(tmp_path / "cache"))  # a conversion attempt may use it
    places = {name: str(path) for name, path in workspace.items()}
    command = []
    for arg in args:
        if arg.startswith("{broken:"):  # a damaged copy of the calibrated artifact, in this case's own folder
            copy = tmp_path / arg[len("{broken:") : -1]
            shutil.copytree(workspace["art"], copy)
            DAMAGE[copy.name](copy)
            command.append(str(copy))
        else:
            command.append(arg.format(**places))
    before = tree_state(workspace["tmp"]), tree_state(tmp_path)
    result = runner.invoke(app, command)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert result.exit_code == 2, result.output
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr  # progress lines may come before it
    assert fragment in errors[0], errors[0]
    assert "Traceback" not in result.output and result.stdout == ""
    after = tree_state(workspace["tmp"]), tree_state(tmp_path)
    assert after[0] == before[0], "the workspace changed"
    assert {k: v for k, v in after[1].items() if not k.startswith("cache")} == {
        k: v for k, v in before[1].items() if not k.startswith("cache")
    }


def test_ctrl_c_while_starting_up_is_one_line_and_exit_130(tmp_path):
    """A Ctrl-C while the command's modules still import: no traceback. The entry point runs in a fresh interpreter
    whose import of the CLI app is held until the interrupt arrives, so the test does not depend on start-up being
    slow (it takes about a second now)."""
    import subprocess

    held_import = """
import sys, time
class HoldAppImport:
    def find_spec(self, name, path=None, target=None):
        if name == "dyninfer.cli.app":
            print("importing", flush=True)
            time.sleep(60)
        return None
sys.meta_path.insert(0, HoldAppImport())
sys.argv = ["dyninfer", "--version"]
from dyninfer.cli import main
main()
"""
    process = subprocess.Popen([sys.executable, "-c", held_import], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    assert process.stdout.readline().strip() == "importing"
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, (stdout, stderr)
    assert stderr.strip() == "interrupted" and "Traceback" not in stderr


# --------------------------------------------------------------------------- faults while a command saves

APPLY_RENAMES = 4  # `steer apply` on the steered artifact: probe/ and report.md carried, old aside, new in


def _apply_copy(workspace, tmp_path) -> Path:
    copy = tmp_path / "steered"
    shutil.copytree(workspace["steered"], copy)
    return copy


def _failing_rename(monkeypatch, failing: int, fault: BaseException) -> list:
    real, calls = os.rename, []

    def rename(source, destination):
        calls.append(source)
        if len(calls) == failing:
            raise fault
        return real(source, destination)

    monkeypatch.setattr(os, "rename", rename)
    return calls


def test_steer_apply_saves_with_the_renames_the_fault_cases_cover(workspace, tmp_path, monkeypatch):
    copy = _apply_copy(workspace, tmp_path)
    calls = _failing_rename(monkeypatch, 0, RuntimeError("unused"))
    result = runner.invoke(app, ["steer", "apply", str(copy), "--alpha", "0.5"])
    assert result.exit_code == 0, result.output
    assert len(calls) == APPLY_RENAMES
    assert (copy / "control_vector.gguf").is_file() and (copy / "probe" / "layers.csv").read_text() == "mine"


FAULTS = [
    *[(f"ctrl-c-at-rename-{n}", "rename", n, KeyboardInterrupt(), 130, "interrupted") for n in range(1, APPLY_RENAMES + 1)],
    *[
        (f"full-disk-at-rename-{n}", "rename", n, OSError(errno.ENOSPC, "No space left on device"), 2, "No space left on device")
        for n in range(1, APPLY_RENAMES + 1)
    ],
    ("full-disk-writing-the-manifest", "open", 0, OSError(errno.ENOSPC, "No space left on device"), 2, "No space left on device"),
]


@pytest.mark.parametrize("where, failing, fault, code, fragment", [f[1:] for f in FAULTS], ids=[f[0] for f in FAULTS])
def test_a_fault_while_saving_changes_nothing(workspace, tmp_path, monkeypatch, where, failing, fault, code, fragment):
    copy = _apply_copy(workspace, tmp_path)
    before = tree_state(tmp_path)
    if where == "rename":
        _failing_rename(monkeypatch, failing, fault)
    else:  # the first file the save opens for writing: a patched `open` in the artifact module
        monkeypatch.setattr(artifact_files, "open", lambda *args, **kwargs: (_ for _ in ()).throw(fault), raising=False)
    result = runner.invoke(app, ["steer", "apply", str(copy), "--alpha", "0.5"])
    monkeypatch.undo()
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == code, result.output
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in result.output, result.stderr
    assert lines[0].startswith("error:") == (code == 2)
    assert tree_state(tmp_path) == before


# --------------------------------------------------------------------------- the save itself, in the library


def _reports(version: int) -> dict:
    return {"calibrate": {"summary.json": f'{{"version": {version}}}'.encode()}, "steer/sweep-valve": {"sweep.json": f"{version}".encode()}}


@pytest.fixture
def existing(tmp_path) -> Path:
    """An artifact at version 1 with report folders and the user's own files beside them."""
    path = tmp_path / "art"
    versioned_artifact(1).save(path, reports=_reports(1))
    (path / "probe").mkdir()
    (path / "probe" / "layers.csv").write_text("mine")
    (path / "report.md").write_text("# an audit")
    (path / "steer" / "sweep-activation").mkdir()
    (path / "steer" / "sweep-activation" / "sweep.json").write_text("activation")
    return path


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".bak-" in p.name)


def test_a_save_replaces_reports_keeps_foreign_files_and_uses_the_users_file_mode(existing):
    os.chmod(existing / "exits.safetensors", 0o600)  # as safetensors wrote it before
    versioned_artifact(2).save(existing, reports=_reports(2))
    assert Artifact.load(existing).stages["calibrate"] == {"version": 2}
    assert (existing / "calibrate" / "summary.json").read_text() == '{"version": 2}'
    assert (existing / "steer" / "sweep-valve" / "sweep.json").read_text() == "2"
    assert (existing / "steer" / "sweep-activation" / "sweep.json").read_text() == "activation"  # a sibling stays
    assert (existing / "probe" / "layers.csv").read_text() == "mine" and (existing / "report.md").is_file()
    umask = os.umask(0)
    os.umask(umask)
    for name in ("exits.safetensors", "dyninfer.json", "calibrate/summary.json"):
        assert stat.S_IMODE((existing / name).stat().st_mode) == 0o666 & ~umask, name
    assert _leftovers(existing.parent) == []


def _renames_of_one_save(existing: Path, monkeypatch) -> int:
    calls = []
    real = os.rename
    monkeypatch.setattr(os, "rename", lambda a, b: (calls.append(a), real(a, b))[1])
    versioned_artifact(2).save(existing, reports=_reports(2))
    monkeypatch.setattr(os, "rename", real)
    return len(calls)


@pytest.mark.parametrize("fault", [KeyboardInterrupt, lambda: OSError(errno.ENOSPC, "No space left on device")], ids=["ctrl-c", "enospc"])
def test_a_fault_at_each_rename_of_the_swap_leaves_the_artifact_as_it_was(existing, tmp_path, monkeypatch, fault):
    # Count the renames of a full save on a twin of `existing`, then fail each one in turn.
    twin = tmp_path / "twin"
    versioned_artifact(1).save(twin, reports=_reports(1))
    for name in ("probe", "report.md"):
        source = existing / name
        (twin / name).mkdir() if source.is_dir() else (twin / name).write_text("x")
    renames = _renames_of_one_save(twin, monkeypatch)
    assert renames >= 4  # carried entries, the old directory aside, the new one in
    before = tree_state(existing)
    real = os.rename
    for failing in range(renames):
        count = {"n": 0}

        def rename(a, b, failing=failing, count=count):
            count["n"] += 1
            if count["n"] == failing + 1:
                raise fault()
            return real(a, b)

        monkeypatch.setattr(os, "rename", rename)
        with pytest.raises((KeyboardInterrupt, DyninferError)):
            versioned_artifact(2).save(existing, reports=_reports(2))
        monkeypatch.setattr(os, "rename", real)
        assert tree_state(existing) == before, f"rename {failing + 1} of {renames}"
        assert _leftovers(existing.parent) == []


def test_a_full_disk_while_writing_a_report_changes_nothing(existing, monkeypatch):
    before = tree_state(existing)
    real = artifacts.write_file

    def full(path, data):
        if path.name == "summary.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(artifacts, "write_file", full)
    with pytest.raises(DyninferError, match=r"No space left on device.*nothing was changed"):
        versioned_artifact(2).save(existing, reports=_reports(2))
    assert tree_state(existing) == before and _leftovers(existing.parent) == []


# The save under a mid-swap SIGINT, in a fresh interpreter: signal delivery depends on process-wide state
# (handlers, which thread runs the test) that earlier tests in a long-lived xdist worker can change.
_CTRL_C_DURING_SWAP = """
import os, signal, sys
# Ctrl-C as in a terminal: a shell's background job (`make test &`) starts with SIGINT ignored, and the
# held interrupt would then be re-raised into that ignore.
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, sys.argv[2])
from concurrent_saves import versioned_artifact
real, sent = os.rename, []
def rename(a, b):
    if not sent:
        sent.append(True)
        os.kill(os.getpid(), signal.SIGINT)
    return real(a, b)
os.rename = rename
reports = {"calibrate": {"summary.json": b'{"version": 2}'}, "steer/sweep-valve": {"sweep.json": b"2"}}
try:
    versioned_artifact(2).save(sys.argv[1], reports=reports)
except KeyboardInterrupt:
    sys.exit(130)
sys.exit(0)
"""


def test_ctrl_c_during_the_swap_lands_after_it(existing):
    """A SIGINT that arrives mid-swap is held: the new version lands whole, then the interrupt is raised."""
    import subprocess

    benchmarks = Path(__file__).parents[1] / "benchmarks"
    done = subprocess.run([sys.executable, "-c", _CTRL_C_DURING_SWAP, str(existing), str(benchmarks)], capture_output=True, text=True)
    assert done.returncode == 130, done.stderr[-2000:]  # the interrupt was raised, after the swap
    assert Artifact.load(existing).stages["calibrate"] == {"version": 2}
    assert (existing / "calibrate" / "summary.json").read_text() == '{"version": 2}'
    assert (existing / "probe" / "layers.csv").read_text() == "mine"


def test_concurrent_writers_queue_and_lose_no_file(existing):
    errors = concurrent_saves(existing, writers=3, saves=8, readers=1)
    assert errors == []
    assert (existing / "probe" / "layers.csv").read_text() == "mine" and (existing / "report.md").is_file()
    assert (existing / "steer" / "sweep-valve" / "sweep.json").is_file()  # untouched by the writers' reports
    last = Artifact.load(existing).stages["calibrate"]["version"]
    worker, n = divmod(last, 1000)
    assert (existing / "calibrate" / "summary.json").read_text() == f"{worker}-{n}"  # the report matches the manifest
    assert _leftovers(existing.parent) == []


def test_a_read_only_location_is_refused_before_any_work(tmp_path, monkeypatch):
    """As root (CI) nothing is read-only to `os.access`, so the check is driven through it."""
    from dyninfer.core.artifact_files import check_output_dir

    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == locked else real(path, mode))
    with pytest.raises(DyninferError, match=r"cannot write into .*locked.* choose another output path"):
        check_output_dir(locked / "new" / "art")
    check_output_dir(tmp_path / "fine")  # a writable place passes


def test_a_second_writer_waits_for_the_first_and_says_so(existing):
    import threading
    import time

    from dyninfer.core.artifact_files import artifact_lock

    waited, saved = [], threading.Event()
    with artifact_lock(existing):  # another process's swap, as far as the lock goes
        thread = threading.Thread(
            target=lambda: (versioned_artifact(2).save(existing, reports=_reports(2), on_wait=lambda: waited.append(1)), saved.set())
        )
        thread.start()
        time.sleep(0.5)
        assert waited == [1] and not saved.is_set()  # it waits, and said so once
    thread.join(30)
    assert saved.is_set() and Artifact.load(existing).stages["calibrate"] == {"version": 2}


def test_a_calibration_whose_data_the_tuned_lens_would_exhaust_stops_before_training_it(workspace):
    """The lens trains first on train windows the calibration then skips: data for both is checked before it trains."""
    args = ["calibrate", str(workspace["model"]), "--data", str(workspace["text"]), *CALIBRATE_ARGS]
    args[args.index("--lens") + 1] = "tuned"
    result = runner.invoke(app, [*args, "--lens-train-tokens", "9000", "--lens-steps", "2"])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "train split" in errors[0], result.output
    assert "lens" not in result.stderr.replace(errors[0], ""), result.stderr  # no lens training started
    assert "loading model" not in result.stderr  # known from the tokenizer alone, before the weights load


def test_an_applied_steering_edited_past_float32_is_refused_when_loaded(workspace, tmp_path):
    """A manifest edited to α = 1e39 would bake inf into the weights and generate from NaN logits."""
    copy = tmp_path / "steered"
    shutil.copytree(workspace["steered"], copy)
    _edit_manifest(lambda m: m["stages"]["steer"].update(applied={"method": "activation", "alpha": 1e39}))(copy)
    before = tree_state(tmp_path)
    result = runner.invoke(app, ["run", str(copy), "tok1", "--raw", "-n", "2"])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "inf or NaN" in errors[0], result.output
    assert tree_state(tmp_path) == before


def test_an_audit_whose_data_is_short_for_the_probe_stops_before_the_pruning_that_runs_first(workspace, tmp_path):
    args = ["audit", str(workspace["model"]), "--data", str(workspace["text"]), "--seq-len", "32", "--prompts", "24"]
    args += ["--prompt-tokens", "12", "--new-tokens", "6", "--tokens", "900000", "--prune", "--out", str(tmp_path / "a")]
    result = runner.invoke(app, args)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "lower --tokens" in errors[0], result.output
    assert "prun" not in result.stderr.replace(errors[0], "") and not (tmp_path / "a").exists(), result.stderr
    assert "loading model" not in result.stderr  # known from the tokenizer alone, before the weights load


@pytest.mark.parametrize(
    "command",
    [
        ["probe", "--tokens", "900000"],
        ["prune", "--heldout-tokens", "900000"],
        ["tune-exits", "--heldout-tokens", "900000", "--out", "{tmp}/never-tuned"],
        ["calibrate", *CALIBRATE_ARGS, "--heldout-tokens", "900000"],
    ],
    ids=["probe", "prune", "tune-exits", "calibrate"],
)
def test_data_too_short_for_the_work_is_refused_before_the_weights_load(workspace, tmp_path, command):
    args = [command[0], str(workspace["model"]), "--data", str(workspace["text"]), *[a.format(tmp=tmp_path) for a in command[1:]]]
    result = runner.invoke(app, args)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "900000" in errors[0], result.output
    assert "loading model" not in result.stderr, result.stderr

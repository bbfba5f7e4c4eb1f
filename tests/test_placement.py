"""`--device` / `--dtype` (#17): how they resolve, what each stage records, float32 heads under a
bfloat16 model, and a probe whose full-vocabulary tensors stay within its memory budget."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CALIBRATE_ARGS, random_text, word_tokenizer
from tiny_models import tiny_model
from torch.utils._python_dispatch import TorchDispatchMode
from typer.testing import CliRunner

from dyninfer.cli.app import app
from dyninfer.core.artifacts import Artifact
from dyninfer.core.cost import count_costs
from dyninfer.core.errors import DyninferError
from dyninfer.core.layered import LayeredModel
from dyninfer.core.lenses import LogitLens
from dyninfer.core.models import load_model
from dyninfer.core.placement import Placement
from dyninfer.profilers import exit_probe
from dyninfer.profilers.exit_probe import run_probe, token_chunk

runner = CliRunner()


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    """A tiny llama saved in bfloat16 (its config says so), and text."""
    root = tmp_path_factory.mktemp("bf16")
    tiny_model("llama").to(torch.bfloat16).save_pretrained(root / "model")
    word_tokenizer().save_pretrained(root / "model")
    (root / "text.txt").write_text(random_text(20000))
    return root / "model", root / "text.txt"


def test_auto_dtype_is_float32_on_the_cpu_and_an_explicit_dtype_wins(bf16_checkpoint):
    model, _ = bf16_checkpoint
    auto = load_model(str(model), Placement("auto", "auto"))
    assert {p.dtype for p in auto.model.parameters()} == {torch.float32}
    assert auto.placement == {"device": "cpu", "dtype": "float32"}
    half = load_model(str(model), Placement("cpu", "bfloat16"))
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    assert half.placement == {"device": "cpu", "dtype": "bfloat16"}
    assert half.content_hash == auto.content_hash  # the same base model, whatever the precision


def test_auto_placement_on_a_cuda_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    auto = Placement()
    assert auto.torch_device() == torch.device("cuda")
    assert auto.torch_dtype(torch.bfloat16) == torch.bfloat16  # the checkpoint's own dtype on CUDA
    assert auto.torch_dtype(None) == torch.float32  # a config that declares none
    assert Placement("cuda:1", "float16").torch_dtype(torch.bfloat16) == torch.float16
    Placement("cuda:1").validate()
    with pytest.raises(DyninferError, match=r"sees 2 CUDA GPU.*cuda:0 to cuda:1"):
        Placement("cuda:2").validate()


@pytest.mark.parametrize(
    ("device", "dtype", "message"),
    [
        ("tpu", "auto", "must be auto, cpu, cuda or cuda:N"),
        ("cuda:x", "auto", "must be auto, cpu, cuda or cuda:N"),
        ("cpu", "fp16", "must be one of auto, float32, bfloat16, float16"),
    ],
)
def test_bad_placements_are_refused(device, dtype, message):
    with pytest.raises(DyninferError, match=message):
        Placement(device, dtype).validate()


def _json(args: list[str]) -> dict:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_bfloat16_stages_record_their_dtype_and_train_float32_heads(bf16_checkpoint, tmp_path):
    model, text = bf16_checkpoint
    art = tmp_path / "art"
    probe = _json(
        [
            "probe",
            str(model),
            "--data",
            str(text),
            "--seq-len",
            "32",
            "--tokens",
            "128",
            "--lens",
            "tuned",
            "--lens-train-tokens",
            "512",
            "--lens-steps",
            "2",
            "--dtype",
            "bfloat16",
            "--out",
            str(art),
        ]
    )
    assert probe["placement"] == {"device": "cpu", "dtype": "bfloat16"}
    args = [a if a != "logit" else "tuned" for a in CALIBRATE_ARGS]
    args[args.index("saturation")] = "classifier"
    calibration = _json(["calibrate", str(model), "--data", str(text), *args, "--dtype", "bfloat16", "--out", str(art)])
    assert calibration["placement"]["dtype"] == "bfloat16"
    artifact = Artifact.load(art)
    assert artifact.stages["probe"]["placement"]["dtype"] == "bfloat16"
    assert artifact.stages["calibrate"]["placement"]["dtype"] == "bfloat16"
    # The tuned lens and the exit classifier keep float32 weights under a bfloat16 model.
    exits = artifact.tensors["exits"]
    assert {exits[k].dtype for k in ("tuned_lens.weight", "classifier.weight")} == {torch.float32}

    # A later stage in another precision than the calibration says so; the same precision does not.
    in_float32 = _json(["run", str(art), "tok1 tok2 tok3", "--max-new-tokens", "3", "--dtype", "float32"])
    assert any("calibrate stage ran in bfloat16 and this run is in float32" in n for n in in_float32["notes"])
    same = _json(["bench", str(art), "--prompts", "2", "--new-tokens", "3", "--dtype", "bfloat16"])
    assert same["placement"] == {"device": "cpu", "dtype": "bfloat16"}
    assert not any("stage ran in" in n for n in same["notes"])


def test_token_chunk_fits_the_budget():
    for vocab in (128, 49_152, 128_256, 256_000):
        for budget in (2**20, 256 * 2**20, 4 * 2**30):
            chunk = token_chunk(vocab, budget)
            assert chunk == 1 or 5 * 4 * vocab * chunk <= budget < 5 * 4 * vocab * (chunk + 1)


class _VocabTensors(TorchDispatchMode):
    """The largest tensor any op allocates whose last dimension is the vocabulary (views, such as the
    head weight's transpose, allocate nothing)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.largest = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in [*args, *(kwargs or {}).values()] if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == self.vocab and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel())
        return out


def test_probe_scores_token_chunks_within_its_memory_budget(monkeypatch):
    lm = LayeredModel(tiny_model("llama", layers=4))
    windows = torch.randint(0, lm.vocab_size, (4, 33), generator=torch.Generator().manual_seed(0))
    costs = count_costs(lm, context=32)
    monkeypatch.setattr(exit_probe, "_time_plain_forward", lambda *a: 1.0)  # the plain forward is not the probe

    def probe(budget: int):
        watch = _VocabTensors(lm.vocab_size)
        with watch:
            result = run_probe(lm, windows, [LogitLens(lm)], costs, batch_size=2, memory_budget=budget)
        return result, watch.largest

    whole, largest_whole = probe(2**30)
    assert largest_whole == 2 * 32 * lm.vocab_size  # one batch's tokens at once: the watch sees them
    budget = 5 * 4 * lm.vocab_size * 3  # three tokens of five float32 vocabulary rows
    chunked, largest = probe(budget)
    assert largest * 4 <= budget // 5 and largest == 3 * lm.vocab_size
    # Chunking changes nothing but memory.
    for column in ("agreement", "accuracy", "exit_fraction"):
        assert chunked.layers[column].tolist() == whole.layers[column].tolist(), column
    for column in ("kl", "ece", "entropy"):  # float32 sums over other row blocks: rounding only
        assert chunked.layers[column].tolist() == pytest.approx(whole.layers[column].tolist(), rel=1e-5, abs=1e-7)
    assert chunked.depth["tokens"].tolist() == whole.depth["tokens"].tolist()


def test_gpu_check_without_cuda_says_so_and_passes(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    if torch.cuda.is_available():  # before running it: there the script would run every GPU step
        pytest.skip("a CUDA machine runs the whole check with `make gpu-check`")
    script = Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"
    done = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "gpu.json")], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip().count("\n") == 0 and "sees no CUDA GPU" in done.stdout
    assert not (tmp_path / "gpu.json").exists()


def test_gpu_check_fails_a_step_that_ran_off_the_gpu_path():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from gpu_check import check_step

    assert "not cuda bfloat16" in check_step({"step": "probe", "summary": {"placement": {"dtype": "float32"}}})
    assert "no NVML" in check_step({"step": "profile", "summary": {"gpu": {"available": False, "reason": "x"}}})
    assert "CUDA provider" in check_step({"step": "bench-onnx", "summary": {"notes": ["ONNX Runtime provider: CPUExecutionProvider"]}})
    assert check_step({"step": "bench-onnx", "summary": {"notes": ["ONNX Runtime provider: CUDAExecutionProvider"]}}) is None
    assert "not triton" in check_step({"step": "prune-triton", "summary": {"speed": {"backend": "numba"}}})
    assert "buffered KV layout" in check_step({"step": "export", "summary": {"kv_layout": "concat", "notes": []}})
    assert check_step({"step": "export", "summary": {"kv_layout": "buffer"}}) is None


def test_a_dispatched_offloaded_model_probes_and_decodes_like_the_plain_one(tmp_path):
    """accelerate's device map with CPU and disk offload: the layers run through its hooks, and the probe
    and greedy tokens equal the model loaded whole."""
    from conftest import save_tiny

    from dyninfer.runtime.dynamic import DynamicModel

    model = str(save_tiny("llama", tmp_path / "model"))
    plain = load_model(model)
    mapped = load_model(model, Placement(device_map="auto", max_memory="cpu=100KB,disk=1GB"))
    assert mapped.layered.offloaded and mapped.placement["device_map"] == {"cpu": 2, "disk": 5}  # layer 0 on the CPU
    windows = torch.randint(0, 128, (4, 33), generator=torch.Generator().manual_seed(1))
    results = [run_probe(m.layered, windows, [LogitLens(m.layered)], count_costs(plain.layered, context=32)) for m in (plain, mapped)]
    for column in ("agreement", "accuracy", "kl", "ece"):
        assert results[1].layers[column].tolist() == pytest.approx(results[0].layers[column].tolist(), abs=1e-6)
    prompt = windows[:1, :12]
    tokens = [DynamicModel(m.layered, None, None, None).generate(prompt, 10, mode="full").tokens for m in (plain, mapped)]
    assert torch.equal(tokens[0], tokens[1])
    # Early exits (every token leaves at layer 1 after the prompt) fill the skipped layers' caches the same way.
    from dyninfer.core.policies import ExitPolicy

    for kv_mode in ("propagate", "recompute"):
        runs = [
            DynamicModel(m.layered, ExitPolicy("logit", "softmax", [1, 2], 0.0, 0, kv_mode), LogitLens(m.layered), None).generate(
                prompt, 10, mode="early-exit"
            )
            for m in (plain, mapped)
        ]
        assert runs[0].exit_layers[1:] == [1] * 9 and runs[1].exit_layers == runs[0].exit_layers
        assert torch.equal(runs[0].tokens, runs[1].tokens), kv_mode
    # The vocabulary-subset head reads the offloaded head weight through its hook.
    normed = torch.randn(3, mapped.layered.hidden_size)
    rows = torch.tensor([5, 17, 99])
    assert torch.allclose(mapped.layered.head_rows(normed, rows), plain.layered.head_rows(normed, rows), atol=1e-6)


def test_probe_on_a_device_map_records_it(tiny_llama_dir, text_file):
    args = ["probe", str(tiny_llama_dir), "--data", str(text_file), "--seq-len", "32", "--tokens", "64"]
    whole = _json(args)
    mapped = _json([*args, "--device-map", "auto", "--max-memory", "cpu=100KB,disk=1GB"])
    assert mapped["placement"]["device_map"]["disk"] >= 1 and "device_map" not in whole["placement"]
    assert mapped["lenses"]["logit"]["agreement"] == pytest.approx(whole["lenses"]["logit"]["agreement"], abs=1e-9)

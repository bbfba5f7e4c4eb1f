"""Model specs: local dirs, GGUF files, hub ids offline, and the errors users see."""

from __future__ import annotations

import pytest
import torch
from conftest import save_tiny

from dyninfer.core.errors import DyninferError
from dyninfer.core.models import load_model


def _one_line_error(spec: str) -> str:
    with pytest.raises(DyninferError) as err:
        load_model(spec)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_local_directory_loads_with_stable_hash(tmp_path):
    first = load_model(str(save_tiny("mistral", tmp_path / "m")))
    again = load_model(str(tmp_path / "m"))
    assert first.layered.family == "mistral"
    assert first.content_hash == again.content_hash
    other = load_model(str(save_tiny("mistral", tmp_path / "other", seed=1)))
    assert other.content_hash != first.content_hash  # different weights, different identity
    info = first.base_model_info()
    assert info["num_layers"] == 3 and info["vocab_size"] == first.layered.vocab_size


def test_missing_paths():
    assert "does not exist" in _one_line_error("/no/such/model.gguf")
    assert "does not exist" in _one_line_error("./no-such-dir")


def test_hub_id_offline_says_why(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = _one_line_error("some-org/not-a-cached-model")
    assert "HF_HUB_OFFLINE" in message and "local model directory" in message


def test_corrupt_gguf_is_a_clear_error_and_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNINFER_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    message = _one_line_error(str(bad))
    assert "broken.gguf" in message and "corrupt" in message
    cache = tmp_path / "cache" / "models"
    assert not cache.exists() or not any(cache.iterdir())


def test_unsupported_architecture_in_a_directory(tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    OPTForCausalLM(
        OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2, word_embed_proj_dim=16)
    ).save_pretrained(tmp_path / "opt")
    message = _one_line_error(str(tmp_path / "opt"))
    assert "unsupported architecture 'opt'" in message and "`dyninfer models`" in message


def test_a_file_that_is_not_a_model(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    assert "not a .gguf model" in _one_line_error(str(path))


def test_directory_without_config(tmp_path):
    assert "without config.json" in _one_line_error(str(tmp_path))


@pytest.mark.integration
def test_bundled_default_model_is_smollm2_and_cached():
    from dyninfer.core.models import _gguf_cache_path, bundled_gguf_path, file_sha256

    loaded = load_model("default")
    lm = loaded.layered
    assert (lm.family, lm.num_layers, lm.hidden_size, lm.vocab_size) == ("llama", 30, 576, 49152)
    gguf = bundled_gguf_path()
    assert loaded.content_hash == file_sha256(gguf)
    assert (_gguf_cache_path(gguf, loaded.content_hash) / "model.safetensors").is_file()
    assert loaded.tokenizer.eos_token_id == loaded.model.config.eos_token_id
    ids = loaded.tokenizer("def add(a, b):\n    return a +", return_tensors="pt").input_ids
    with torch.no_grad():
        next_token = loaded.model(ids).logits[0, -1].argmax().item()
    assert loaded.tokenizer.decode([next_token]).strip() == "b"


@pytest.mark.integration
def test_a_planted_or_damaged_conversion_in_the_cache_is_not_used(tmp_path, monkeypatch):
    """The cache is checked against its source record: weights that are not the ones the conversion wrote (a folder
    planted with a copied record, a damaged file) are converted anew, and the real model loads."""
    import json as json_module
    import shutil

    from dyninfer.core.models import _gguf_cache_path, bundled_gguf_path, file_sha256

    gguf = bundled_gguf_path()
    cached = _gguf_cache_path(gguf, file_sha256(gguf))
    load_model("default")  # the conversion, once (shared with the other bundled-model tests)
    monkeypatch.setenv("DYNINFER_CACHE", str(tmp_path))
    planted = _gguf_cache_path(gguf, file_sha256(gguf))
    shutil.copytree(cached, planted)
    weights = planted / "model.safetensors"
    tampered = bytearray(weights.read_bytes())
    tampered[-64:] = bytes(64)  # the last weights zeroed, the record untouched
    weights.write_bytes(bytes(tampered))
    record = json_module.loads((planted / "dyninfer-source.json").read_text())
    assert record["weights"]["model.safetensors"] == file_sha256(cached / "model.safetensors")
    loaded = load_model("default")
    assert file_sha256(weights) == record["weights"]["model.safetensors"]  # converted anew, in place
    ids = loaded.tokenizer("def add(a, b):\n    return a +", return_tensors="pt").input_ids
    with torch.no_grad():
        assert loaded.tokenizer.decode([loaded.model(ids).logits[0, -1].argmax().item()]).strip() == "b"


@pytest.mark.integration
def test_the_tokenizer_alone_reads_as_the_models_own(tmp_path, tiny_llama_dir):
    from dyninfer.core.models import load_tokenizer

    loaded = load_model("default")  # converted: its tokenizer can now be read without the weights
    alone = load_tokenizer("default")
    text = "def add(a, b):\n    return a + b"
    assert alone is not None and alone(text).input_ids == loaded.tokenizer(text).input_ids
    assert load_tokenizer(str(tiny_llama_dir))("tok1 tok2").input_ids == load_model(str(tiny_llama_dir)).tokenizer("tok1 tok2").input_ids
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert load_tokenizer("no-org/no-such-model") is None and load_tokenizer(str(tmp_path / "m.gguf")) is None
    assert load_tokenizer(str(tmp_path / "nowhere")) is None

"""Shared fixtures: tiny random models (one per architecture) saved with a word-level tokenizer."""

from __future__ import annotations

import hashlib
import os
import random
import sys
from pathlib import Path

import pytest

# Tests never touch the network: fail fast instead of retrying the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers share two cores: OpenMP threads that spin while they wait take the other worker's
    # core (a pair of bundled-model decodes ran 40% faster with passive waiting). Set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import VOCAB, tiny_model

WORDS = [f"tok{i}" for i in range(VOCAB - 2)]


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>"] + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")


def char_tokenizer():
    """One token per character (printable ASCII and newline), decoded without spaces: digits, full stops and
    newlines are tokens of their own, as in the tokenizers of real models that split numbers into digits."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>"] + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")


def answering_model(directory: Path) -> Path:
    """A llama with the character tokenizer whose greedy next character is a fixed function of the last one: after
    a question it writes " 7." and a new line, again and again, and a forced "The answer is" is followed by " 7".
    Its chains have sentence and line ends to probe at, and every probe reads an answer, with probability ~1.

    Each layer adds nothing to the residual stream (zero output projections), the embedding is one-hot, and the
    head maps each character to its successor."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = char_tokenizer()
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4)
    config.num_key_value_heads, config.max_position_embeddings, config.tie_word_embeddings = 2, 512, False
    model = LlamaForCausalLM(config).eval()
    ids = tokenizer.get_vocab()
    successor = {" ": "7", "7": ".", ".": "\n", "\n": " "}  # every other character is followed by a space
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(128))
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        head = torch.zeros(128, 128)
        for char, token in ids.items():
            head[ids[successor.get(char, " ")], token] = 50.0
        model.lm_head.weight.copy_(head)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def random_text(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS[:40]) for _ in range(n_words))


def tree_state(root: Path) -> dict[str, tuple]:
    """Every directory and file under `root`: its kind, mode and (for files) content hash."""
    state = {}
    for directory, folders, files in os.walk(root):
        for name in folders:
            path = Path(directory, name)
            state[str(path.relative_to(root))] = ("dir", path.stat().st_mode)
        for name in files:
            path = Path(directory, name)
            state[str(path.relative_to(root))] = ("file", path.stat().st_mode, hashlib.sha256(path.read_bytes()).hexdigest())
    return state


def save_tiny(arch: str, directory: Path, seed: int = 0) -> Path:
    tiny_model(arch, seed=seed).save_pretrained(directory)
    word_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(random_text(3000))
    return path


# A quick calibration of a tiny model: saturation checks, a loose target, small splits, and the default
# generation risk on 24 short prompts (enough to certify at target 0.6: ltt.min_examples(0.4, 0.05) is 6).
CALIBRATE_ARGS = [
    "--seq-len",
    "32",
    "--fit-tokens",
    "256",
    "--calibration-tokens",
    "1024",
    "--heldout-tokens",
    "256",
    "--min-layer",
    "1",
    "--target",
    "0.6",
    "--lens",
    "logit",
    "--measure",
    "saturation",
    "--prompts",
    "24",
    "--heldout-prompts",
    "4",
    "--prompt-tokens",
    "12",
    "--new-tokens",
    "6",
]


def calibrate_tiny(root: Path) -> tuple[Path, Path, Path]:
    """Save a tiny llama and random text under `root`, calibrate it; returns (model, data, artifact)."""
    from typer.testing import CliRunner

    from dyninfer.cli.app import app

    model = save_tiny("llama", root / "model")
    data = root / "text.txt"
    data.write_text(random_text(20000))
    artifact = root / "artifact"
    result = CliRunner().invoke(app, ["calibrate", str(model), "--data", str(data), *CALIBRATE_ARGS, "--out", str(artifact)])
    assert result.exit_code == 0, result.output
    return model, data, artifact


def pytest_collection_modifyitems(config, items):
    """The bundled-model tests first: they are the longest, so two xdist workers finish them early
    and share out the many short tests afterwards, instead of ending on one long test."""
    items.sort(key=lambda item: item.get_closest_marker("integration") is None)

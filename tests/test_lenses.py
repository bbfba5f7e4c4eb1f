"""Tuned lens: training lowers KL against the logit lens, round-trips through the artifact."""

from __future__ import annotations

import pytest
import torch
from tiny_models import VOCAB, tiny_model

from dyninfer.core.artifacts import Artifact, BaseModelInfo
from dyninfer.core.errors import DyninferError
from dyninfer.core.layered import LayeredModel
from dyninfer.core.lenses import LogitLens, TunedLens, collect_hidden_states, mean_kl_per_layer, train_tuned_lens
from dyninfer.core.stages import EXITS_GROUP


def _windows(n, length=33, seed=0):
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def test_tuned_lens_lowers_heldout_kl_on_a_tiny_model():
    lm = LayeredModel(tiny_model("llama", layers=4))
    lens, record = train_tuned_lens(lm, _windows(40), steps=10, tokens_per_step=64, vocab_top_k=16, lr=1e-3)
    held = collect_hidden_states(lm, _windows(8, seed=1))
    with torch.no_grad():
        logit_kl = mean_kl_per_layer(LogitLens(lm), lm, held)
        tuned_kl = mean_kl_per_layer(lens, lm, held)
    assert tuned_kl[-1] == pytest.approx(0.0, abs=1e-6) and logit_kl[-1] == pytest.approx(0.0, abs=1e-6)
    for index in range(lm.num_layers):
        assert tuned_kl[index] < logit_kl[index], (index, tuned_kl, logit_kl)
    # The refined translator is kept only where it did not hurt the validation KL.
    for index, kept in enumerate(record.kept_refined):
        if kept:
            assert record.kl_refined[index] <= record.kl_init[index]
    assert record.train_tokens + record.validation_tokens == 40 * 32


def test_identity_init_without_steps_is_the_logit_lens():
    lm = LayeredModel(tiny_model("gpt2"))
    lens, _ = train_tuned_lens(lm, _windows(40), steps=0, init="identity")
    h = torch.randn(4, 32)
    with torch.no_grad():
        torch.testing.assert_close(lens.logits(1, h), LogitLens(lm).logits(1, h))


def test_tuned_lens_round_trips_through_an_artifact(tmp_path):
    lm = LayeredModel(tiny_model("qwen2"))
    lens, _ = train_tuned_lens(lm, _windows(40), steps=2, tokens_per_step=32)
    info = BaseModelInfo("tiny", "abc", "qwen2", lm.num_layers, lm.hidden_size, lm.vocab_size)
    artifact = Artifact(info)
    artifact.put_tensors(EXITS_GROUP, lens.tensors())
    artifact.save(tmp_path / "a")
    loaded = TunedLens.from_tensors(lm, Artifact.load(tmp_path / "a").tensors[EXITS_GROUP])
    h = torch.randn(3, 32)
    with torch.no_grad():
        for index in range(lm.num_layers + 1):
            torch.testing.assert_close(loaded.logits(index, h), lens.logits(index, h), rtol=0, atol=0)


def test_tuned_lens_for_another_shape_is_rejected():
    small = LayeredModel(tiny_model("llama", layers=3))
    deeper = LayeredModel(tiny_model("llama", layers=5))
    tensors = TunedLens(small).tensors()
    with pytest.raises(DyninferError, match="trained for another model"):
        TunedLens.from_tensors(deeper, tensors)
    with pytest.raises(DyninferError, match="no tuned lens"):
        TunedLens.from_tensors(deeper, {})


def test_too_little_data_for_a_tuned_lens():
    lm = LayeredModel(tiny_model("llama"))
    with pytest.raises(DyninferError, match="too little data"):
        train_tuned_lens(lm, _windows(1, length=9), steps=1)

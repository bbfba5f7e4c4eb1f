"""The layer-by-layer runner must reproduce each architecture's own forward exactly."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ARCHS, VOCAB, tiny_model

from dyninfer.core.adapters import adapter_for
from dyninfer.core.errors import DyninferError
from dyninfer.core.layered import LayeredModel


def _captured_layer_outputs(model, lm: LayeredModel, ids):
    """Each decoder layer's output as seen by hooks during the model's own forward."""
    captured = {}
    hooks = [
        layer.register_forward_hook(lambda mod, args, out, i=i: captured.__setitem__(i + 1, out[0] if isinstance(out, tuple) else out))
        for i, layer in enumerate(lm.layers)
    ]
    try:
        logits = model(ids, use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()
    return captured, logits


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_by_layer_matches_model_forward(arch):
    model = tiny_model(arch)
    lm = LayeredModel(model)
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        captured, reference_logits = _captured_layer_outputs(model, lm, ids)
        states = dict(lm.hidden_states(ids))
        assert set(states) == set(range(lm.num_layers + 1))
        for index in range(1, lm.num_layers + 1):
            torch.testing.assert_close(states[index], captured[index], rtol=0, atol=1e-6)
        torch.testing.assert_close(lm.logits_from(states[lm.num_layers]), reference_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_decoding_matches_full_forward(arch):
    """Prefill then one token at a time through the adapter's cache equals one full pass."""
    model = tiny_model(arch)
    lm = LayeredModel(model)
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model(ids, use_cache=False).logits
        cache = lm.new_cache(batch_size=2)
        pieces = [lm.forward_logits(ids[:, :12], cache=cache)]  # 12 > the sliding window of 8
        for t in range(12, 20):
            pieces.append(lm.forward_logits(ids[:, t : t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(pieces, dim=1), reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_reports_shapes(arch):
    model = tiny_model(arch, layers=4)
    lm = LayeredModel(model)
    assert lm.num_layers == 4
    assert lm.vocab_size == VOCAB
    assert lm.hidden_size == 32
    assert lm.family == arch


def test_head_rows_equals_columns_of_full_head():
    lm = LayeredModel(tiny_model("gemma3"))  # gemma: the final softcap must apply to the subset too
    normed = torch.randn(5, 32)
    subset = torch.tensor([3, 7, 100])
    with torch.no_grad():
        torch.testing.assert_close(lm.head_rows(normed, subset), lm.head(normed)[:, subset])


def test_unsupported_architecture_says_what_its_layout_lacks():
    from transformers import AutoModelForCausalLM, OPTConfig

    opt = AutoModelForCausalLM.from_config(
        OPTConfig(vocab_size=64, hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2, word_embed_proj_dim=16)
    )
    with pytest.raises(DyninferError) as err:
        adapter_for(opt)  # OPT keeps its layers in model.decoder, with learned positions
    message = str(err.value)
    assert message.startswith("unsupported architecture 'opt': no embed_tokens, layers, rotary_emb, final norm")
    assert "`dyninfer models`" in message and "\n" not in message


def test_a_family_whose_forward_does_more_than_its_layout_is_refused():
    """Families recognised by structure alone are checked against their own forward when loaded."""
    lm = LayeredModel(tiny_model("llama"))
    lm.check_against_forward()  # the layout says everything Llama's forward does
    lm.logit_scale = 2.0  # as if the forward scaled its logits and no declaration said so (Cohere, Granite)
    with pytest.raises(DyninferError, match="does not reproduce its own forward"):
        lm.check_against_forward()

"""Steering directions: baked equals hooked, α = 0 is the base model, valve deltas, GGUF control vectors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import WORDS, save_tiny, word_tokenizer
from tiny_models import ARCHS, tiny_model

from dyninfer.compressors.cot_data import CotExample
from dyninfer.compressors.steer_extract import CotPrompter, activation_direction, chain_means, load_cot_split, train_valve, valve_between
from dyninfer.compressors.steering import ActivationSteering, bake, hooked, steered
from dyninfer.core.errors import DyninferError
from dyninfer.core.layered import LayeredModel
from dyninfer.core.models import load_model
from dyninfer.jobs.steer import write_control_vector
from dyninfer.profilers.steer_sweep import answer_scores, generate_greedy, run_sweep

PROMPT = torch.tensor([[5, 17, 3, 99, 42, 8, 61, 7]])


def _random_steering(lm: LayeredModel, seed: int = 0) -> ActivationSteering:
    g = torch.Generator().manual_seed(seed)
    return ActivationSteering({i: torch.randn(lm.hidden_size, generator=g) for i in (0, lm.num_layers - 1)})


def _state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_baked_activation_steering_equals_hooks_and_alpha_zero_is_the_base(arch):
    model = tiny_model(arch)
    lm = LayeredModel(model)
    steering = _random_steering(lm)
    with torch.no_grad():
        base = model(PROMPT).logits
        with hooked(lm, steering, 0.7):
            hooked_logits = model(PROMPT).logits
            hooked_layered = lm.forward_logits(PROMPT)
        before = _state(model)
        with steered(lm, steering, 0.0):
            assert torch.equal(model(PROMPT).logits, base)  # exactly, not approximately
        with steered(lm, steering, 0.7):
            baked = model(PROMPT).logits
            baked_layered = lm.forward_logits(PROMPT)
        after = model(PROMPT).logits
    assert not torch.allclose(hooked_logits, base, atol=1e-3)  # the steering does something
    torch.testing.assert_close(baked, hooked_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(baked_layered, hooked_layered, atol=1e-5, rtol=1e-5)
    assert torch.equal(after, base)  # the context restored every weight and module
    assert before.keys() == model.state_dict().keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bake_alpha_zero_touches_nothing():
    model = tiny_model("llama")
    lm, before = LayeredModel(model), _state(model)
    bake(lm, _random_steering(lm), 0.0)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_difference_of_means_and_pca_against_a_planted_shift():
    torch.manual_seed(0)
    examples, d = 40, 16
    shift = torch.zeros(d)
    shift[3] = 2.0
    long = torch.randn(examples, 1, d)
    noise = 0.05 * torch.randn(examples, 1, d)
    short = long + shift + noise
    mean = activation_direction({"long": long, "short": short}, [4], "mean").directions[4]
    torch.testing.assert_close(mean, (short - long).mean(0)[0])
    pca = activation_direction({"long": long, "short": short}, [4], "pca").directions[4]
    assert torch.nn.functional.cosine_similarity(pca, shift, dim=0) > 0.99  # sign: towards the short chains
    unit = pca / pca.norm()
    assert abs(float(pca.norm()) - float(mean @ unit)) < 1e-5  # moves the mean as far as the mean shift does


def test_chain_means_average_the_chain_tokens_only():
    model = tiny_model("llama")
    loaded = type("L", (), {})()
    loaded.model, loaded.tokenizer, loaded.layered = model, word_tokenizer(), LayeredModel(model)
    prompter = CotPrompter(loaded.tokenizer, [])
    example = CotExample("tok1 tok2", "tok3 tok4 tok5 tok6", "tok7", 1.0)
    means = chain_means(loaded, prompter, [example, example], [1])
    ids, start = prompter.encode(example.question, example.long)
    captured = {}
    handle = loaded.layered.layers[1].register_forward_hook(lambda m, a, o: captured.update(h=o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        model(torch.tensor([ids]))
    handle.remove()
    expected = captured["h"][0, start:].mean(0)
    torch.testing.assert_close(means["long"][0, 0], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(means["long"][1, 0], expected, atol=1e-5, rtol=1e-5)


def _peft_adapter(arch: str, directory, seed: int):
    from peft import LoraConfig, get_peft_model

    base = tiny_model(arch)
    targets = ["c_attn", "c_fc"] if arch == "gpt2" else ["q_proj", "down_proj"]
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, fan_in_fan_out=arch == "gpt2")
    peft_model = get_peft_model(base, config)
    peft_model.save_pretrained(directory)
    with torch.no_grad():
        return peft_model(PROMPT).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_peft_adapter_as_valve_equals_peft_at_alpha_one(arch, tmp_path):
    model_dir = save_tiny(arch, tmp_path / "model")
    expected = _peft_adapter(arch, tmp_path / "adapter", seed=1)
    loaded = load_model(str(model_dir))
    with torch.no_grad():
        base = loaded.model(PROMPT).logits
    delta = valve_between(loaded, "base", str(tmp_path / "adapter"))
    assert delta.low_rank and not delta.dense
    with torch.no_grad(), steered(loaded.layered, delta, 1.0):
        at_one = loaded.model(PROMPT).logits
    assert not torch.allclose(expected, base, atol=1e-3)
    torch.testing.assert_close(at_one, expected, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        assert torch.equal(loaded.model(PROMPT).logits, base)


def test_checkpoint_and_adapter_deltas(tmp_path):
    model_dir = save_tiny("llama", tmp_path / "model")
    tuned = tiny_model("llama")
    with torch.no_grad():
        tuned.model.layers[1].mlp.up_proj.weight.mul_(1.5)
        expected = tuned(PROMPT).logits
    tuned.save_pretrained(tmp_path / "tuned")
    word_tokenizer().save_pretrained(tmp_path / "tuned")
    loaded = load_model(str(model_dir))
    delta = valve_between(loaded, "base", str(tmp_path / "tuned"))
    assert delta.names() == ["model.layers.1.mlp.up_proj.weight"] and delta.dense
    with torch.no_grad(), steered(loaded.layered, delta, 1.0):
        torch.testing.assert_close(loaded.model(PROMPT).logits, expected, atol=1e-5, rtol=1e-5)
    # Between two adapters: base + (B − A) at α = 1 equals base + B.
    expected_b = _peft_adapter("llama", tmp_path / "b", seed=2)
    _peft_adapter("llama", tmp_path / "a", seed=3)
    between = valve_between(loaded, str(tmp_path / "a"), str(tmp_path / "b"))
    with torch.no_grad():
        bake(loaded.layered, valve_between(loaded, "base", str(tmp_path / "a")), 1.0)
        bake(loaded.layered, between, 1.0)
        torch.testing.assert_close(loaded.model(PROMPT).logits, expected_b, atol=1e-4, rtol=1e-4)
    with pytest.raises(DyninferError, match="same weights"):
        valve_between(loaded, "base", "base")


def test_an_adapter_for_another_model_is_refused(tmp_path):
    _peft_adapter("gpt2", tmp_path / "adapter", seed=1)
    loaded = load_model(str(save_tiny("llama", tmp_path / "model")))
    with pytest.raises(DyninferError, match="another model"):
        valve_between(loaded, "base", str(tmp_path / "adapter"))


def _word_examples(n: int, seed: int = 0) -> list[CotExample]:
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        q = " ".join(rng.choice(WORDS[:30]) for _ in range(5))
        out.append(CotExample(q, " ".join(rng.choice(WORDS[30:60]) for _ in range(12)), WORDS[70], 1.0))
    return out


def test_valve_training_learns_the_short_chains_and_leaves_the_model_as_it_was(tmp_path):
    loaded = load_model(str(save_tiny("llama", tmp_path / "model")))
    before = _state(loaded.model)
    types = [type(m) for m in loaded.model.modules()]
    prompter = CotPrompter(loaded.tokenizer, [])
    examples = _word_examples(16)
    delta, record = train_valve(loaded, prompter, examples, rank=4, steps=40, lr=1e-2, batch_size=8)
    # A random tiny head caps how far the loss can fall (|logit| < 1); it must still clearly fall.
    assert record["final_loss"] < record["first_loss"] - 0.3
    assert [type(m) for m in loaded.model.modules()] == types and not hasattr(loaded.model, "peft_config")
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())
    assert len(delta.names()) == 7 * 3  # every projection of every layer
    ids, start = prompter.encode(examples[0].question, examples[0].short)
    with torch.no_grad():
        target = ids[start]
        base_p = loaded.model(torch.tensor([ids[:start]])).logits[0, -1].softmax(-1)[target]
        with steered(loaded.layered, delta, 1.0):
            tuned_p = loaded.model(torch.tensor([ids[:start]])).logits[0, -1].softmax(-1)[target]
    assert tuned_p > 2 * base_p  # θ + Δθ prefers the short chain's first token


def test_batched_left_padded_generation_equals_one_at_a_time(tmp_path):
    loaded = load_model(str(save_tiny("llama", tmp_path / "model")))
    prompts = ["tok1 tok2 tok3", "tok4", "tok5 tok6 tok7 tok8 tok9"]
    batched = generate_greedy(loaded, prompts, 6, batch_size=3)
    single = [generate_greedy(loaded, [p], 6, batch_size=1)[0] for p in prompts]
    assert [g.tokens for g in batched] == [g.tokens for g in single]
    for prompt, gen in zip(prompts, single):
        ids = loaded.tokenizer(prompt, return_tensors="pt").input_ids
        reference = loaded.model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, ids.shape[1] :]
        eos = loaded.tokenizer.eos_token_id
        ref = reference.tolist()
        assert gen.tokens == (ref[: ref.index(eos)] if eos in ref else ref)


def test_sweep_reports_every_alpha_and_restores_the_model(tmp_path):
    loaded = load_model(str(save_tiny("llama", tmp_path / "model")))
    before = _state(loaded.model)
    steering = _random_steering(loaded.layered)
    questions = _word_examples(3, seed=1)
    result = run_sweep(loaded, steering, "activation", CotPrompter(loaded.tokenizer, []), questions, [-2.0, 2.0], max_new_tokens=5)
    assert [p.alpha for p in result.points] == [-2.0, 0.0, 2.0]
    zero = result.points[1]
    assert zero.agreement == 1.0 and zero.length_change == 0.0
    assert zero.retained is None and zero.accuracy == 0.0  # word chains hold no numbers: nothing is right
    assert all(0 < p.mean_length <= 5 and p.perplexity > 1 for p in result.points)
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())
    with pytest.raises(DyninferError, match="two different"):
        run_sweep(loaded, steering, "activation", CotPrompter(loaded.tokenizer, []), questions, [0.0], max_new_tokens=5)


def test_answer_scores():
    questions = [CotExample(f"q{i}", "l", "s", float(i)) for i in range(4)]
    base = [0.0, 1.0, 7.0, None]  # right, right, wrong, no answer
    steered_answers = [0.0, 5.0, 7.0, 3.0]  # right, wrong, same wrong, right
    scores = answer_scores(questions, steered_answers, base)
    assert scores == {"accuracy": 0.5, "agreement": 0.5, "retained": 0.5}
    assert answer_scores(questions, base, [None] * 4)["retained"] is None


def test_gguf_control_vector_reads_back(tmp_path):
    import gguf
    import numpy as np

    steering = ActivationSteering({3: torch.arange(8.0), 5: -torch.ones(8)})
    path = write_control_vector(tmp_path / "cv.gguf", steering, 0.5, "llama")
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert sorted(tensors) == ["direction.3", "direction.5"]
    np.testing.assert_allclose(tensors["direction.3"].reshape(-1), 0.5 * np.arange(8.0))
    np.testing.assert_allclose(tensors["direction.5"].reshape(-1), -0.5 * np.ones(8))
    fields = reader.fields
    arch = fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "controlvector"
    assert int(fields["controlvector.layer_count"].parts[-1][0]) == 2
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left


def test_builtin_split_is_disjoint_and_stable():
    train, held = load_cot_split("builtin:arithmetic", 3, 20, 5)
    train_more, held_more = load_cot_split("builtin:arithmetic", 3, 20, 8)
    assert train == train_more and held == held_more[:5]
    assert not {e.question for e in train} & {e.question for e in held}


def test_jsonl_split_and_errors(tmp_path):
    path = tmp_path / "chains.jsonl"
    path.write_text("\n".join(json.dumps(e.to_dict()) for e in _word_examples(10)))
    train, held = load_cot_split(str(path), 0, 100, 100)
    assert len(held) == 2 and len(train) == 8  # at most a fifth held out
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps(_word_examples(1)[0].to_dict()))
    with pytest.raises(DyninferError, match="at least 2"):
        load_cot_split(str(one), 0, 10, 2)
    with pytest.raises(DyninferError, match="unknown built-in"):
        load_cot_split("builtin:nope", 0, 10, 2)
    with pytest.raises(DyninferError, match="1 to 6"):
        load_cot_split("builtin:arithmetic:9", 0, 10, 2)
    one_step, _ = load_cot_split("builtin:arithmetic:1", 0, 10, 2)
    assert all(e.long.count(" = ") == 1 for e in one_step)

"""`profile`: per-piece FLOPs against hand counts, memory, latency structure, the CLI and the cost model."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import ARCHS, VOCAB, tiny_config, tiny_model
from typer.testing import CliRunner

from dyninfer.cli.app import app
from dyninfer.core.artifacts import Artifact
from dyninfer.core.cost import count_costs
from dyninfer.core.layered import LayeredModel
from dyninfer.profilers.layer_profile import profile_layers
from dyninfer.profilers.piece_meters import peak_bytes

runner = CliRunner()
CONTEXT = 8


def _profile(arch: str, context: int = CONTEXT):
    lm = LayeredModel(tiny_model(arch))
    prompt = torch.randint(0, VOCAB, (1, context), generator=torch.Generator().manual_seed(0))
    return lm, profile_layers(lm, prompt, warmup=1, repeats=3)


def _piece(profile, piece: str, layer: int = -1):
    rows = profile.pieces[(profile.pieces.piece == piece) & (profile.pieces.layer == layer)]
    assert len(rows) == 1, (piece, layer)
    return rows.iloc[0]


def test_llama_flops_and_memory_match_a_hand_count():
    lm, prof = _profile("llama")
    c = tiny_config("llama")
    d, inter, heads, kv = c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads
    hd = d // heads
    projections = 2 * d * (heads * hd) * 2 + 2 * d * (kv * hd) * 2  # q, o and k, v
    # Decode: one query attends to CONTEXT cached keys plus itself (QK^T and AV, 2 FLOPs per MAC).
    decode_attention = projections + 2 * 2 * heads * hd * (CONTEXT + 1)
    # Prefill: the counter charges the full T x T score matrix (the causal mask is not skipped).
    prefill_attention = projections + 2 * 2 * heads * hd * CONTEXT
    mlp = 3 * 2 * d * inter
    for layer in range(c.num_hidden_layers):
        attention = _piece(prof, "attention", layer)
        assert attention.decode_flops == decode_attention
        assert attention.prefill_flops_per_token == prefill_attention
        assert _piece(prof, "mlp", layer).decode_flops == mlp
        assert _piece(prof, "rest", layer).decode_flops == 0  # norms and adds are not matmuls
        # The KV cache: keys and values of CONTEXT tokens, fp32.
        assert attention.cache_bytes == 2 * kv * hd * CONTEXT * 4
        # MLP prefill peak: act(gate(x)), up(x) and their product are alive together ([T, inter] each).
        assert _piece(prof, "mlp", layer).activation_bytes == 3 * CONTEXT * inter * 4
    assert _piece(prof, "head").decode_flops == 2 * d * VOCAB
    assert _piece(prof, "embed").decode_flops == 2 * (hd // 2)  # the rotary table: inv_freq x position
    assert _piece(prof, "norm").decode_flops == 0
    # Parameters and bytes by hand (untied head, fp32).
    assert _piece(prof, "mlp", 0).params == 3 * d * inter
    assert _piece(prof, "attention", 0).params == 2 * d * heads * hd + 2 * d * kv * hd
    assert _piece(prof, "rest", 0).params == 2 * d  # two RMSNorm weights
    assert _piece(prof, "embed").params == VOCAB * d and _piece(prof, "head").weight_bytes == VOCAB * d * 4


def test_gpt2_and_mamba_blocks_match_a_hand_count():
    _, prof = _profile("gpt2")
    d = tiny_config("gpt2").n_embd
    attention = 2 * d * 3 * d + 2 * d * d + 2 * 2 * d * (CONTEXT + 1)
    assert _piece(prof, "attention", 0).decode_flops == attention
    assert _piece(prof, "mlp", 0).decode_flops == 2 * 2 * d * 4 * d
    assert _piece(prof, "head").weight_bytes == 0 and prof.tied_head  # GPT-2 ties the head to wte

    _, prof = _profile("mamba")
    c = tiny_config("mamba")
    inner, rank = c.expand * c.hidden_size, c.time_step_rank
    mixer = (
        2 * c.hidden_size * 2 * inner
        + 2 * inner * (rank + 2 * c.state_size)
        + 2 * rank * inner
        + 2 * inner * c.hidden_size
        + 2 * inner * c.state_size
    )  # in, x, dt, out projections; the read-out h.C
    assert _piece(prof, "mixer", 0).decode_flops == mixer
    assert _piece(prof, "mixer", 0).cache_bytes == (inner * c.conv_kernel + inner * c.state_size) * 4
    assert any("selective scan" in note for note in prof.notes)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_adds_up(arch):
    lm, prof = _profile(arch)
    totals = prof.totals()
    assert totals["params"] == sum(p.numel() for p in lm.model.parameters())
    # The decode pieces add up to the whole step as the cost model counts it (the same counter: consistency only;
    # test_the_cost_models_decode_step_matches_a_hand_count holds that count to the architecture's formula).
    assert totals["decode_flops"] == pytest.approx(count_costs(lm, context=CONTEXT).full_cost())
    assert prof.flops.full_cost() == pytest.approx(totals["decode_flops"])
    timed = prof.pieces[["decode_ms", "prefill_ms"]]
    assert (prof.pieces.loc[prof.pieces.piece != "rest", ["decode_ms", "prefill_ms"]] > 0).all().all()
    assert (prof.pieces.decode_ms_p10 <= prof.pieces.decode_ms).all() and (prof.pieces.decode_ms <= prof.pieces.decode_ms_p90).all()
    assert timed.notna().all().all()
    measured = prof.measured
    assert measured.unit == "ms/token" and measured.num_layers == lm.num_layers
    assert set(measured.checks) == {"saturation", "classifier", "head_row"}
    assert all(v > 0 for v in measured.checks.values()) and measured.translator > 0
    by_layer = prof.by_layer()
    assert len(by_layer) == lm.num_layers


def test_peak_bytes_counts_what_is_alive_together():
    with torch.no_grad():
        assert peak_bytes(lambda: torch.ones(1000) * 2) == 2 * 4000  # ones() is alive while * runs
        x = torch.ones(1000)
        assert peak_bytes(lambda: x.view(10, 100)) == 0  # a view allocates nothing
        assert peak_bytes(lambda: x.add_(1)) == 0  # nor does an in-place op


def test_decode_is_measured_at_a_fixed_context():
    from dyninfer.profilers.layer_profile import _Workload
    from dyninfer.profilers.piece_meters import FlopMeter, Meter

    lm, prof = _profile("llama")
    work = _Workload(lm, torch.randint(0, VOCAB, (1, CONTEXT), generator=torch.Generator().manual_seed(0)))
    for _ in range(5):  # as many steps as warm-up and repeats take
        work.decode(Meter())
    meter = FlopMeter()
    with meter.active(), meter.hooked(lm):
        work.decode(meter)
    # The cache is cropped back before each step: the sixth step still attends to CONTEXT + 1 keys.
    assert meter.flops[("attention", 0)] == _piece(prof, "attention", 0).decode_flops
    assert work.cache_at_context().get_seq_length() == CONTEXT


# --------------------------------------------------------------------------- CLI


def test_profile_cli_writes_the_stage_and_reports_no_gpu(tiny_llama_dir, text_file, tmp_path):
    out = tmp_path / "art"
    args = [
        "profile",
        str(tiny_llama_dir),
        "--data",
        str(text_file),
        "--context",
        "16",
        "--repeats",
        "3",
        "--warmup",
        "1",
        "--out",
        str(out),
        "--json",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["gpu"]["available"] is False and summary["gpu"]["reason"].startswith("no GPU")
    assert summary["totals"]["params"] == sum(p.numel() for p in tiny_model("llama").parameters())
    assert summary["measured_cost"]["unit"] == "ms/token"
    for name in ("pieces.csv", "pieces.parquet", "summary.json", "profile.png"):
        assert (out / "profile" / name).stat().st_size > 0
    assert (out / "profile" / "profile.png").read_bytes().startswith(b"\x89PNG")
    stage = Artifact.load(out).stages["profile"]
    assert len(stage["measured_cost"]["layers"]) == 3
    table = runner.invoke(app, args[:-3])
    assert table.exit_code == 0 and "layer 2" in table.stdout and "no GPU" in table.stdout


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--repeats", "2"], "--repeats must be at least 3"),
        (["--context", "0"], "--context must be at least 1"),
        (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N"),
        (["--energy-seconds", "0"], "--energy-seconds must be positive"),
    ],
)
def test_profile_bad_options(tiny_llama_dir, text_file, args, fragment):
    result = runner.invoke(app, ["profile", str(tiny_llama_dir), "--data", str(text_file), *args])
    assert result.exit_code == 2 and fragment in result.output and "Traceback" not in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_profile_cuda_without_a_gpu_is_a_clear_error(tiny_llama_dir, text_file):
    result = runner.invoke(app, ["profile", str(tiny_llama_dir), "--data", str(text_file), "--device", "cuda"])
    assert result.exit_code == 2 and "sees no CUDA GPU" in result.output


@pytest.mark.slow
def test_calibrate_uses_the_measured_cost_when_profiled(tmp_path):
    from conftest import CALIBRATE_ARGS, calibrate_tiny

    model, data, artifact = calibrate_tiny(tmp_path)
    flops = Artifact.load(artifact).stages["calibrate"]["cost_model"]
    assert flops["unit"] == "FLOPs/token"
    refused = runner.invoke(
        app, ["calibrate", str(model), "--data", str(data), *CALIBRATE_ARGS, "--cost", "measured", "--out", str(artifact)]
    )
    assert refused.exit_code == 2 and "dyninfer profile" in refused.output
    profiled = runner.invoke(app, ["profile", str(model), "--data", str(data), "--context", "32", "--repeats", "3", "--out", str(artifact)])
    assert profiled.exit_code == 0, profiled.output
    result = runner.invoke(
        app, ["calibrate", str(model), "--data", str(data), *CALIBRATE_ARGS, "--out", str(artifact), "--targets", "0.5,0.7", "--json"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    measured = Artifact.load(artifact).stages["profile"]["measured_cost"]
    assert summary["cost_model"] == measured  # the profile's latency, not FLOPs
    assert any("measured by `profile`" in note for note in summary["notes"])
    assert [t["target"] for t in summary["other_targets"]] == [0.5, 0.7]
    # --cost flops ignores the profile.
    result = runner.invoke(
        app, ["calibrate", str(model), "--data", str(data), *CALIBRATE_ARGS, "--cost", "flops", "--out", str(artifact), "--json"]
    )
    assert json.loads(result.stdout)["cost_model"]["unit"] == "FLOPs/token"


def test_a_profile_taken_before_pruning_is_stale():
    from dyninfer.core.artifacts import BaseModelInfo
    from dyninfer.core.cost import profile_is_stale

    artifact = Artifact(
        BaseModelInfo.from_dict(
            {"spec": "m", "content_hash": "0" * 64, "architecture": "llama", "num_layers": 3, "hidden_size": 32, "vocab_size": 128}
        )
    )
    assert not profile_is_stale(artifact)  # no profile at all
    artifact.set_stage("profile", {"pruned": False, "measured_cost": {}})
    assert not profile_is_stale(artifact)
    artifact.set_stage("prune", {"plan": {}})
    assert profile_is_stale(artifact)
    artifact.set_stage("profile", {"pruned": True, "measured_cost": {}})
    assert not profile_is_stale(artifact)


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "mamba"])  # Mamba's scan is no matmul formula
def test_the_cost_models_decode_step_matches_a_hand_count(arch):
    """One decode step at CONTEXT cached tokens, from the config alone: projections, attention over CONTEXT + 1
    keys, the MLP and the head (2 FLOPs per multiply-add), and each rotary table's inv_freq x position product."""
    lm = LayeredModel(tiny_model(arch))
    c = lm.config
    if arch == "gpt2":
        d, heads, inner = c.n_embd, c.n_head, c.n_inner or 4 * c.n_embd
        layer = 2 * d * 3 * d + 2 * d * d + 2 * 2 * d * inner + 2 * 2 * d * (CONTEXT + 1)
        rotary = 0
    else:
        d, heads, kv, inter = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size
        hd = getattr(c, "head_dim", None) or d // heads
        projections = 2 * d * heads * hd * 2 + 2 * d * kv * hd * 2  # q and o, k and v
        layer = projections + 2 * 2 * heads * hd * (CONTEXT + 1) + 3 * 2 * d * inter
        rotary = (2 if arch == "gemma3" else 1) * 2 * (hd // 2)  # Gemma 3: a local and a global table
    expected = c.num_hidden_layers * layer + 2 * d * VOCAB + rotary
    assert count_costs(lm, context=CONTEXT).full_cost() == expected

"""The model families dyninfer knows by name and the ones its tests check, with the stages each supports.

Pure data, importable without torch: `dyninfer models` prints `support_table()`, and
tests/test_families.py builds every type listed here.
"""

from __future__ import annotations

# Family names kept from before structural recognition (artifacts record them).
FAMILY_NAMES = {"gemma3_text": "gemma3"}


def family_of(model_type: str) -> str:
    return FAMILY_NAMES.get(model_type, model_type)


# --- the families the tests build and check, and which stages apply to each (`dyninfer models`) ---
# tests/test_families.py builds each from its config class: the last layer's logit lens equals the model's
# forward, full-depth dynamic decoding equals transformers' greedy generate, CALM propagation writes the
# layer's own K/V, calibrate and run, steering, and pruning where it applies (test_adapters.py and
# test_dynamic.py hold GPT-2 and Mamba to the same).
STANDARD_LAYOUT_TESTED = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "olmo",
    "olmo2",
    "granite",
    "smollm3",
    "cohere",
    "cohere2",
    "stablelm",
    "glm",
    "glm4",
    "starcoder2",
    "helium",
    "ministral",
    "seed_oss",
    "exaone4",
    "hunyuan_v1_dense",
    "ernie4_5",
    "arcee",
    "nemotron",
    "apertus",
    "vaultgemma",
    "bitnet",
    "phi",
    "diffllama",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "granitemoe",
    "gpt_oss",
    "ernie4_5_moe",
    "hunyuan_v1_moe",
    "dots1",
    "glm4_moe",
    "deepseek_v2",
    "deepseek_v3",
)
# Why MLP pruning does not apply (the other stages do).
NO_PRUNING = {
    **dict.fromkeys(
        (
            "mixtral",
            "qwen2_moe",
            "qwen3_moe",
            "olmoe",
            "granitemoe",
            "gpt_oss",
            "ernie4_5_moe",
            "hunyuan_v1_moe",
            "dots1",
            "glm4_moe",
            "deepseek_v2",
            "deepseek_v3",
        ),
        "mixture-of-experts MLP",
    ),
    **dict.fromkeys(("arcee", "nemotron", "bitnet"), "relu2 activation: no sparse kernel"),
    "apertus": "xielu activation: no sparse kernel",
    "mamba": "no MLP block (state-space mixer)",
}
# ONNX export checked against the torch dynamic model (tests/test_export.py).
EXPORT_TESTED = ("llama", "qwen2", "mistral", "gemma3_text", "gpt2", "qwen3", "phi3", "gemma2", "olmo2", "granite")
NO_EXPORT = {"mamba": "a recurrent state, not a KV cache"}


TESTED_MODEL_TYPES = frozenset((*STANDARD_LAYOUT_TESTED, "gpt2", "mamba"))
TESTED_FAMILIES = frozenset(family_of(t) for t in TESTED_MODEL_TYPES)


def support_table() -> list[dict[str, str]]:
    """One row per tested model type: its family, layout, and whether each stage applies."""
    rows = []
    for model_type in (*STANDARD_LAYOUT_TESTED, "gpt2", "mamba"):
        layout = "standard rotary" if model_type in STANDARD_LAYOUT_TESTED else "named adapter"
        export = "yes" if model_type in EXPORT_TESTED else f"no: {NO_EXPORT[model_type]}" if model_type in NO_EXPORT else "untested"
        prune = f"no: {NO_PRUNING[model_type]}" if model_type in NO_PRUNING else "yes"
        rows.append(
            {
                "model_type": model_type,
                "family": family_of(model_type),
                "layout": layout,
                "probe, calibrate, run, bench, profile, steer": "yes",
                "prune": prune,
                "export": export,
            }
        )
    return rows

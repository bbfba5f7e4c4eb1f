"""Checks every command's Config shares: the seed, a stop rule's setting, options its mode never reads."""

from __future__ import annotations

from dyninfer.core.choices import (
    STOP_WORKLOADS,
)
from dyninfer.core.errors import DyninferError, check_choice, check_seed, option


def check_config_seed(config) -> None:
    if hasattr(config, "seed"):
        check_seed(config.seed)


def check_stop_setting(config) -> None:
    """A stop rule is certified on greedy decoding, one prompt at a time, in the full or early-exit mode."""
    if config.stop is None:
        return
    check_choice("stop", config.stop, STOP_WORKLOADS)
    if config.mode == "speculative" or getattr(config, "sample", False):
        raise DyninferError(
            f"{option('stop')} obeys a rule certified on greedy decoding in the full or early-exit mode; "
            "drop it, or the sampling or speculation"
        )


def refuse_unused(config, defaults) -> None:
    """Refuse an option set away from its default where the chosen mode or backend never reads it (it would be
    silently ignored)."""
    unused = []
    mode, backend, sample = getattr(config, "mode", "speculative"), config.backend, getattr(config, "sample", True)
    if mode != "speculative":
        unused += [(name, f"{option('mode')} {mode}") for name in ("draft_layer", "draft_threshold")]
    if backend == "onnx":
        unused += [(name, f"{option('backend')} onnx (the package runs the KV mode it was exported with)") for name in ("kv_mode",)]
    else:
        unused += [(name, f"{option('backend')} {backend}") for name in ("provider", "package", "genai_python")]
    if not sample:
        unused.append(("temperature", "greedy decoding (pass `sample` to sample)"))
    for name, where in unused:
        if hasattr(config, name) and getattr(config, name) != getattr(defaults, name):
            raise DyninferError(f"{option(name)} does not apply to {where}; leave it out or change the mode")

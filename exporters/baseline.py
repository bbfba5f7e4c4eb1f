"""The reference a user would deploy without dyninfer: optimum's ORTModelForCausalLM on the
plain model, exported by `dyninfer export` into the package's baseline/ folder."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dyninfer.core.choices import PROVIDER_NAMES
from dyninfer.core.errors import DyninferError
from dyninfer.runtime.package_format import read_package


@dataclass
class OptimumBaseline:
    model: object  # optimum.onnxruntime.ORTModelForCausalLM
    folder: Path | None = None  # the export it was loaded from

    @torch.no_grad()
    def greedy(self, prompt: torch.Tensor, new_tokens: int, timing: dict | None = None) -> torch.Tensor:
        """Greedy decoding, exactly `new_tokens` tokens, driving optimum's forward (its own KV handling).

        A plain loop, not `generate()`: generate's per-step logits processing and stopping
        checks cost ~17% of the step on this model on 2 CPU cores (22.4 vs 26.7 tokens/s), and
        the baseline should be the fastest way to run optimum's model. `timing` receives the prefill's seconds.
        """
        ids, mask, past, out = prompt, torch.ones_like(prompt), None, []
        started = time.perf_counter()
        for _ in range(new_tokens):
            step = self.model(input_ids=ids, attention_mask=mask, past_key_values=past, use_cache=True)
            past = step.past_key_values
            ids = step.logits[:, -1].argmax(-1, keepdim=True)
            out.append(ids)
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
            if timing is not None and len(out) == 1:
                timing["prefill_seconds"] = time.perf_counter() - started
        return torch.cat(out, dim=1)


def load_optimum_baseline(package, provider: str, full: bool = False) -> OptimumBaseline:
    """Load the package's optimum export (at the package's precision; `full`: a quantized package's float one) with
    optimum on `provider` (an ONNX Runtime provider name)."""
    manifest = read_package(package)
    folder = manifest.baseline_full if full else manifest.baseline
    if not folder:
        raise DyninferError(f"the package at '{package}' has no optimum baseline; re-run `dyninfer export` with `baseline`")
    from optimum.onnxruntime import ORTModelForCausalLM

    folder = manifest.path / folder
    try:
        model = ORTModelForCausalLM.from_pretrained(
            folder, provider=provider, use_cache=True, use_io_binding=provider == PROVIDER_NAMES["cuda"]
        )
    except Exception as exc:
        raise DyninferError(
            f"optimum could not load the baseline in '{folder}': {' '.join(str(exc).split())[:300]}; re-run `dyninfer export`"
        ) from exc
    return OptimumBaseline(model, folder)

"""The reference a user would deploy without dyninfer: optimum's ORTModelForCausalLM on the
plain model, exported by `dyninfer export` into the package's baseline/ folder."""

from __future__ import annotations

from dataclasses import dataclass
import torch

from dyninfer.errors import DyninferError
from dyninfer.exporters.runtime import find_package, read_package


@dataclass
class OptimumBaseline:
    model: object  # optimum.onnxruntime.ORTModelForCausalLM

    @torch.no_grad()
    def greedy(self, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Greedy decoding through optimum's generate(), exactly `new_tokens` tokens."""
        out = self.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        return out[:, prompt.shape[1]:]


def load_optimum_baseline(package, provider: str) -> OptimumBaseline:
    """Load baseline/ with optimum on `provider` (an ONNX Runtime provider name)."""
    manifest = read_package(package)
    if not manifest.get("baseline"):
        raise DyninferError(f"the package at '{package}' has no optimum baseline; re-run `dyninfer export` "
                            "without --no-baseline")
    from optimum.onnxruntime import ORTModelForCausalLM

    folder = find_package(package) / manifest["baseline"]
    try:
        model = ORTModelForCausalLM.from_pretrained(folder, provider=provider, use_cache=True,
                                                    use_io_binding=provider == "CUDAExecutionProvider")
    except Exception as exc:  # noqa: BLE001 - optimum raises many kinds
        raise DyninferError(f"optimum could not load the baseline in '{folder}': "
                            f"{' '.join(str(exc).split())[:300]}; re-run `dyninfer export`") from exc
    return OptimumBaseline(model)

"""What one generation run returns, whichever backend ran it (torch or ONNX Runtime).

Kept free of torch so that the ONNX runtime needs only numpy and onnxruntime.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class GenerationResult:
    tokens: Any  # [batch, new tokens]: a torch.Tensor (torch backend) or a numpy array (onnx)
    exit_layers: list[int]  # per generated step (shared by the batch); num_layers = no exit
    confidences: list[float | None]
    seconds: float
    mode: str
    num_layers: int
    drafted: int = 0
    accepted: int = 0
    draft_fallbacks: int = 0  # drafts the restricted draft head was unsure of, scored again with the full head
    notes: list[str] = field(default_factory=list)
    logits: list | None = None  # per step [batch, vocab], when asked for (parity checks)
    stop: dict | None = None  # with a stop rule: why generation ended (rule, answered, budget, end of sequence), probes

    @property
    def new_tokens(self) -> int:
        return self.tokens.shape[1]

    @property
    def tokens_per_s(self) -> float:
        count = self.tokens.shape[0] * self.tokens.shape[1]
        return count / self.seconds if self.seconds > 0 else float("inf")

    @property
    def mean_exit_layer(self) -> float:
        return sum(self.exit_layers) / max(len(self.exit_layers), 1)

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

"""Exit confidence measures (CALM): higher always means "more sure the exit is right".

- softmax: the exit head's max probability;
- margin: top-1 minus top-2 probability;
- entropy: 1 - H(p) / log(V), so a one-hot distribution scores 1;
- saturation: cosine between this exit point's hidden state and the previous layer's
  (no head needed, so it costs almost nothing);
- classifier: CALM's "meta" classifier, a logistic regression per exit point on the
  normalised hidden state, trained to predict "this layer's top-1 equals the final top-1"
  (no head needed either).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from dyninfer.core.choices import MEASURES
from dyninfer.core.distributed import World
from dyninfer.core.errors import DyninferError


def check_measure(measure: str) -> str:
    if measure not in MEASURES:
        raise DyninferError(f"unknown confidence measure '{measure}'; choose from: {', '.join(MEASURES)}")
    return measure


def max_probability(logits: torch.Tensor) -> torch.Tensor:
    """The max probability of each row's distribution ([..., V] -> [...]): the softmax measure, and the score stop
    rules read (the runtime computes it, and the exported step outputs it, with this function)."""
    return torch.softmax(logits.float(), dim=-1).amax(dim=-1)


def from_logits(measure: str, logits: torch.Tensor) -> torch.Tensor:
    """Confidence per row of `logits` ([..., V])."""
    if measure == "softmax":
        return max_probability(logits)
    probs = torch.softmax(logits.float(), dim=-1)
    if measure == "margin":
        top2 = probs.topk(2, dim=-1).values
        return top2[..., 0] - top2[..., 1]
    if measure == "entropy":
        entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)
        return 1.0 - entropy / math.log(logits.shape[-1])
    raise ValueError(f"{measure} is not computed from logits")


def saturation(previous: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(previous.float(), current.float(), dim=-1)


class ExitClassifier(nn.Module):
    """One logistic regression per exit point on the final-norm'd hidden state."""

    def __init__(self, n_points: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_points, hidden_size))
        self.bias = nn.Parameter(torch.zeros(n_points))

    def forward(self, point: int, normed: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(normed.float() @ self.weight[point] + self.bias[point])

    def fit(
        self,
        features: list[torch.Tensor],
        labels: list[torch.Tensor],
        steps: int = 200,
        lr: float = 0.05,
        l2: float = 1e-2,
        world: World = World(),
    ) -> None:
        """Class-balanced logistic regression per exit point (full-batch Adam; features are small).

        The L2 penalty keeps the weights from growing without bound where a few thousand tokens are
        separable in d dimensions: unpenalised, the logits reach 20-30 and the float32 sigmoid
        saturates at exactly 1, so no threshold can tell the surest exits apart.

        Data-parallel (`world`): each rank holds its share of the tokens; class balance and the
        mean are taken over all of them and the gradients summed (DDP's scheme), so every rank
        takes the step one process would on all the tokens.
        """
        self.to(features[0].device)  # float32 master weights, beside the features (the model's device)
        counts = world.sum(np.array([[float(y.sum()), y.numel()] for y in labels]))  # [points, (positive, all)]
        optimiser = torch.optim.Adam(self.parameters(), lr=lr)
        for _ in range(steps):
            optimiser.zero_grad(set_to_none=True)
            loss = 0.0
            for point, (x, y) in enumerate(zip(features, labels)):
                y = y.float()
                positive, total = float(counts[point][0]), float(counts[point][1])
                share = min(max(positive / total, 1e-3), 1 - 1e-3)
                weights = torch.where(y > 0.5, 0.5 / share, 0.5 / (1 - share))
                logits = x.float() @ self.weight[point] + self.bias[point]
                bce = nn.functional.binary_cross_entropy_with_logits(logits, y, weight=weights, reduction="sum")
                loss = loss + bce / total + l2 * self.weight[point].square().sum() / world.size
            loss.backward()
            world.sum_gradients(self.parameters())
            optimiser.step()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"classifier.weight": self.weight.detach().cpu().contiguous(), "classifier.bias": self.bias.detach().cpu().contiguous()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], points: int | None = None, hidden_size: int | None = None) -> ExitClassifier:
        """The classifier an artifact holds, checked against the policy's exit points and the model's width."""
        weight, bias = tensors.get("classifier.weight"), tensors.get("classifier.bias")
        shape = tuple(weight.shape) if weight is not None else ()
        expected = (points or (shape[0] if shape else 0), hidden_size or (shape[1] if len(shape) == 2 else 0))
        if weight is None or bias is None or shape != expected or tuple(bias.shape) != expected[:1]:
            found = "none" if weight is None or bias is None else f"{shape} and {tuple(bias.shape)}"
            raise DyninferError(
                f"the artifact's exit classifier does not fit its policy (weights {found}, expected "
                f"{expected}); run `dyninfer calibrate` into it again"
            )
        model = cls(weight.shape[0], weight.shape[1])
        with torch.no_grad():
            model.weight.copy_(weight)
            model.bias.copy_(bias)
        return model

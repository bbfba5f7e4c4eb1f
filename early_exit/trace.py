"""Teacher-forced traces and what a threshold does on them.

`trace_exits` runs windows through the full model and records, per exit point and token, the
confidence and whether the exit's prediction equals the full model's (and the true next token).
`simulate` applies the exit rule (rule.py) to a trace at one threshold and prices every token with the
cost model; `window_losses` turns a simulation into Learn-then-Test's per-window losses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dyninfer.core import distributed
from dyninfer.core.choices import HEAD_MEASURES, STATE_MEASURES, TEACHER_FORCED_RISKS
from dyninfer.core.cost import CostModel
from dyninfer.core.layered import LayeredModel
from dyninfer.core.policies import ExitPolicy
from dyninfer.core.progress import ProgressFn, silent
from dyninfer.early_exit import confidence as conf
from dyninfer.early_exit.rule import first_exit


@dataclass
class Trace:
    """Teacher-forced record per exit point (rows) and token (columns)."""

    points: list[int]
    confidence: torch.Tensor  # [P, N]
    agrees: torch.Tensor  # [P, N] exit top-1 == final top-1
    correct: torch.Tensor  # [P, N] exit top-1 == true next token
    final_correct: torch.Tensor  # [N]

    def subset(self, rows: list[int]) -> Trace:
        return Trace([self.points[r] for r in rows], self.confidence[rows], self.agrees[rows], self.correct[rows], self.final_correct)


@torch.no_grad()
def trace_exits(
    lm: LayeredModel,
    windows: torch.Tensor,
    points: list[int],
    lens,
    measure: str,
    *,
    classifier: conf.ExitClassifier | None = None,
    vocab_top_k: int = 0,
    batch_size: int = 2,
    first: int = 0,
    progress: ProgressFn | None = None,
) -> Trace:
    """Run `windows` (teacher forcing) and record confidence and agreement at each point.

    `first`: record only the predictions from this input position on (a prompt's continuation).
    In a data-parallel run each rank traces its share of the windows and every rank gets the
    whole trace, in window order.
    """
    options = dict(classifier=classifier, vocab_top_k=vocab_top_k, batch_size=batch_size, first=first, progress=progress)
    world = distributed.current()
    if world.size == 1:
        return _trace_local(lm, windows, points, lens, measure, **options)
    n = windows.shape[0]
    own = _trace_local(lm, windows[world.shard(n, "windows")], points, lens, measure, **options)
    tokens = world.gather_window_columns
    return Trace(
        list(points),
        tokens(own.confidence.cpu(), n),
        tokens(own.agrees.cpu(), n),
        tokens(own.correct.cpu(), n),
        tokens(own.final_correct.cpu(), n, dim=0),
    )


def _trace_local(
    lm: LayeredModel,
    windows: torch.Tensor,
    points: list[int],
    lens,
    measure: str,
    *,
    classifier: conf.ExitClassifier | None,
    vocab_top_k: int,
    batch_size: int,
    first: int,
    progress: ProgressFn | None,
) -> Trace:
    """`trace_exits` on this process's windows."""
    report = progress or silent
    if measure not in HEAD_MEASURES:
        vocab_top_k = 0  # state measures compute no logits to prune; the exit uses the full head
    cols: dict[str, list[torch.Tensor]] = {"confidence": [], "agrees": [], "correct": [], "final": []}
    n_batches = (windows.shape[0] + batch_size - 1) // batch_size
    for b, start in enumerate(range(0, windows.shape[0], batch_size)):
        batch = windows[start : start + batch_size]
        inputs, targets = batch[:, :-1], batch[:, 1 + first :].reshape(-1)
        states = [h[:, first:].reshape(-1, h.shape[-1]) for _, h in lm.hidden_states(inputs)]
        final_top1 = lm.logits_from(states[-1]).argmax(-1)
        confidence, agrees, correct = [], [], []
        candidates = None
        for row, index in enumerate(points):
            hidden = states[index]
            logits = lens.logits(index, hidden)
            if vocab_top_k and candidates is not None:
                # Dynamic vocabulary pruning: later checks only score the first check's top-K
                # (gathering from full logits gives exactly those K logits).
                logits = logits.gather(1, candidates)
                top1 = candidates.gather(1, logits.argmax(-1, keepdim=True)).squeeze(1)
            else:
                top1 = logits.argmax(-1)
                if vocab_top_k:
                    candidates = logits.topk(vocab_top_k, dim=-1).indices
            c = conf.from_logits(measure, logits) if measure in HEAD_MEASURES else None
            if measure == "saturation":
                c = conf.saturation(states[index - 1], hidden)
            elif measure == "classifier":
                c = classifier(row, lm.final_norm(hidden))
            confidence.append(c.float())
            agrees.append(top1 == final_top1)
            correct.append(top1 == targets)
        n = final_top1.numel()
        cols["confidence"].append(torch.stack(confidence) if points else torch.empty(0, n))
        cols["agrees"].append(torch.stack(agrees) if points else torch.empty(0, n, dtype=torch.bool))
        cols["correct"].append(torch.stack(correct) if points else torch.empty(0, n, dtype=torch.bool))
        cols["final"].append(final_top1 == targets)
        report("tracing exits", b + 1, n_batches)
    return Trace(
        list(points),
        torch.cat(cols["confidence"], 1),
        torch.cat(cols["agrees"], 1),
        torch.cat(cols["correct"], 1),
        torch.cat(cols["final"]),
    )


def check_cost(costs: CostModel, measure: str, translated: bool, first: bool, vocab_top_k: int, d: int) -> float:
    """Cost of one confidence check at an exit point (in the cost model's unit)."""
    if measure in STATE_MEASURES:
        return costs.check(measure, d)
    extra = costs.translator if translated else 0.0
    if vocab_top_k and not first:
        return extra + costs.norm + vocab_top_k * costs.check("head_row", d)
    return extra + costs.norm + costs.head


def exit_costs(
    costs: CostModel, points: list[int], measure: str, translated: bool, vocab_top_k: int, hidden_size: int
) -> tuple[list[float], float]:
    """(cost of a token that leaves at each point, cost of one that runs the full depth), checks included."""
    cumulative_layers = np.concatenate([[0.0], np.cumsum(costs.layers)])
    check = [check_cost(costs, measure, translated, r == 0, vocab_top_k, hidden_size) for r in range(len(points))]
    cumulative_checks = np.concatenate([[0.0], np.cumsum(check)])
    exit_extra = 0.0 if measure in HEAD_MEASURES else costs.norm + costs.head + (costs.translator if translated else 0.0)
    full = costs.full_cost() + cumulative_checks[-1]  # a token that never exits paid every check
    return [float(costs.embed + cumulative_layers[p] + cumulative_checks[r + 1] + exit_extra) for r, p in enumerate(points)], float(full)


@dataclass
class Simulation:
    """Outcome of one threshold on a trace: where tokens exit and what it costs."""

    exit_row: torch.Tensor  # [N] row of the exit point used, or -1 for the full model
    consistent: torch.Tensor  # [N]
    correct: torch.Tensor  # [N]
    cost: torch.Tensor  # [N] FLOPs


def simulate(
    trace: Trace, threshold: float | None, costs: CostModel, measure: str, translated: bool, vocab_top_k: int, hidden_size: int
) -> Simulation:
    n_points, n = trace.confidence.shape
    first = first_exit(trace.confidence, threshold)
    point_cost, full = exit_costs(costs, trace.points, measure, translated, vocab_top_k, hidden_size)
    cost = torch.full((n,), float(full), dtype=torch.float64)
    consistent = torch.ones(n, dtype=torch.bool)
    correct = trace.final_correct.clone()
    for r in range(n_points):
        chosen = first == r
        cost[chosen] = point_cost[r]
        consistent[chosen] = trace.agrees[r][chosen]
        correct[chosen] = trace.correct[r][chosen]
    return Simulation(first, consistent, correct, cost)


def exit_layers(sim: Simulation, trace: Trace, num_layers: int) -> torch.Tensor:
    """The layer each token left at (num_layers for tokens that ran the full model)."""
    points = torch.tensor(trace.points + [num_layers])
    return points[sim.exit_row]  # row -1 picks the appended full depth


def window_losses(sim: Simulation, trace: Trace, risk: str, windows: int) -> np.ndarray:
    """Per-window losses (LTT's examples): the rate of inconsistent (or wrongly exited) tokens in each window.

    A window is the exchangeable unit: windows are drawn at random from the corpus, while the tokens
    (and any blocks) of one window are correlated, so they never count as separate examples.
    """
    if risk == TEACHER_FORCED_RISKS[0]:
        per_token = (~sim.consistent).double()
    else:  # accuracy drop: the exit is wrong where the full model was right
        per_token = (~sim.correct & trace.final_correct).double()
    return per_token.reshape(windows, -1).mean(1).cpu().numpy()


def evaluate(trace: Trace, threshold: float | None, costs: CostModel, policy: ExitPolicy, d: int) -> dict:
    sim = simulate(trace, threshold, costs, policy.measure, policy.lens == "tuned", policy.vocab_top_k, d)
    layers = exit_layers(sim, trace, costs.num_layers)
    histogram = {str(p): float((layers == p).double().mean()) for p in policy.exit_points + [costs.num_layers]}
    return {
        "consistency": float(sim.consistent.double().mean()),
        "accuracy": float(sim.correct.double().mean()),
        "predicted_speedup": float(costs.full_cost() / sim.cost.mean()),
        "mean_exit_layer": float(layers.double().mean()),
        "exit_distribution": histogram,
        "tokens": int(sim.cost.numel()),
    }

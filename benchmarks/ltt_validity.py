"""Does the generation (or fidelity) guarantee hold? Random calibration/test splits of a pool of prompts.

    python benchmarks/ltt_validity.py --pool 256 --splits 40 --kv-modes propagate --out ltt-validity.json
    python benchmarks/ltt_validity.py --risk fidelity --pool 256 --splits 100 --kv-modes propagate --grid-size 8 --out f.json

With `--risk fidelity` a prompt's loss is the share of its continuation's positions where the dynamic model, fed the
full model's continuation (teacher-forced, each row exiting as it would alone: `calibrate --risk fidelity`'s
definition), picks another top-1 token than the full model; a split violates when its test half's mean loss exceeds
1 - target. The p-value is the one production uses for shares (`--p-value`, default betting: Waudby-Smith-Ramdas,
on the calibration half in its drawn order).

One pool of prompts (each the start of its own random window of the corpus; the tuned lens and
the fit windows that choose the exit points are kept out of it) is continued once by the full
model. The candidate thresholds come from the fit windows alone, as in `calibrate`. Then each
split draws a random half of the pool for calibration: Learn-then-Test (fixed sequence,
Hoeffding-Bentkus) certifies a threshold on it, and the other half measures the consistency of
that threshold's generations. A split *violates* when its test consistency falls below the
target. The guarantee says a violation of the population risk has probability at most epsilon;
the test half adds its own sampling noise, so this check is, if anything, strict.

Every split needs a candidate's per-prompt losses only up to its first candidate not rejected,
and a prompt's loss under a threshold does not depend on the split: each candidate is generated
once over the whole pool (batched, each prompt exiting as it would alone), and only as far as
some split still needs. The losses are cached in `--cache`, so a rerun with other splits is free.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from provenance import provenance
from scipy import stats

from dyninfer.certification.exits import PromptSet, fit_sequences, full_continuations, generate_and_score
from dyninfer.certification.fidelity import measure_fidelity, rows_logits
from dyninfer.compressors.ltt import SHARE_P_VALUE, betting_p_value, hoeffding_bentkus_p_value
from dyninfer.core.choices import DEFAULT_MODEL
from dyninfer.core.cost import count_costs
from dyninfer.core.policies import ExitPolicy
from dyninfer.early_exit.plan import generation_grid, plan_exits
from dyninfer.runtime.dynamic import DynamicModel
from dyninfer.runtime.loader import open_workspace


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--data", default="builtin:pydocs")
    p.add_argument("--seq-len", type=int, default=128, help="window length; one prompt per window")
    p.add_argument("--pool", type=int, default=256)
    p.add_argument("--splits", type=int, default=40)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--target", type=float, default=0.95)
    p.add_argument("--epsilon", type=float, default=0.05)
    p.add_argument("--kv-modes", default="propagate,recompute", help="comma-separated; each gets its own splits")
    p.add_argument("--consistency", default="tokens", choices=("tokens", "prefix", "rougeL"))
    p.add_argument("--measure", default="classifier")
    p.add_argument("--lens-train-tokens", type=int, default=8192)
    p.add_argument("--fit-tokens", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--risk", default="generation", choices=("generation", "fidelity"))
    p.add_argument(
        "--grid-size",
        type=int,
        default=24,
        help="candidates in calibrate's grid (exit shares 5e-4 to 0.5 of the fit tokens, geometric): fewer, coarser steps "
        "reach the target's risk sooner (where no candidate reaches it, every split certifies its loosest and the check "
        "cannot fail)",
    )
    p.add_argument("--p-value", default=SHARE_P_VALUE, choices=("betting", "hoeffding-bentkus"), help="default: production's")
    p.add_argument("--cache", type=Path, default=None, help="npz of the pool's losses (reused when it matches)")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args()


def _p_value(losses: np.ndarray, delta: float, epsilon: float, method: str) -> float:
    if method == "betting":  # in the calibration half's drawn order, as production reads its prompts
        return betting_p_value(losses, delta, epsilon)
    return hoeffding_bentkus_p_value(float(losses.mean()), losses.size, delta)


def split_states(losses: list[np.ndarray], halves: list[np.ndarray], delta: float, epsilon: float, method: str) -> list[dict]:
    """Fixed-sequence testing per split over the candidates computed so far."""
    states = []
    for cal in halves:
        chosen, open_ = None, True
        for j, row in enumerate(losses):
            if _p_value(row[cal], delta, epsilon, method) > epsilon:
                open_ = False
                break
            chosen = j
        states.append({"chosen": chosen, "open": open_})
    return states


def validity(args, key: dict, lm, lens, plan, thresholds: list[float], pool: PromptSet, kv_mode: str) -> dict:
    """Generate candidates over the pool as far as some split needs, then judge every split."""
    delta = 1.0 - args.target
    cache = args.cache.with_name(f"{args.cache.stem}-{kv_mode}.npz") if args.cache else None
    losses: list[np.ndarray] = [np.zeros(args.pool)]  # the strictest candidate never exits
    if cache and cache.exists():
        cached = np.load(cache, allow_pickle=False)
        if json.loads(str(cached["key"])) == key:
            losses = list(cached["losses"])
    policy = ExitPolicy("tuned", args.measure, plan.points, None, 0, kv_mode)
    dynamic = DynamicModel(lm, policy, lens, plan.classifier)
    rng = np.random.default_rng(args.seed)
    halves = [rng.permutation(args.pool)[: args.pool // 2] for _ in range(args.splits)]  # each in its drawn order
    generation_s = 0.0
    method = args.p_value
    while len(losses) < len(thresholds) and any(s["open"] for s in split_states(losses, halves, delta, args.epsilon, method)):
        j = len(losses)
        policy.threshold = thresholds[j]
        t0 = time.perf_counter()
        if args.risk == "fidelity":
            prompt_set = (pool.prompts.numpy(), pool.continuations.numpy())
            run = measure_fidelity(rows_logits(dynamic), lm, prompt_set, thresholds[j], batch_size=args.batch_size)
            losses.append(run.disagree.mean(axis=1))
        else:
            losses.append(1.0 - generate_and_score(dynamic, pool, args.consistency, args.batch_size).scores)
        generation_s += time.perf_counter() - t0
        print(
            f"{kv_mode} candidate {j}/{len(thresholds) - 1}: threshold {thresholds[j]:.7g}, pool {args.risk} "
            f"{1 - losses[-1].mean():.4f} ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
        if cache:
            np.savez(cache, losses=np.stack(losses), key=json.dumps(key))
    states = split_states(losses, halves, delta, args.epsilon, method)
    rows = []
    for cal, state in zip(halves, states):
        test = np.setdiff1d(np.arange(args.pool), cal)
        j = state["chosen"]
        consistency = 1.0 - float(losses[j][test].mean())
        rows.append(
            {
                "chosen_index": j,
                "threshold": thresholds[j],
                "calibration_consistency": 1.0 - float(losses[j][cal].mean()),
                "test_consistency": consistency,
                "violates": consistency < args.target,
            }
        )
    violations = sum(r["violates"] for r in rows)
    return {
        "candidates_generated": len(losses) - 1,
        "pool_consistency": [1.0 - float(row.mean()) for row in losses],
        "splits": rows,
        "violations": violations,
        "violation_rate": violations / args.splits,
        # If each split violated with probability epsilon, this many or more would happen with this probability:
        "binomial_tail_at_epsilon": float(stats.binom.sf(violations - 1, args.splits, args.epsilon)) if violations else 1.0,
        "allowed_at_95pct": int(stats.binom.ppf(0.95, args.splits, args.epsilon)),
        "chosen_indices": sorted({r["chosen_index"] for r in rows}),
        "mean_test_consistency": float(np.mean([r["test_consistency"] for r in rows])),
        "min_test_consistency": float(np.min([r["test_consistency"] for r in rows])),
        "generation_s": generation_s,
    }


def main() -> None:
    args = parse()
    started = time.perf_counter()
    ws = open_workspace(args.model, args.data, seq_len=args.seq_len, seed=args.seed)
    lm, windows = ws.lm, ws.windows
    lens, _ = ws.tuned_lens(train_tokens=args.lens_train_tokens, seed=args.seed)
    n_lens = math.ceil(args.lens_train_tokens / args.seq_len)
    n_fit = math.ceil(args.fit_tokens / args.seq_len)
    order = windows.order("train")
    fit = windows.train[order[n_lens : n_lens + n_fit]]
    rest = [windows.train[order[n_lens + n_fit :]], windows.heldout[windows.order("heldout")]]
    pool_windows = torch.cat(rest)[: args.pool]
    if pool_windows.shape[0] < args.pool:
        raise SystemExit(f"only {pool_windows.shape[0]} windows left for the pool; lower --pool or --seq-len")
    costs = count_costs(lm, context=args.seq_len)
    sequences = fit_sequences(lm, fit, args.prompt_tokens, args.new_tokens, args.batch_size)
    plan = plan_exits(lm, lens, costs, sequences, targets=[args.target], measure=args.measure, first=args.prompt_tokens - 1).plans[0]
    thresholds = generation_grid(plan.fit_trace, size=args.grid_size)
    prompts = pool_windows[:, : args.prompt_tokens]
    key = dict(
        model=args.model,
        data=args.data,
        seq_len=args.seq_len,
        pool=args.pool,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        consistency=args.consistency if args.risk == "generation" else "top1",
        measure=args.measure,
        target=args.target,
        seed=args.seed,
        points=plan.points,
        thresholds=thresholds,
        risk=args.risk,
        p_value=args.p_value,
    )
    reference = full_continuations(lm, prompts, args.new_tokens, args.batch_size)
    pool = PromptSet(prompts, reference)
    setup_s = time.perf_counter() - started
    result = {
        "provenance": provenance(),
        "config": vars(args) | {"cache": str(args.cache), "out": str(args.out)},
        "exit_points": plan.points,
        "thresholds": thresholds,
        "setup_s": setup_s,
        "modes": {},
    }
    for kv_mode in args.kv_modes.split(","):
        result["modes"][kv_mode] = validity(args, key | {"kv_mode": kv_mode}, lm, lens, plan, thresholds, pool, kv_mode)
    result["total_s"] = time.perf_counter() - started
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text)
    brief = {mode: {k: v for k, v in r.items() if k != "splits"} for mode, r in result["modes"].items()}
    print(json.dumps(brief, indent=2))


if __name__ == "__main__":
    main()

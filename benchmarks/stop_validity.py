"""Does the stop rule's guarantee hold? Random fit/calibration/test splits of a pool of completion prompts.

    python benchmarks/stop_validity.py --data builtin:stdlib-code --pool 640 --splits 40 --out stop-validity.json

One pool of prompts (the starts of random windows of the corpus, train and held-out splits alike) is
completed once by the full model, greedily; every stop rule's decisions are prefixes of those
completions, so a split costs no generation. Each split draws, at random and disjoint: fit prompts (they
choose the signal and the candidate thresholds, as `dyninfer stop` does), calibration prompts
(Learn-then-Test certifies a threshold on them) and test prompts (the rest: they measure the certified
rule's loss). A split *violates* when the test loss, the mean share of value lost over the valuable test
completions, exceeds delta = 1 - target. The guarantee says that happens with probability at most
epsilon; the test prompts add their own sampling noise, so the check is, if anything, strict. The
empirical choice (the loosest threshold whose calibration loss alone meets the target, no test) is
judged the same way beside it: it shows the check can fail.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from provenance import provenance
from scipy import stats

from dyninfer.compressors.stop_certify import certify, choose_signal, empirical_choice
from dyninfer.compressors.stop_obey import completion_scores as signal_scores
from dyninfer.compressors.stop_simulate import CompletionRuns, completion_losses, shown_tokens
from dyninfer.core.choices import DEFAULT_MODEL
from dyninfer.core.choices import STOP_SIGNALS as SIGNALS
from dyninfer.profilers.stop_runs import completion_runs
from dyninfer.runtime.loader import build_dynamic, open_workspace


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--data", default="builtin:stdlib-code")
    p.add_argument("--pool", type=int, default=640)
    p.add_argument("--splits", type=int, default=40)
    p.add_argument("--fit", type=int, default=64)
    p.add_argument("--calibration", type=int, default=256)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--target", type=float, default=0.95)
    p.add_argument("--epsilon", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=None, help="npz of the pool's completions (reused when it matches)")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args()


def pool_runs(args) -> tuple[CompletionRuns, float]:
    key = json.dumps({k: getattr(args, k) for k in ("model", "data", "pool", "prompt_tokens", "new_tokens", "seed")})
    if args.cache and args.cache.exists():
        cached = np.load(args.cache, allow_pickle=False)
        if str(cached["key"]) == key:
            return CompletionRuns(cached["confidence"], cached["values"], cached["right"]), 0.0
    seq_len = args.prompt_tokens + args.new_tokens
    ws = open_workspace(args.model, args.data, seq_len=seq_len, seed=args.seed)
    windows = ws.windows
    rows = torch.cat([windows.train[windows.order("train")], windows.heldout[windows.order("heldout")]])
    rows = rows[torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(args.seed))][: args.pool]
    if rows.shape[0] < args.pool:
        raise SystemExit(f"the corpus has {rows.shape[0]} windows of {seq_len} tokens; lower --pool")
    dyn = build_dynamic(ws.artifact, ws.session, require_policy=False)
    started = time.perf_counter()
    runs = completion_runs(dyn.dynamic, rows[:, : args.prompt_tokens], rows[:, args.prompt_tokens :], batch_size=args.batch_size)
    seconds = time.perf_counter() - started
    if args.cache:
        np.savez(args.cache, confidence=runs.confidence, values=runs.values, right=runs.right, key=key)
    return runs, seconds


def test_loss(runs: CompletionRuns, signal: str, threshold: float | None) -> float:
    valued = runs.values[:, -1] > 0
    losses = completion_losses(runs.values, shown_tokens(signal_scores(runs.confidence, signal), threshold))
    return float(losses[valued].mean())


def main() -> None:
    args = parse()
    started = time.perf_counter()
    pool, generation_s = pool_runs(args)
    delta = 1.0 - args.target
    rng = np.random.default_rng(args.seed)
    rows = []
    for _ in range(args.splits):
        order = rng.permutation(pool.size)
        fit, cal, test = (
            pool.subset(order[: args.fit]),
            pool.subset(order[args.fit : args.fit + args.calibration]),
            pool.subset(order[args.fit + args.calibration :]),
        )
        signal, grid, _ = choose_signal("completion", fit, SIGNALS["completion"], args.target, args.epsilon)
        cert = certify("completion", cal, grid, signal, args.target, args.epsilon)
        naive = empirical_choice(cert.curve, args.target)
        loss = test_loss(test, signal, cert.threshold)
        naive_loss = test_loss(test, signal, naive["threshold"]) if naive else 0.0
        rows.append(
            {
                "signal": signal,
                "threshold": cert.threshold,
                "calibration_units": cert.ltt.n,
                "calibration_loss": cert.ltt.risks[cert.ltt.chosen_index] if cert.ltt.chosen_index is not None else None,
                "test_loss": loss,
                "test_tokens_saved": test.outcome(signal, cert.threshold)["tokens_saved"],
                "violates": loss > delta,
                "naive_test_loss": naive_loss,
                "naive_violates": naive_loss > delta,
            }
        )
    violations = sum(r["violates"] for r in rows)
    naive_violations = sum(r["naive_violates"] for r in rows)
    result = {
        "provenance": provenance(),
        "config": vars(args) | {"cache": str(args.cache), "out": str(args.out)},
        "pool_share_valued": float((pool.values[:, -1] > 0).mean()),
        "pool_mean_value": float(pool.values[:, -1].mean()),
        "splits": rows,
        "violations": violations,
        "violation_rate": violations / args.splits,
        "binomial_tail_at_epsilon": float(stats.binom.sf(violations - 1, args.splits, args.epsilon)) if violations else 1.0,
        "allowed_at_95pct": int(stats.binom.ppf(0.95, args.splits, args.epsilon)),
        "naive_violations": naive_violations,
        "mean_test_loss": float(np.mean([r["test_loss"] for r in rows])),
        "max_test_loss": float(np.max([r["test_loss"] for r in rows])),
        "mean_test_tokens_saved": float(np.mean([r["test_tokens_saved"] for r in rows])),
        "min_test_tokens_saved": float(np.min([r["test_tokens_saved"] for r in rows])),
        "signals": sorted({r["signal"] for r in rows}),
        "generation_s": generation_s,
    }
    result["total_s"] = time.perf_counter() - started
    text = json.dumps(result, indent=2, default=float)
    if args.out:
        args.out.write_text(text)
    print(json.dumps({k: v for k, v in result.items() if k != "splits"}, indent=2, default=float))


if __name__ == "__main__":
    main()

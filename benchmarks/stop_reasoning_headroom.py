"""How much a reasoning stop rule could save on the plain model, and what the probes cost (issue #30).

    python benchmarks/stop_reasoning_headroom.py --data builtin:arithmetic:1 --problems 128 --seed 7 --out headroom.json

Each problem's full chain is recorded as `dyninfer stop` records it (greedy, `--chain-tokens` at most, a
trial answer probed at every sentence end, line ends marked). Per probe site (sentence ends, line ends):
- probes per chain and the tokens they cost;
- the oracle stop: a chain whose full answer is right stops at its first probe giving that answer, a wrong
  chain at its first probe (nothing to lose there); tokens saved on all chains and on the right ones;
- per rule signal, the best tokens saved by a threshold that keeps >= 95% of this sample's right answers, and
  the right answers kept at the threshold saving >= 40% (uncertified: the sample chooses its own threshold).
The oracle says where the savings are: a rule can only save on a right chain what its answer leaves, and
anything more must come from telling wrong chains apart early.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from provenance import provenance

from dyninfer.compressors.cot_data import load_problems
from dyninfer.compressors.steer_extract import CotPrompter
from dyninfer.compressors.stop_simulate import ReasoningRun, reasoning_outcome
from dyninfer.core.choices import REASONING
from dyninfer.core.choices import STOP_PROBE_SITES as PROBE_SITES
from dyninfer.core.choices import STOP_SIGNALS as SIGNALS
from dyninfer.core.models import load_model
from dyninfer.core.policies import PROBE_SUFFIX, StopPolicy
from dyninfer.profilers.stop_runs import reasoning_runs
from dyninfer.runtime.dynamic import DynamicModel
from dyninfer.runtime.loader import probe_vocabulary


def oracle_spent(run: ReasoningRun) -> int:
    """Tokens spent by the best stop that keeps a right full answer (any stop is free on a wrong chain)."""
    spent = 0
    for probe in run.probes:
        spent += probe.cost
        if not run.right(run.full_answer) or run.right(probe.answer):
            return min(run.chain_tokens, probe.boundary + spent)
    return run.chain_tokens + spent


def saving(runs: list[ReasoningRun], spent: list[int]) -> float:
    return 1.0 - sum(spent) / max(1, sum(r.chain_tokens for r in runs))


def rule_table(runs: list[ReasoningRun], signal: str) -> list[dict]:
    """Per threshold (every probe score seen), what the rule does: tokens saved, right answers kept, ..."""
    thresholds = sorted({s for r in runs for s in r.probe_scores(signal) if s > 0}, reverse=True)
    return [reasoning_outcome(runs, signal, threshold) for threshold in thresholds]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--data", default="builtin:arithmetic:1")
    parser.add_argument("--problems", type=int, default=128)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--chain-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    started = time.perf_counter()
    loaded = load_model(args.model)
    tokenizer = loaded.tokenizer
    problems = load_problems(args.data, args.seed, args.problems)
    prompter = CotPrompter(tokenizer, [])
    prompts = [torch.tensor([tokenizer(prompter.prompt(p.question), add_special_tokens=not prompter.chat)["input_ids"]]) for p in problems]
    vocabulary = probe_vocabulary(tokenizer, PROBE_SUFFIX)
    recording = StopPolicy(REASONING, "confidence", None, 0.95, 0.05, args.chain_tokens)
    dynamic = DynamicModel(loaded.layered, None, None)
    runs = reasoning_runs(
        dynamic,
        prompts,
        problems,
        recording,
        vocabulary,
        lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
        batch_size=args.batch_size,
        eos_token_id=tokenizer.eos_token_id,
    )
    right = [r for r in runs if r.right(r.full_answer)]
    result = {
        "provenance": provenance(),
        "problems": len(runs),
        "right": len(right),
        "mean_chain_tokens": float(np.mean([r.chain_tokens for r in runs])),
        "chains_at_budget": float(np.mean([r.chain_tokens >= args.chain_tokens for r in runs])),
        "record_seconds": time.perf_counter() - started,
        "sites": {},
    }
    for site in PROBE_SITES:
        seen = [r.at(site) for r in runs]
        seen_right = [r for r in seen if r.right(r.full_answer)]
        entry = {
            "probes_per_chain": float(np.mean([len(r.probes) for r in seen])),
            "probe_tokens_per_chain": float(np.mean([sum(p.cost for p in r.probes) for r in seen])),
            "oracle_saved": saving(seen, [oracle_spent(r) for r in seen]),
            "oracle_saved_on_right_chains": saving(seen_right, [oracle_spent(r) for r in seen_right]),
            "rules": {},
        }
        for signal in SIGNALS[REASONING]:
            table = rule_table(seen, signal)
            keeping = [row for row in table if row["right_kept"] >= 0.95]
            saving_40 = [row for row in table if row["tokens_saved"] >= 0.40]
            entry["rules"][signal] = {
                "best_saved_keeping_95": max(keeping, key=lambda row: row["tokens_saved"]) if keeping else None,
                "best_kept_saving_40": max(saving_40, key=lambda row: row["right_kept"]) if saving_40 else None,
            }
        result["sites"][site] = entry
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()

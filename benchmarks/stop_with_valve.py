"""The valve and the stop together, against the plain model, on the same held-out problems.

    python benchmarks/stop_with_valve.py --artifact valve/ --out stop-with-valve.json

`--artifact` holds a CoT-Valve direction applied at some α (`steer apply`) and a reasoning stop rule
certified on that steered model (`dyninfer stop --workload reasoning --out valve/`). Its stop record's
held-out problems (never used to fit or certify the rule, nor to make or sweep the direction) are
answered three ways, one problem at a time, greedily:

- the plain model (transformers' greedy decoding, steering taken out), until its end-of-sequence token
  or the chain budget: the baseline;
- the steered model, full chain (the valve alone);
- the steered model obeying the stop rule (the valve and the stop; its probes' tokens counted).

Reported per way: mean tokens per problem (generated and probed), accuracy, and the share of the
baseline's right answers still right; and the saving of each over the baseline, in tokens and in
wall-clock seconds per problem, measured side by side in this run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from provenance import provenance

from dyninfer.compressors.cot_data import extract_answer
from dyninfer.compressors.steering import Steering, steered
from dyninfer.jobs.stop import heldout_requests
from dyninfer.profilers.bench import greedy_generate
from dyninfer.runtime.loader import load_dynamic, stored_stop_policy, stored_stopper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--artifact", type=Path, required=True)
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    dyn = load_dynamic(str(args.artifact), require_policy=False)
    if dyn.steering is None:
        raise SystemExit(f"{args.artifact} has no applied steering; run `dyninfer steer apply` into it first")
    policy = stored_stop_policy(dyn, "reasoning")
    config, requests = heldout_requests(dyn, "reasoning", args.problems)
    tokenizer, lm = dyn.loaded.tokenizer, dyn.loaded.layered
    eos = tokenizer.eos_token_id
    valve = Steering.from_artifact(dyn.artifact).get(dyn.steering["method"])
    alpha = float(dyn.steering["alpha"])

    def right(ids: list[int], answer: float) -> bool:
        value = extract_answer(tokenizer.decode(ids, skip_special_tokens=True))
        return value is not None and abs(value - answer) < 1e-6

    ways = {"plain model (transformers)": [], "valve alone": [], "valve + stop": []}
    seconds = dict.fromkeys(ways, 0.0)
    for prompt, answer in zip(requests.prompts, requests.answers):
        with steered(lm, valve, -alpha):  # the steering taken out for the call (the swap is not timed)
            t0 = time.perf_counter()
            plain = greedy_generate(lm.model, prompt, policy.new_tokens, eos_token_id=eos)[0].tolist()
            seconds["plain model (transformers)"] += time.perf_counter() - t0
        ways["plain model (transformers)"].append((len(plain), right(plain, answer)))
        t0 = time.perf_counter()
        alone = dyn.dynamic.generate(prompt, policy.new_tokens, mode="full", eos_token_id=eos)
        seconds["valve alone"] += time.perf_counter() - t0
        ways["valve alone"].append((alone.tokens.shape[1], right(alone.tokens[0].tolist(), answer)))
        t0 = time.perf_counter()
        both = dyn.dynamic.generate(prompt, policy.new_tokens, mode="full", eos_token_id=eos, stop=stored_stopper(dyn, policy))
        seconds["valve + stop"] += time.perf_counter() - t0
        ways["valve + stop"].append((both.stop["spent"], right(both.tokens[0].tolist(), answer)))
    n = len(requests.prompts)
    base = ways["plain model (transformers)"]
    base_tokens = sum(t for t, _ in base) / n
    base_right = [r for _, r in base]
    result = {
        "provenance": provenance(),
        "artifact": str(args.artifact),
        "steering": dyn.steering,
        "policy": policy.to_dict(),
        "data": {"spec": config.resolved_data(), "seed": config.seed, "problems": n},
        "ways": {},
    }
    for name, rows in ways.items():
        tokens = sum(t for t, _ in rows) / n
        now = [r for _, r in rows]
        result["ways"][name] = {
            "tokens_per_problem": tokens,
            "tokens_saved": 1.0 - tokens / base_tokens,
            "seconds_per_problem": seconds[name] / n,
            "speedup_per_problem": seconds["plain model (transformers)"] / seconds[name],
            "accuracy": sum(now) / n,
            "right_kept": sum(b and r for b, r in zip(base_right, now)) / max(sum(base_right), 1),
        }
    result["total_s"] = time.perf_counter() - started
    text = json.dumps(result, indent=2, default=str)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()

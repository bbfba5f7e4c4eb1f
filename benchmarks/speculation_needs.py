"""What self-speculation needs on this machine: per draft layer, the acceptance a 1.3x speedup takes, against
the acceptance an artifact measured (its probe's logit-lens agreement, or its tune-exits report).

    python benchmarks/speculation_needs.py ARTIFACT [--max-draft 8] [--speedup 1.3]

Step costs (one layer over 1 and 8 new positions, the full head over 1 and 8, the draft head) are timed
here on a held-out prompt of the artifact's data, as `bench` and `run` do to plan (runtime/speculation.py).
"""

from __future__ import annotations

import argparse
import json

from provenance import provenance

from dyninfer.core.choices import DEFAULT_DATA
from dyninfer.core.data import load_windows
from dyninfer.core.records import ProbeRecord
from dyninfer.jobs.run import measured_agreement
from dyninfer.profilers.speculation_cost import measure_step_costs
from dyninfer.runtime.loader import load_dynamic
from dyninfer.runtime.speculation import expected_speedup, needed_acceptance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact")
    parser.add_argument("--max-draft", type=int, default=8)
    parser.add_argument("--speedup", type=float, default=1.3)
    args = parser.parse_args()
    dyn = load_dynamic(args.artifact, require_policy=False)
    agreement, source = measured_agreement(dyn.artifact)
    if agreement is None:
        raise SystemExit("the artifact measured no agreement: run `dyninfer probe --out ARTIFACT` first")
    probe = ProbeRecord.read(dyn.artifact)
    spec = (probe.data if probe is not None else {}).get("spec", DEFAULT_DATA)
    prompt = load_windows(spec, dyn.loaded.tokenizer, seq_len=64, seed=0).heldout[:1, :64]
    lm = dyn.loaded.layered
    costs = measure_step_costs(lm, prompt, args.max_draft, dyn.dynamic.draft_vocabulary)
    rows = []
    for layer in range(1, lm.num_layers):
        best_k = max(range(1, args.max_draft + 1), key=lambda k: expected_speedup(agreement[layer], layer, k, costs))
        needs = {k: needed_acceptance(layer, k, costs, args.speedup) for k in range(1, args.max_draft + 1)}
        reachable = [v for v in needs.values() if v is not None]
        rows.append(
            {
                "layer": layer,
                "measured_acceptance": agreement[layer],
                "expected_speedup": expected_speedup(agreement[layer], layer, best_k, costs),
                "best_k": best_k,
                "needed_for_target": min(reachable) if reachable else None,
            }
        )
    print(
        json.dumps(
            {
                "provenance": provenance(),
                "artifact": args.artifact,
                "source": source,
                "target": args.speedup,
                "costs": vars(costs),
                "layers": rows,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()

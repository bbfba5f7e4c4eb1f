"""The audit's calibration with candidate runs continued from one another (`reuse`) and generated anew, side by side.

    python benchmarks/calibration_reuse.py                       # the bundled model, the audit's calibration
    python benchmarks/calibration_reuse.py --artifact demo-out   # reuse a tuned lens and profile already made
    python benchmarks/calibration_reuse.py --only reuse          # one side only (profiling)

Both sides run the calibrate job with the audit's calibration settings on the same seed and data, one after
the other in one process (the model loaded once, the full model's continuations computed by the first side
and cached in the in-memory artifact for the second, so the comparison is of the certification itself and
the report also gives each side's whole calibration time). It checks that the certified results are identical
(exit points, threshold, every candidate's consistency and p-value, held-out numbers) and writes JSON with
the timings, both results and the provenance.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

from provenance import provenance

from dyninfer.core.artifacts import Artifact
from dyninfer.jobs import calibrate as calibrate_job
from dyninfer.jobs.configs import AuditConfig
from dyninfer.runtime.loader import ModelSession


def _result(report: calibrate_job.CalibrateReport) -> dict:
    """What must be identical between the two sides: per target, the policy, the curve and the held-out numbers."""
    out = []
    for r in [report.result, *report.others]:
        out.append(
            {
                "target": r.target,
                "exit_points": r.policy.exit_points,
                "threshold": r.policy.threshold,
                "curve": [(c.threshold, c.consistency, c.p_value) for c in r.curve],
                "generated": r.generated,
            }
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model (default: the audit's, the bundled SmolLM2-135M)")
    parser.add_argument("--artifact", default=None, help="an artifact to start from (its tuned lens, profile, continuations)")
    parser.add_argument("--only", choices=("reuse", "anew"), default=None, help="run one side only")
    parser.add_argument("--out", default="calibration_reuse.json")
    args = parser.parse_args()

    audit = AuditConfig() if args.model is None else AuditConfig(model=args.model)
    base = audit.calibrate_config()
    session = ModelSession.load(base.model, base.placement())
    start = Artifact.load(args.artifact) if args.artifact else None
    sides = {"anew": False, "reuse": True}
    if args.only:
        sides = {args.only: sides[args.only]}
    timings, results, artifact = {}, {}, start
    for name, reuse in sides.items():
        config = dataclasses.replace(base, reuse_runs=reuse)
        started = time.perf_counter()
        report = calibrate_job.run(config, None, artifact, session)
        timings[name] = {"calibrate_s": time.perf_counter() - started} | {
            k: v for k, v in report.timings.items() if k in ("full_continuations_s", "certify_s", "tuned_lens_s")
        }
        artifact = report.artifact  # the next side finds the lens and the continuations there
        results[name] = _result(report)
        timings[name] |= report.result.work
        print(f"{name}: {json.dumps(timings[name])}", file=sys.stderr)
    identical = len(results) < 2 or results["anew"] == results["reuse"]
    out = {"provenance": provenance(), "timings": timings, "identical": identical, "results": results}
    if len(timings) == 2:
        out["certify_ratio"] = timings["anew"]["certify_s"] / timings["reuse"]["certify_s"]
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2, default=str)
    print(json.dumps({k: v for k, v in out.items() if k != "results"}, indent=2, default=str))
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())

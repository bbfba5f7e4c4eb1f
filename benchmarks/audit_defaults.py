"""The curves behind the audit's default sizes: what each size buys (accuracy) against what it costs (seconds).

    python benchmarks/audit_defaults.py --out audit_defaults.json                  # every curve (about 20 min)
    python benchmarks/audit_defaults.py --curves probe,lens --out audit_defaults.json

- `probe`: probe tokens. One probe pass over 2,048 held-out tokens, window by window (the logit and a tuned
  lens), so the oracle saving after the first 256, 512, 1,024 and 2,048 tokens comes from one pass; each
  point's standard error is the windows' spread over the square root of their count, and its cost the
  seconds the windows took.
- `lens`: tuned-lens training steps and tokens. Lenses trained at several sizes; accuracy is the mean
  validation KL over the layers (nats, lower is better) and the tuned lens's oracle saving on 512 held-out
  tokens; cost is the training's seconds.
- `prompts`: calibration prompts. The audit's calibration (generation risk, epsilon 0.05, target 0.95 and
  0.9) at several prompt counts; accuracy is the certified policy (threshold, predicted speedup) and the
  number of candidates certified; cost is the calibration's seconds.

Everything runs on the bundled model and Python's docs with the audit's other defaults, seed 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import numpy as np
from provenance import provenance

from dyninfer.core.cost import count_costs
from dyninfer.core.lenses import LogitLens, train_tuned_lens
from dyninfer.jobs import calibrate as calibrate_job
from dyninfer.jobs.configs import AuditConfig
from dyninfer.profilers.exit_probe import oracle_saving, run_probe
from dyninfer.runtime.loader import ModelSession, open_workspace


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def probe_curve(ws, lens, costs, sizes=(256, 512, 1024, 2048)) -> list[dict]:
    windows = ws.windows.take("heldout", max(sizes))
    per_window = []  # (seconds, {lens: depth counts})
    for i in range(windows.shape[0]):
        result = run_probe(ws.lm, windows[i : i + 1], [LogitLens(ws.lm), lens], costs)
        counts = {kind: result.depth[result.depth["lens"] == kind]["tokens"].to_numpy(float) for kind in ("logit", "tuned")}
        per_window.append((result.seconds, counts))
        _log(f"probe window {i + 1}/{windows.shape[0]}: {result.seconds:.1f} s")
    rows, seq = [], windows.shape[1] - 1
    for size in sizes:
        k = max(1, size // seq)
        row = {"tokens": k * seq, "seconds": sum(s for s, _ in per_window[:k])}
        for kind in ("logit", "tuned"):
            total = sum(c[kind] for _, c in per_window[:k])
            each = [oracle_saving(c[kind], costs, kind == "tuned").saving for _, c in per_window[:k]]
            row[f"{kind}_saving"] = oracle_saving(total, costs, kind == "tuned").saving
            row[f"{kind}_saving_se"] = float(np.std(each, ddof=1) / np.sqrt(k)) if k > 1 else None
        rows.append(row)
    return rows


def lens_curve(ws, costs, settings=((4096, 0), (4096, 15), (4096, 30), (4096, 60), (8192, 30))) -> list[dict]:
    heldout = ws.windows.take("heldout", 512)
    rows = []
    for tokens, steps in settings:
        train = ws.windows.train[ws.windows.take_rows("train", tokens)]
        started = time.perf_counter()
        lens, record = train_tuned_lens(ws.lm, train, steps=steps, seed=0)
        seconds = time.perf_counter() - started
        result = run_probe(ws.lm, heldout, [lens], costs)
        rows.append(
            {
                "train_tokens": tokens,
                "steps": steps,
                "seconds": seconds,
                "validation_kl": float(np.mean(record.kl_refined)),
                "validation_kl_init": float(np.mean(record.kl_init)),
                "tuned_saving_512": result.oracle["tuned"].saving,
            }
        )
        _log(f"lens {tokens} tokens, {steps} steps: {json.dumps(rows[-1])}")
    return rows


def prompts_curve(session, artifact, counts=(64, 128, 192)) -> list[dict]:
    rows = []
    for prompts in counts:
        config = dataclasses.replace(AuditConfig().calibrate_config(), prompts=prompts)
        started = time.perf_counter()
        report = calibrate_job.run(config, None, artifact, session)
        row = {"prompts": prompts, "seconds": time.perf_counter() - started}
        for r in [report.result, *report.others]:
            rejected = sum(bool(x) for x in r.ltt.rejected) - 1  # candidates certified beyond "never exit"
            row[f"target_{r.target:g}"] = {
                "exit_points": r.policy.exit_points,
                "threshold": r.policy.threshold,
                "candidates_certified": max(0, rejected),
                "heldout_consistency": r.generated.get("certified_measure"),
                "predicted_speedup": r.generated.get("predicted_speedup"),
            }
        rows.append(row)
        _log(f"prompts {prompts}: {json.dumps(row)}")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--curves", default="probe,lens,prompts")
    parser.add_argument("--artifact", default=None, help="an audit's artifact (its tuned lens and profile); else one is trained")
    parser.add_argument("--out", default="audit_defaults.json")
    args = parser.parse_args()
    audit = AuditConfig()
    session = ModelSession.load(audit.model, audit.placement())
    ws = open_workspace(audit.model, audit.data, seq_len=audit.seq_len, seed=audit.seed, existing=args.artifact, session=session)
    costs = count_costs(ws.lm, context=audit.seq_len)
    out: dict = {"provenance": provenance()}
    wanted = args.curves.split(",")
    if "probe" in wanted:
        probe = audit.probe_config()
        lens, _ = ws.tuned_lens(train_tokens=probe.lens_train_tokens, steps=probe.lens_steps, seed=audit.seed)
        out["probe"] = probe_curve(ws, lens, costs)
    if "lens" in wanted:
        out["lens"] = lens_curve(ws, costs)
    if "prompts" in wanted:
        out["prompts"] = prompts_curve(session, args.artifact, (64, 128, 192))
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2, default=str)
    print(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Early exit on the bundled model, both risks side by side: what each certifies and what generation gets.

    python benchmarks/exit_table.py --targets 0.9,0.95,0.99 --kv-modes propagate,recompute --out table.json

For each KV mode, risk (generation, teacher-forced-consistency) and target: `calibrate` (one model
load and one tuned lens for everything; the lens is trained on its own random train windows,
which calibration then skips), then `bench` on held-out prompts of the same split (transformers'
cached greedy decoding against the early-exit model, interleaved, batch 1, in one run). Each row:
the teacher-forced (simulated) held-out consistency, the certified bound, the held-out generation
consistency (calibrate's own held-out prompts and bench's), the predicted and measured speedup,
and the calibration time. Rows are appended to `--out` as they finish.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from provenance import provenance

from dyninfer.core.artifact_paths import artifact_exists
from dyninfer.core.artifacts import Artifact
from dyninfer.core.choices import DEFAULT_MODEL
from dyninfer.jobs import bench as bench_job
from dyninfer.jobs import calibrate as calibrate_job
from dyninfer.profilers.bench import run_bench
from dyninfer.runtime.loader import ModelSession, build_dynamic


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--data", default="builtin:pydocs")
    p.add_argument("--targets", default="0.9,0.95,0.99")
    p.add_argument("--kv-modes", default="propagate,recompute")
    p.add_argument("--risks", default="generation,teacher-forced-consistency")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--prompts", type=int, default=300, help="calibration prompts (0.99 needs at least 299)")
    p.add_argument("--heldout-prompts", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--lens-train-tokens", type=int, default=8192)
    p.add_argument("--bench-prompts", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--base", type=Path, default=None, help="keep the artifact with the tuned lens and cached continuations here, for reruns"
    )
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args()


def main() -> None:
    args = parse()
    session = ModelSession.load(args.model)
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    rows = previous.get("rows", [])
    run_provenance = [*previous.get("runs", []), provenance()]  # a resumed table lists every run that added rows
    done = {(r["kv_mode"], r["risk"], r["target"]) for r in rows}
    # The artifact holding the tuned lens (and cached continuations), shared by every row.
    base = Artifact.load(args.base) if args.base and artifact_exists(args.base) else None
    kv_modes = args.kv_modes.split(",")
    for risk in args.risks.split(","):
        for target in (float(t) for t in args.targets.split(",")):
            # A teacher-forced policy does not depend on the KV mode (the simulation has none): one
            # calibration, benched in each mode. A generation policy is certified per mode.
            groups = [kv_modes] if risk != "generation" else [[kv] for kv in kv_modes]
            for group in groups:
                todo = [kv for kv in group if (kv, risk, target) not in done]
                if not todo:
                    continue
                config = calibrate_job.CalibrateConfig(
                    model=args.model,
                    data=args.data,
                    seq_len=args.seq_len,
                    target=target,
                    risk=risk,
                    kv_mode=todo[0],
                    prompts=args.prompts,
                    heldout_prompts=args.heldout_prompts,
                    new_tokens=args.new_tokens,
                    calibration_tokens=args.prompts * args.seq_len,
                    lens_train_tokens=args.lens_train_tokens,
                    batch_size=args.batch_size,
                )
                started = time.perf_counter()
                try:
                    report = calibrate_job.run(config, existing=base, session=session)
                except Exception as exc:
                    rows += [{"kv_mode": kv, "risk": risk, "target": target, "error": str(exc)} for kv in todo]
                    args.out.write_text(json.dumps({"runs": run_provenance, "rows": rows}, indent=2))
                    continue
                seconds = time.perf_counter() - started
                base = report.artifact
                if args.base:
                    calibrate_job.save(report, args.base)
                for kv_mode in todo:
                    rows.append(row(args, session, report, kv_mode, seconds))
                    args.out.write_text(json.dumps({"runs": run_provenance, "rows": rows}, indent=2))
                    print(json.dumps(rows[-1]["bench"] | {"row": [kv_mode, risk, target], "s": round(seconds)}), flush=True)


def row(args, session, report, kv_mode: str, seconds: float) -> dict:
    """One table row: the calibration's numbers and a bench of its policy in `kv_mode`."""
    result = report.result
    dyn = build_dynamic(report.artifact, session, kv_mode=kv_mode)
    bench_config = bench_job.BenchConfig(prompts=args.bench_prompts, new_tokens=args.new_tokens, prompt_tokens=report.config.prompt_tokens)
    _, prompts, new_tokens = bench_job.bench_prompts(bench_config, dyn)
    bench = run_bench(dyn, prompts, new_tokens, modes=("early-exit",))
    early = bench.mode("early-exit")
    generated = result.generated or {}
    return {
        "kv_mode": kv_mode,
        "risk": result.risk,
        "target": result.target,
        "epsilon": result.epsilon,
        "units": result.units,
        "exit_points": result.policy.exit_points,
        "threshold": result.policy.threshold,
        "statement": result.ltt.statement(),
        "simulated_heldout_consistency": result.heldout["consistency"],
        "predicted_speedup_simulated": result.heldout["predicted_speedup"],
        "calibrate_heldout_generated": {
            k: generated.get(k) for k in ("tokens", "prefix", "rougeL", "predicted_speedup", "mean_exit_layer")
        },
        "bench": {
            "prompts": bench.prompts,
            "new_tokens": bench.new_tokens,
            "baseline_tokens_per_s": bench.modes[0].tokens_per_s,
            "early_exit_tokens_per_s": early.tokens_per_s,
            "speedup": early.speedup,
            "consistency_tokens": early.consistency,
            "prefix": early.prefix_agreement,
            "rougeL": early.rouge_l,
            "perplexity": early.perplexity,
            "baseline_perplexity": bench.modes[0].perplexity,
            "mean_exit_layer": early.mean_exit_layer,
        },
        "candidates_tested": len(result.ltt.lambdas),
        "calibrate_s": seconds,
        "notes": result.notes,
    }


if __name__ == "__main__":
    main()

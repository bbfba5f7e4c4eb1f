"""Why `bench --backend onnx` drives optimum's model with a plain greedy loop, not generate().

Usage: python benchmarks/optimum_generate_vs_loop.py PACKAGE [--new-tokens 64] [--rounds 2]
(PACKAGE: a `dyninfer export` package with its baseline/ folder.) Both ways decode the same
prompt, alternating, and must produce the same tokens; prints tokens/s for each.
"""

from __future__ import annotations

import argparse
import time

import torch
from provenance import provenance_line

from dyninfer.exporters.baseline import load_optimum_baseline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(provenance_line(), flush=True)
    baseline = load_optimum_baseline(args.package, "CPUExecutionProvider")
    prompt = torch.randint(100, 1000, (1, 64), generator=torch.Generator().manual_seed(0))

    def generate(n: int) -> torch.Tensor:
        out = baseline.model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
        )
        return out[:, prompt.shape[1] :]

    def loop(n: int) -> torch.Tensor:
        return baseline.greedy(prompt, n)

    assert torch.equal(generate(8), loop(8)), "the two ways must decode the same tokens"
    speeds: dict[str, list[float]] = {"generate()": [], "greedy loop": []}
    for _ in range(args.rounds):
        for name, run in (("generate()", generate), ("greedy loop", loop)):
            started = time.perf_counter()
            run(args.new_tokens)
            speeds[name].append(args.new_tokens / (time.perf_counter() - started))
    for name, values in speeds.items():
        print(f"{name:12s} " + " ".join(f"{v:.1f}" for v in values) + " tokens/s")


if __name__ == "__main__":
    main()

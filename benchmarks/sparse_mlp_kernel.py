"""The CPU sparse MLP kernels in isolation: dense torch MLP vs the numba kernels, batch 1.

30 layers of random weights of a given MLP size (default SmolLM2-135M's 576 -> 1536), so
the weights do not all sit in cache, as in a real decoding step. Each round times all
layers dense, then all layers sparse; the median over rounds is reported. Inside a model
the per-layer overheads (selection, dispatch, the predictor) come on top: `dyninfer prune`
measures that, side by side.

    python benchmarks/sparse_mlp_kernel.py --sparsity 0.25 0.4 0.5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from provenance import provenance_line

from dyninfer.kernels.cpu_sparse_mlp import rows_axpy_cpu, sparse_mlp_cpu
from dyninfer.kernels.reference import pack_gated


def median_ms(fn, rounds: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--neurons", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.25, 0.4, 0.5])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    print(provenance_line(), flush=True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d, n = args.hidden, args.neurons
    weights = [(torch.randn(n, d), torch.randn(n, d), torch.randn(d, n)) for _ in range(args.layers)]
    packed = [pack_gated(*w) for w in weights]
    down_rows = [w[2].t().contiguous() for w in weights]
    x, h = torch.randn(d), torch.randn(n)
    print(f"{args.layers} layers of {d} -> {n}, {args.threads} threads, median of {args.rounds} rounds (ms, all layers)")
    with torch.inference_mode():
        for sparsity in args.sparsity:
            active = torch.randperm(n)[: round(n * (1 - sparsity))].sort().values
            values = h[active]
            dense = median_ms(lambda: [F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), dn) for g, u, dn in weights], args.rounds)
            fused = median_ms(lambda: [sparse_mlp_cpu(x, p, active, "silu") for p in packed], args.rounds)
            dense_down = median_ms(lambda: [F.linear(h, w[2]) for w in weights], args.rounds)
            sparse_down = median_ms(lambda: [rows_axpy_cpu(r, active, values) for r in down_rows], args.rounds)
            print(
                f"sparsity {sparsity:.0%}: MLP dense {dense:.2f} vs fused sparse {fused:.2f} ({dense / fused:.2f}x); "
                f"down projection dense {dense_down:.2f} vs rows GEMV {sparse_down:.2f} ({dense_down / sparse_down:.2f}x)"
            )


if __name__ == "__main__":
    main()

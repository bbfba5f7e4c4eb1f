"""The PNG figures (matplotlib) that report folders and the audit report hold.

matplotlib is imported when a figure is drawn: commands that draw none start faster.
"""

from __future__ import annotations

import io

import pandas as pd


def _png(fig) -> bytes:
    """A finished matplotlib figure as PNG bytes (the figure is closed)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def _finish(fig, axes, title: str) -> bytes:
    """Grid and legend on every panel, the title on top, as PNG bytes."""
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return _png(fig)


def probe_figure_png(layers: pd.DataFrame, title: str) -> bytes:
    """Agreement/accuracy, KL and 'can exit by' per layer, one line per lens, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for lens, rows in layers.groupby("lens", sort=False):
        axes[0].plot(rows["layer"], rows["agreement"], marker="o", ms=3, label=f"{lens}: agreement with final")
        axes[0].plot(rows["layer"], rows["accuracy"], ls="--", label=f"{lens}: next-token accuracy")
        below_top = rows[rows["layer"] < rows["layer"].max()]  # the final layer's KL is 0 by definition
        axes[1].semilogy(below_top["layer"], below_top["kl"].clip(lower=1e-6), marker="o", ms=3, label=lens)
        axes[2].plot(rows["layer"], rows["can_exit_by"], drawstyle="steps-post", label=lens)
    axes[0].set(title="top-1 per layer", xlabel="layer (0 = embeddings)", ylabel="fraction of tokens", ylim=(0, 1.02))
    axes[1].set(title="KL(final ‖ layer)", xlabel="layer", ylabel="nats")
    axes[2].set(title="tokens whose prediction is settled by layer", xlabel="layer", ylabel="cumulative fraction", ylim=(0, 1.02))
    return _finish(fig, axes, title)


def calibration_curve_png(result, title: str, others: list | None = None, unit: str = "FLOPs") -> bytes:
    """Predicted speedup vs consistency over the threshold grid, with the chosen points marked.

    `others`: results at more targets, whose certified policies are marked (held-out values).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = result.curve
    generated = result.generated is not None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(
        [c.consistency for c in curve],
        [c.predicted_speedup for c in curve],
        marker=".",
        ms=3,
        label="candidates generated (calibration prompts)" if generated else "threshold grid (calibration split)",
    )
    ax.axvline(result.target, ls=":", color="grey", label=f"target {result.target:g}")
    for label, threshold, marker in (
        ("certified (LTT)", result.policy.threshold, "o"),
        ("naive (no guarantee)", result.naive_threshold, "x"),
    ):
        match = [c for c in curve if threshold is not None and c.threshold == threshold]
        if match:
            ax.scatter([match[0].consistency], [match[0].predicted_speedup], marker=marker, s=80, zorder=3, label=label)
    for other in others or []:
        held = other.generated or other.heldout
        ax.scatter(
            [held.get("certified_measure", held.get("consistency"))],
            [held["predicted_speedup"]],
            marker="D",
            s=50,
            zorder=3,
            label=f"certified at target {other.target:g} (held-out)",
        )
    what = f"{result.generated['measure']} consistency of generated continuations" if generated else "token consistency (teacher-forced)"
    ax.set(xlabel=f"{what} with the full model", ylabel=f"predicted speedup ({unit})", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def pruning_sweep_png(points: list[dict], dense_perplexity: float, title: str) -> bytes:
    """Perplexity change and measured speedups against MLP sparsity, one point per swept sparsity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sparsity = [p["achieved_sparsity"] for p in points]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    axes[0].plot(sparsity, [100 * p["perplexity_change"] for p in points], marker="o", label="perplexity change")
    axes[0].plot(sparsity, [100 * (1 - p["agreement"]) for p in points], marker="s", ls="--", label="next-token disagreement with dense")
    axes[0].set(
        xlabel="achieved MLP sparsity (held-out)", ylabel="%", title=f"quality vs sparsity (dense perplexity {dense_perplexity:.2f})"
    )
    timed = [p for p in points if p.get("speed")]
    if timed:
        xs = [p["achieved_sparsity"] for p in timed]
        axes[1].plot(xs, [p["speed"]["mlp_speedup"] for p in timed], marker="o", label="MLP block (sparse kernel)")
        axes[1].plot(xs, [p["speed"]["decode_speedup"] for p in timed], marker="s", label="end-to-end decode")
        axes[1].axhline(1.0, color="grey", ls=":")
    axes[1].plot(sparsity, [1 / (1 - p["flops_saved"]) for p in points], ls="--", color="grey", label="MLP FLOPs ratio (upper bound)")
    axes[1].set(xlabel="achieved MLP sparsity (held-out)", ylabel="speedup vs dense (x)", title="measured speed, batch 1")
    return _finish(fig, axes, title)


def steer_sweep_png(points: list[dict], title: str) -> bytes:
    """Mean reasoning length and answer quality against the steering strength α."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = [p["alpha"] for p in points]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    axes[0].plot(alphas, [p["mean_length"] for p in points], marker="o", label="mean generated tokens")
    axes[0].axvline(0.0, color="grey", ls=":")
    axes[0].set(xlabel="α (positive shortens)", ylabel="tokens", title="reasoning length")
    axes[1].plot(alphas, [100 * p["accuracy"] for p in points], marker="o", label="accuracy")
    axes[1].plot(alphas, [100 * p["agreement"] for p in points], marker="s", ls="--", label="same answer as α = 0")
    axes[1].plot(alphas, [100 * p["truncated"] for p in points], marker="^", ls=":", label="hit the token limit")
    axes[1].set(xlabel="α (positive shortens)", ylabel="%", title="answers")
    return _finish(fig, axes, title)


def _piece_bars(ax, pieces: pd.DataFrame, column: str, scale: float = 1.0) -> None:
    """Stacked bars of one column per decoder layer (one colour per piece), and the embedding,
    final norm and head as their own bars on either side."""
    layers = pieces[pieces["layer"] >= 0]
    n_layers = int(layers["layer"].max()) + 1 if len(layers) else 0
    bottom = pd.Series(0.0, index=range(n_layers))
    for piece, rows in layers.groupby("piece", sort=False):
        values = (rows.set_index("layer")[column].reindex(range(n_layers)).fillna(0.0) * scale).clip(lower=0)
        ax.bar(range(n_layers), values, bottom=bottom, label=piece, width=0.8)
        bottom += values
    model_level = pieces[pieces["layer"] < 0].set_index("piece")[column] * scale
    positions = {"embed": -1.5, "norm": n_layers + 0.5, "head": n_layers + 1.5}
    for piece, x in positions.items():
        if piece in model_level.index:
            ax.bar([x], [max(float(model_level[piece]), 0.0)], width=0.8, color="grey", hatch="//")
    step = max(1, n_layers // 6)
    layer_ticks = list(range(0, n_layers - step // 2, step))
    ax.set_xticks(
        layer_ticks + list(positions.values()),
        [str(t) for t in layer_ticks] + [f"\n{p}" if p == "norm" else p for p in positions],
        fontsize=7,
    )
    ax.set_xlabel("decoder layer (embedding left, final norm and head right)")


def profile_png(pieces: pd.DataFrame, title: str) -> bytes:
    """Per-layer cost: decode FLOPs, decode and prefill latency, memory; stacked by piece."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(14, 8))
    panels = (
        (axes[0, 0], "decode_flops", 1e-6, "MFLOPs", "FLOPs of one decode step"),
        (axes[0, 1], "decode_ms", 1.0, "ms (median)", "decode latency, batch 1"),
        (axes[1, 0], "prefill_ms", 1.0, "ms (median)", "prefill latency of the prompt"),
        (axes[1, 1], "weight_bytes", 1 / 2**20, "MiB", "weights (a tied head holds none)"),
    )
    for ax, column, scale, unit, name in panels:
        _piece_bars(ax, pieces, column, scale)
        ax.set(ylabel=unit, title=name)
    return _finish(fig, axes.flat, title)


def depth_histogram_png(depth: pd.DataFrame, title: str) -> bytes:
    """Share of tokens per prediction depth (the first layer from which the top-1 stays final), per lens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.2))
    lenses = list(dict.fromkeys(depth["lens"]))
    width = 0.8 / max(len(lenses), 1)
    for i, (lens, rows) in enumerate(depth.groupby("lens", sort=False)):
        ax.bar(rows["layer"] + (i - (len(lenses) - 1) / 2) * width, rows["fraction"], width=width, label=lens)
    ax.set(xlabel="prediction depth (layer; 0 = embeddings)", ylabel="fraction of tokens", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)

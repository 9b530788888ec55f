"""The per-layer allocation plot of a pruning plan (its rows: :func:`~nirvana_lightning.pruning.plan.allocation_rows`)."""

from __future__ import annotations

from pathlib import Path

from ..io import atomic_file
from ..pruning.plan import PruningPlan, allocation_rows


def save_allocation_plot(plan: PruningPlan, path: str | Path, title: str | None = None) -> Path:
    """Plot the fraction of attention groups and MLP neurons kept per layer and write a PNG.

    Layer index on x, fraction kept on y (0..1), one line per block type. Written to a
    temporary file in the same directory and renamed, so a crash leaves no partial PNG.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    rows = allocation_rows(plan)
    layers = [r["layer"] for r in rows]
    fig = Figure(figsize=(max(6.0, 0.25 * len(layers) + 3), 3.6), dpi=120)
    ax = fig.add_subplot()
    ax.plot(layers, [r["attention_kept"] for r in rows], marker="o", label="attention (query heads kept)")
    ax.plot(layers, [r["mlp_kept"] for r in rows], marker="s", label="MLP (neurons kept)")
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction kept")
    ax.set_ylim(0, 1.05)
    ax.set_xticks(layers if len(layers) <= 40 else layers[:: max(1, len(layers) // 20)])
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8, framealpha=0.8)
    p = plan.provenance
    ax.set_title(title or (f"{p.get('criterion', 'plan')}: target sparsity {p.get('sparsity')}, "
                           f"gamma {p.get('gamma')}, realised {plan.realised_sparsity:.3f}"), fontsize=9)
    fig.tight_layout()
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)

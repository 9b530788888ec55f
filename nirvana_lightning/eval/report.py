"""Per-layer allocation report of a pruning plan: table rows and the allocation plot."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..pruning.plan import PruningPlan


def allocation_rows(plan: PruningPlan) -> list[dict]:
    """Per layer: kept / original KV groups and MLP neurons, and the kept fractions."""
    return [
        {"layer": i, "kv_groups_kept": a, "kv_groups": ab, "mlp_neurons_kept": m, "mlp_neurons": mb,
         "attention_kept": a / ab, "mlp_kept": m / mb}
        for i, (a, ab, m, mb) in enumerate(zip(plan.n_kv_group_after, plan.n_kv_group_before,
                                               plan.mlp_dim_after, plan.mlp_dim_before))
    ]


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
    ax.plot(layers, [r["attention_kept"] for r in rows], marker="o", label="attention (KV groups kept)")
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path

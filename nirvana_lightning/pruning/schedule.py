"""Iterative pruning schedules: how much of the dense model is gone after each pruning step (pure)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ConfigError
from .allocation import UnitCosts, removal_counts
from .settings import SCHEDULES


def cumulative_sparsity(schedule: str, final: float, step: int, n_step: int) -> float:
    """Fraction of the DENSE model's block weights removed after pruning step ``step`` of ``n_step``.

    * ``once``: everything in one step (``n_step`` must be 1).
    * ``linear``: ``s_k = s * k / n``, equal slices of the dense model.
    * ``constant``: the same fraction of what remains at every step, ``1 - s_k = (1 - s)^(k/n)``.
    * ``cubic``: ``s_k = s * (1 - (1 - k/n)^3)`` (Zhu & Gupta, 2017): large cuts first, small at the end.

    Every schedule ends exactly at ``final`` when ``step == n_step``.
    """
    if schedule not in SCHEDULES:
        raise ConfigError("schedule.kind", schedule, SCHEDULES)
    if not 1 <= step <= n_step:
        raise ValueError(f"step {step} outside 1..{n_step}")
    if schedule == "once" and n_step != 1:
        raise ConfigError("schedule.n_steps", n_step, "1 with schedule.kind 'once'")
    if step == n_step:
        return final
    t = step / n_step
    if schedule == "linear":
        return final * t
    if schedule == "constant":
        return 1 - (1 - final) ** t
    return final * (1 - (1 - t) ** 3)  # cubic


def step_sparsity(target_cumulative: float, dense_block_params: int, current_block_params: int) -> float:
    """Sparsity to ask of the CURRENT model so that it keeps ``(1 - target) * dense`` block weights.

    Measured from the realised count (not the previous target), so rounding in earlier steps is
    corrected by later ones and the last step lands on the final target up to its own rounding.
    """
    keep = (1 - target_cumulative) * dense_block_params
    return max(0.0, 1 - keep / current_block_params)


@dataclass(frozen=True)
class StepTarget:
    """What pruning step ``k`` asks of the current model."""

    cumulative: float  #: fraction of the DENSE model's block weights gone after this step
    sparsity: float  #: the same, as a fraction of the CURRENT model's block weights
    counts: tuple[int, int] | None  #: (KV groups, MLP neurons) still to remove (global allocation), else None


def step_target(kind: str, final: float, k: int, n_steps: int, *, dense_widths: list[tuple[int, int]],
                current_widths: list[tuple[int, int]], dense_block: int, current_block: int, gamma: float,
                n_query_per_kv: int, head_dim: int, skip_layers: Sequence[int], allocation: str,
                costs: UnitCosts | None = None) -> StepTarget:
    """The removal of step ``k`` of an iterative schedule (pure).

    With global allocation the units that must be gone after step ``k`` are counted from the DENSE widths
    (the one-shot counts at ``s_k``), minus those already gone: per-step floors do not accumulate into a
    shortfall, and the last step lands on the one-shot counts of ``final``. Widths are ``(attention units,
    neurons)`` per layer; ``costs`` are the dense model's unit costs (default: KV groups of ``2(g+1)d``).
    """
    cumulative = cumulative_sparsity(kind, final, k, n_steps)
    sparsity = step_sparsity(cumulative, dense_block, current_block)
    counts = None
    if allocation == "global":
        want = removal_counts([a for a, _ in dense_widths], [m for _, m in dense_widths], sparsity=cumulative,
                              gamma=gamma, n_query_per_kv=n_query_per_kv, head_dim=head_dim, skip_layers=skip_layers,
                              costs=costs)
        gone = (sum(a for a, _ in dense_widths) - sum(a for a, _ in current_widths),
                sum(m for _, m in dense_widths) - sum(m for _, m in current_widths))
        counts = (max(0, want[0] - gone[0]), max(0, want[1] - gone[1]))
    return StepTarget(cumulative, sparsity, counts)


def reachable_steps(at_epochs: Sequence[int] | None, every_n_steps: int | None, n_steps: int,
                    max_steps: int | None, max_epochs: int | None) -> tuple[int, str, int] | None:
    """When the run's length ends it before the schedule's last step: ``(steps that run, limit key, limit)``;
    None when every step runs (or the run's length is open)."""
    if every_n_steps is not None and max_steps is not None and max_steps > 0:
        if every_n_steps * (n_steps - 1) >= max_steps:
            return sum(1 for k in range(n_steps) if every_n_steps * k < max_steps), "trainer.max_steps", max_steps
    elif at_epochs is not None and max_epochs is not None and max_epochs > 0:
        if at_epochs[-1] >= max_epochs:
            return sum(1 for e in at_epochs if e < max_epochs), "trainer.max_epochs", max_epochs
    return None

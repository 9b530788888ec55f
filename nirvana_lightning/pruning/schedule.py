"""Iterative pruning schedules: how much of the dense model is gone after each pruning step (pure)."""

from __future__ import annotations

from ..errors import ConfigError

SCHEDULES = ("once", "constant", "linear", "cubic")


def cumulative_sparsity(schedule: str, final: float, step: int, n_step: int) -> float:
    """Fraction of the DENSE model's block weights removed after pruning step ``step`` of ``n_step``.

    * ``once``: everything in one step (``n_step`` must be 1).
    * ``linear``: ``s_k = s * k / n``, equal slices of the dense model.
    * ``constant``: the same fraction of what remains at every step, ``1 - s_k = (1 - s)^(k/n)``.
    * ``cubic``: ``s_k = s * (1 - (1 - k/n)^3)`` (Zhu & Gupta, 2017): large cuts first, small at the end.

    Every schedule ends exactly at ``final`` when ``step == n_step``.
    """
    if schedule not in SCHEDULES:
        raise ConfigError("schedule", schedule, SCHEDULES)
    if not 1 <= step <= n_step:
        raise ValueError(f"step {step} outside 1..{n_step}")
    if schedule == "once" and n_step != 1:
        raise ConfigError("n_steps", n_step, "1 with schedule 'once'")
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

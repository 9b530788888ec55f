"""Make the right parameters trainable for a recovery mode."""

from __future__ import annotations

from torch import nn

from ..errors import check_choice
from ..families import ROLES

RECOVERY_MODES = ("lora", "full", "none")


def apply_recovery(
    model: nn.Module,
    mode: str,
    *,
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    lora_targets: list[str] | tuple[str, ...] = ROLES,
) -> nn.Module:
    """Return the model to train for ``mode``.

    ``lora`` wraps the model with peft adapters on the projections of the given roles (resolved
    to module names by the model family's adapter); ``full`` trains every parameter; ``none``
    freezes everything (prune-only runs).
    """
    check_choice("model.recovery", mode, RECOVERY_MODES)
    if mode == "lora":
        from .lora import attach_lora

        return attach_lora(model, r=lora_r, alpha=lora_alpha, dropout=lora_dropout, roles=lora_targets)
    for p in model.parameters():
        p.requires_grad_(mode == "full")
    return model

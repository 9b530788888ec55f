"""Recovery after pruning: LoRA, full fine-tuning, or none."""

from .setup import RECOVERY_MODES, apply_recovery

__all__ = ["RECOVERY_MODES", "apply_recovery"]

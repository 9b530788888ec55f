"""Recovery after pruning: LoRA, full fine-tuning, or none; rebuilding optimizers after a mid-training cut."""

from .rebuild import check_rebuildable, rebuild_optimization
from .setup import RECOVERY_MODES, apply_recovery

__all__ = ["RECOVERY_MODES", "apply_recovery", "check_rebuildable", "rebuild_optimization"]

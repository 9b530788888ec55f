"""Validation perplexity before and after recovery, printed as a table at fit end."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from ..eval.perplexity import compute_perplexity


class PerplexityCallback(L.Callback):
    """Measures perplexity on the datamodule's validation set at fit start and fit end.

    Fit start is after any pruning (the pruning callback works at setup), so the two numbers are
    the pruned model before recovery and the recovered model. Both are logged to every logger
    (``ppl/before_recovery``, ``ppl/after_recovery``) and printed.
    """

    def __init__(self) -> None:
        self.results: dict[str, float] = {}

    def _measure(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str) -> float:
        loader = trainer.datamodule.val_dataloader()
        ppl = compute_perplexity(pl_module.model, loader, device=pl_module.device)
        self.results[name] = ppl
        for logger in trainer.loggers:
            logger.log_metrics({f"ppl/{name}": ppl}, step=trainer.global_step)
        rank_zero_info(f"validation perplexity {name.replace('_', ' ')}: {ppl:.3f}")
        return ppl

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._measure(trainer, pl_module, "before_recovery")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._measure(trainer, pl_module, "after_recovery")
        before, after = self.results["before_recovery"], self.results["after_recovery"]
        rank_zero_info(
            "\n| validation perplexity | value |\n|---|---|\n"
            f"| before recovery | {before:.3f} |\n| after recovery | {after:.3f} |\n"
            f"| change | {100 * (after / before - 1):+.1f}% |"
        )

    def state_dict(self) -> dict:
        return {"results": dict(self.results)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.results = dict(state_dict.get("results", {}))

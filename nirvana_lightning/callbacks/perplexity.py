"""Validation perplexity of the dense, pruned and recovered model, printed as a table at fit end."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from ..errors import ConfigError
from ..eval.perplexity import compute_perplexity

_LABELS = {"dense": "dense (before pruning)", "before_recovery": "before recovery", "after_recovery": "after recovery"}


class PerplexityCallback(L.Callback):
    """Measures perplexity on the datamodule's validation set around recovery.

    * ``dense`` (optional): at setup, before pruning. List this callback BEFORE
      ``NirvanaPruningCallback`` in ``trainer.callbacks`` (callbacks run in list order).
    * ``before_recovery``: at fit start, after pruning and before any training step.
    * ``after_recovery``: at fit end.

    Each value goes to every logger as ``ppl/<name>`` and is printed; the table comes at fit end.

    Args:
        dense: also measure the dense model at setup.
    """

    def __init__(self, dense: bool = False) -> None:
        self.dense = dense
        self.results: dict[str, float] = {}

    def _measure(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str, device=None) -> float:
        loader = trainer.datamodule.val_dataloader()
        ppl = compute_perplexity(pl_module.model, loader, device=device or pl_module.device)
        self.results[name] = ppl
        for logger in trainer.loggers:
            logger.log_metrics({f"ppl/{name}": ppl}, step=trainer.global_step)
        rank_zero_info(f"validation perplexity {_LABELS[name]}: {ppl:.3f}")
        return ppl

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not self.dense or "dense" in self.results:
            return
        if getattr(pl_module, "resume_ckpt_path", None):  # resuming: the dense value comes back with our state
            return
        pl_module.build_model()
        if getattr(pl_module, "pruning_plan", None) is not None:
            raise ConfigError("trainer.callbacks", "PerplexityCallback after NirvanaPruningCallback",
                              "PerplexityCallback listed first when dense: true (the model was already pruned)")
        pl_module.model.to(trainer.strategy.root_device)
        self._measure(trainer, pl_module, "dense", device=trainer.strategy.root_device)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if "before_recovery" not in self.results:
            self._measure(trainer, pl_module, "before_recovery")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._measure(trainer, pl_module, "after_recovery")
        rows = ["| validation perplexity | value |", "|---|---|"]
        rows += [f"| {_LABELS[k]} | {v:.3f} |" for k, v in self.results.items()]
        before, after = self.results["before_recovery"], self.results["after_recovery"]
        rows.append(f"| recovery change | {100 * (after / before - 1):+.1f}% |")
        rank_zero_info("\n" + "\n".join(rows))

    def state_dict(self) -> dict:
        return {"results": dict(self.results)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.results = dict(state_dict.get("results", {}))

"""Shared timing of evaluation callbacks: dense (before pruning), pruned, every N steps, recovered."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from ..contract import prunable
from ..errors import ConfigError, check_positive_int
from ..sharding import is_sharded, on_rank_zero

#: the stages a run summary compares, in order
SUMMARY_STAGES = ("dense", "pruned", "recovered")
_LABELS = {"dense": "dense (before pruning)", "pruned": "pruned, before recovery", "recovered": "after recovery"}


@contextmanager
def on_root_device(trainer: L.Trainer, pl_module: L.LightningModule) -> Iterator[None]:
    """Run with the module on the Trainer's device, then put it back (after teardown it is on the CPU)."""
    before = next(pl_module.parameters()).device
    pl_module.to(trainer.strategy.root_device)
    try:
        yield
    finally:
        pl_module.to(before)


def prepare_dense_stage(trainer: L.Trainer, pl_module: L.LightningModule, name: str) -> None:
    """Build the model and put it on the Trainer's device for a measurement before pruning.

    Raises:
        ConfigError: the model is already pruned (the callback ``name`` was listed after the pruning callback).
    """
    prunable(pl_module).build_model()
    if pl_module.pruning_plan is not None:
        raise ConfigError("trainer.callbacks", f"{name} after NirvanaPruningCallback",
                          f"{name} listed first, before NirvanaPruningCallback (it measures the dense model, "
                          "which was already pruned)")
    if not next(pl_module.model.parameters()).is_meta:  # a sharded run's other ranks hold shapes only
        pl_module.model.to(trainer.strategy.root_device)


def check_every_n_steps(key: str, value: int | None) -> None:
    check_positive_int(key, value, allow_none=True)


class StagedEvaluation(L.Callback):
    """Runs :meth:`evaluate` at the stages of a prune-then-recover run and keeps the results.

    * ``dense`` (when ``dense=True``): in ``setup``, before pruning. List the callback BEFORE
      ``NirvanaPruningCallback`` in ``trainer.callbacks`` (callbacks run in list order); a model
      that is already pruned at that point is an error.
    * ``pruned``: at fit start, after pruning, before any training step.
    * ``step_<n>``: every ``every_n_steps`` optimizer steps during recovery.
    * ``recovered``: at the end of training (``on_train_end``, while the model is still on its
      device; at fit end when no training loop ran, e.g. ``max_steps: 0``).

    ``results`` maps stage to ``{metric: value}``. Every value goes to every logger twice: as
    a curve ``<prefix>/<metric>`` at the current global step (all stages but dense) and, for the
    three named stages, as ``<prefix>/<metric>/<stage>``. The results are part of the callback's
    state, so a resumed run keeps its dense and pruned values.
    """

    prefix = "eval"
    #: print the stage table when training ends
    announce = True

    def __init__(self, dense: bool = False, every_n_steps: int | None = None) -> None:
        check_every_n_steps(f"{type(self).__name__}.every_n_steps", every_n_steps)
        self.dense = dense
        self.every_n_steps = every_n_steps
        self.results: dict[str, dict[str, float]] = {}

    # ---------------------------------------------------------------- override
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> dict[str, float]:
        raise NotImplementedError

    def metric_label(self, metric: str) -> str:
        """Human-readable row name of a metric in tables."""
        return f"{self.prefix} {metric}"

    # ------------------------------------------------------------------- hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not self.dense or "dense" in self.results:
            return
        if prunable(pl_module).resume_ckpt_path:  # resuming: the dense values come back with our state
            return
        prepare_dense_stage(trainer, pl_module, type(self).__name__)
        self.record(trainer, pl_module, "dense")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if "pruned" not in self.results:
            self.record(trainer, pl_module, "pruned")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not self.every_n_steps or step == 0 or step % self.every_n_steps or f"step_{step}" in self.results:
            return
        if trainer.max_steps > 0 and step >= trainer.max_steps:
            return  # the fit-end evaluation covers the last step
        self.record(trainer, pl_module, f"step_{step}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # not on_fit_end: by then the strategy's teardown has moved the model to the CPU
        self.record(trainer, pl_module, "recovered")
        if self.announce:
            rank_zero_info("\n" + self.table())

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if "recovered" not in self.results:  # no training loop ran (max_steps: 0): evaluate the final model here
            with on_root_device(trainer, pl_module):
                self.on_train_end(trainer, pl_module)

    # ------------------------------------------------------------------ record
    def record(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> dict[str, float]:
        was_training = pl_module.training
        try:
            if stage == "dense" and is_sharded(trainer.strategy):
                # before sharding only rank 0 holds weights (the others build the model on the meta device)
                metrics = on_rank_zero(trainer, lambda: self.evaluate(trainer, pl_module, stage), what=f"{stage} stage")
            else:
                metrics = self.evaluate(trainer, pl_module, stage)
        finally:
            pl_module.train(was_training)
        self.results[stage] = dict(metrics)
        logged = {}
        for metric, value in metrics.items():
            if stage != "dense":
                logged[f"{self.prefix}/{metric}"] = value
            if stage in SUMMARY_STAGES:
                logged[f"{self.prefix}/{metric}/{stage}"] = value
        for logger in trainer.loggers:
            logger.log_metrics(logged, step=trainer.global_step)
        shown = ", ".join(f"{self.metric_label(m)} {v:.4g}" for m, v in metrics.items())
        rank_zero_info(f"{_LABELS.get(stage, stage.replace('_', ' '))}: {shown}")
        return metrics

    def summary_rows(self) -> dict[str, dict[str, float]]:
        """``{row label: {stage: value}}`` for the three named stages (read by the run summary)."""
        rows: dict[str, dict[str, float]] = {}
        for stage in SUMMARY_STAGES:
            for metric, value in self.results.get(stage, {}).items():
                rows.setdefault(self.metric_label(metric), {})[stage] = value
        return rows

    def table(self) -> str:
        stages = [s for s in self.results if s != "dense"]
        stages = (["dense"] if "dense" in self.results else []) + stages
        rows = ["| " + " | ".join(["metric", *stages]) + " |", "|" + "---|" * (len(stages) + 1)]
        metrics = list(dict.fromkeys(m for s in stages for m in self.results[s]))
        for m in metrics:
            cells = [f"{self.results[s][m]:.4g}" if m in self.results[s] else "" for s in stages]
            rows.append("| " + " | ".join([self.metric_label(m), *cells]) + " |")
        return "\n".join(rows)

    def state_dict(self) -> dict:
        return {"results": {k: dict(v) for k, v in self.results.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        self.results = {k: dict(v) for k, v in state_dict.get("results", {}).items()}

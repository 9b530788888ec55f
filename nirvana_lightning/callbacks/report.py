"""Pruning report: per-layer kept groups and neurons as a table, JSON, metrics and a plot."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from ..contract import prunable
from ..errors import ConfigError
from ..eval.report import save_allocation_plot
from ..io import write_text_atomic
from ..pruning.plan import allocation_rows
from .pruning import NirvanaPruningCallback


class PruningReportCallback(L.Callback):
    """Reports the model's pruning plan once pruning happened (fit start, or the first step of a
    schedule that starts later), and again after every later step of an iterative schedule.

    Writes ``allocation.json`` and (``plot: true``) ``allocation.png`` (the table is the pruning callback's
    ``plan.md``) into
    the log directory, and logs ``report/attention_kept/layer_<i>`` and
    ``report/mlp_kept/layer_<i>`` to every logger.

    Args:
        plot: write the PNG (matplotlib, Agg backend).
    """

    def __init__(self, plot: bool = True) -> None:
        self.plot = plot
        self.reported: str | None = None  # fingerprint of the last plan reported
        self.rows: list[dict] = []
        self.files: list[Path] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and not any(isinstance(c, NirvanaPruningCallback) for c in trainer.callbacks) \
                and prunable(pl_module).resume_ckpt_path is None:
            raise ConfigError("trainer.callbacks", "PruningReportCallback without NirvanaPruningCallback",
                              "a NirvanaPruningCallback in the same run (there is no plan to report)")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.report(trainer, pl_module)

    def on_nirvana_prune(self, trainer: L.Trainer, pl_module: L.LightningModule, plan) -> None:
        self.report(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.report(trainer, pl_module)
        if self.reported is None:
            raise RuntimeError("PruningReportCallback: the run ended without pruning (the schedule never started)")

    def report(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        plan = prunable(pl_module).pruning_plan
        if plan is None:
            return  # an epoch schedule that starts later: reported at its first step
        if plan.fingerprint() == self.reported:
            return
        self.rows = allocation_rows(plan)
        metrics = {}
        for r in self.rows:
            metrics[f"report/attention_kept/layer_{r['layer']}"] = r["attention_kept"]
            metrics[f"report/mlp_kept/layer_{r['layer']}"] = r["mlp_kept"]
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective under DDP: every rank
        self._write(log_dir, plan)
        self.reported = plan.fingerprint()

    @rank_zero_only
    def _write(self, log_dir: Path, plan) -> None:
        files = [write_text_atomic(log_dir / "allocation.json",
                                   json.dumps({"fingerprint": plan.fingerprint(), "layers": self.rows,
                                               "realised_sparsity": plan.realised_sparsity}, indent=1))]
        if self.plot:
            files.append(save_allocation_plot(plan, log_dir / "allocation.png"))
        self.files = files
        rank_zero_info("pruning report: " + ", ".join(str(f) for f in files))

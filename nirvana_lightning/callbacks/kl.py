"""KL divergence from the dense model to the model being pruned and recovered."""

from __future__ import annotations

from itertools import islice
from typing import Literal

import lightning as L

from ..contract import prunable
from ..errors import check_choice, check_positive
from ..eval.kl import compute_kl
from .staged import StagedEvaluation


class KLToDenseCallback(StagedEvaluation):
    """Mean per-token ``KL(P_dense || Q_model)`` on the validation set: after pruning, every N
    steps and after recovery (the dense stage is 0 by definition and not measured).

    The dense model is the module's reference copy (:meth:`NirvanaModule.dense_reference`): the
    distillation teacher when ``objective: kd`` (then it lives where the teacher lives), otherwise
    loaded once from ``model.source`` when this callback first needs it and kept by the module.

    Args:
        every_n_steps: also measure every N optimizer steps.
        device: ``offload`` (default) keeps the dense copy in host memory and moves it to the training
            device only while it is measured (a dense 8B copy is 15 GiB of accelerator memory the run
            does not need between measurements); ``model`` keeps it on the training device (no
            transfers); ``cpu`` runs it on the CPU (slow, no accelerator memory at all). With
            ``objective: kd`` the copy is the teacher and stays where the teacher lives.
        max_batches: validation batches to use (default all).
    """

    prefix = "kl"

    def __init__(self, every_n_steps: int | None = None, device: Literal["offload", "model", "cpu"] = "offload",
                 max_batches: int | None = None) -> None:
        super().__init__(dense=False, every_n_steps=every_n_steps)
        check_choice("KLToDenseCallback.device", device, ("offload", "model", "cpu"))
        if max_batches is not None:
            check_positive("KLToDenseCallback.max_batches", max_batches)
        self.device, self.max_batches = device, max_batches

    def metric_label(self, metric: str) -> str:
        return "KL to dense (nats/token)"

    def summary_rows(self) -> dict[str, dict[str, float]]:
        """As measured, plus ``dense: 0``: the KL of the dense model to itself, by definition."""
        return {label: {"dense": 0.0, **values} for label, values in super().summary_rows().items()}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        prunable(pl_module)  # KLToDenseCallback needs its dense reference

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> dict[str, float]:
        device = next(pl_module.model.parameters()).device  # where the model is (the strategy places it)
        reference = pl_module.dense_reference(device=device if self.device == "model" else "cpu")
        home = next(reference.parameters()).device
        try:
            if self.device == "offload":
                reference.to(device)
            batches = islice(trainer.datamodule.val_dataloader(), self.max_batches)
            return {"val": compute_kl(pl_module.model, reference, batches, device=device)}
        finally:
            reference.to(home)  # back to host memory (or wherever the distillation teacher lives)

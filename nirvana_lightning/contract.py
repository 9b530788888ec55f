"""The declared contract between the LightningModule and the callbacks (no attribute probing).

* :class:`PrunableModule`: what every callback may read or call on the LightningModule.
  :class:`~nirvana_lightning.module.NirvanaModule` implements it; so must any replacement.
* :class:`PruneListener`: callbacks told after each iterative pruning step (they hold parameter
  copies, or report per step).
* :class:`SummarySource`: callbacks whose measurements go into the run summary.

The resume route: the Trainer restores a checkpoint after ``setup``, too late to give the model its
pruned shapes, so the checkpoint path reaches the module first through
:meth:`PrunableModule.resume_from` (the CLI calls it for ``--ckpt_path``; in Python, call it before
``trainer.fit(model, ckpt_path=...)``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .errors import ConfigError

if TYPE_CHECKING:
    import lightning as L
    import torch

    from .pruning.plan import PruningPlan


class PrunableModule(Protocol):
    """The LightningModule side that the callbacks use."""

    #: the model being trained (under any peft wrapper), None until :meth:`build_model`
    model: torch.nn.Module | None
    #: the tokenizer of ``source``, set by :meth:`build_model`
    tokenizer: Any
    #: the composed plan (keep indices into the dense model), None while the model is dense
    pruning_plan: PruningPlan | None
    #: the checkpoint the Trainer will restore (set by :meth:`resume_from`), else None
    resume_ckpt_path: str | None
    #: the module's settings (``source``, ``recovery``, ...), as Lightning saves them
    hparams: Any

    def build_model(self) -> torch.nn.Module:
        """Load the base model once (idempotent) and return it without adapters."""

    @property
    def base_model(self) -> torch.nn.Module:
        """The transformers model under any peft wrapper."""

    def dense_reference(self, device: torch.device | str | None = None) -> torch.nn.Module:
        """The frozen dense model (teacher and KL reference), loaded once, never a submodule."""

    def merge_recovery_adapters(self) -> None:
        """Fold recovery adapters into the base weights (before an iterative step scores the model)."""

    def cut_step(self, step: PruningPlan) -> PruningPlan:
        """Cut a plan made for the current model during training; returns the composed plan."""

    def resume_from(self, ckpt_path: str | None) -> None:
        """Name the checkpoint the Trainer will restore, so its saved plan is cut at setup."""

    def fill_omitted_base(self, checkpoint: dict) -> None:
        """Complete a LoRA checkpoint written without its frozen base (rebuilt from ``source`` + plan)."""


@runtime_checkable
class ChecksBeforeLoad(Protocol):
    """A callback with checks that need the model's config but no weight: :meth:`PrunableModule.build_model`
    runs them before it loads anything (every rank calls them; they may use collectives, e.g. a lock taken on
    rank 0 through :func:`~nirvana_lightning.sharding.on_rank_zero`)."""

    def check_before_load(self, trainer: L.Trainer, pl_module: PrunableModule, config: Any) -> None:
        """``config``: the model's transformers config (``AutoConfig`` of ``source``)."""


@runtime_checkable
class PruneListener(Protocol):
    """A callback told after every pruning step taken during training."""

    def on_nirvana_prune(self, trainer: L.Trainer, pl_module: PrunableModule, plan: PruningPlan) -> None:
        """``plan``: the composed plan after the step."""


@runtime_checkable
class SummarySource(Protocol):
    """A callback whose measurements become rows of the run summary."""

    #: every measurement, ``{stage: {metric: value}}`` (kept in the summary's history)
    results: dict[str, dict[str, float]]

    def summary_rows(self) -> dict[str, dict[str, float]]:
        """``{row label: {stage (dense / pruned / recovered): value}}``."""


class CalibrationData(Protocol):
    """The data-module side the pruning callback uses (:class:`~nirvana_lightning.data.NirvanaDataModule`)."""

    #: the tokenizer of the model source
    tokenizer: Any

    def calibration_windows(self, n_window: int, seq_len: int, seed: int,
                            sources: tuple[str, ...] | None = None) -> torch.Tensor:
        """Seeded calibration windows ``(N, T)``."""

    def calibration_candidates(self, n_candidate: int, n_window: int, seq_len: int, seed: int, mode: str,
                               sources: tuple[str, ...] | None = None) -> tuple[list, list]:
        """Candidate calibration sets for KL selection, with their spans."""

    def probe_windows(self, n_window: int, seq_len: int, seed: int) -> tuple[torch.Tensor, list]:
        """Held-out probe windows, with their spans."""


_ATTRIBUTES = ("model", "tokenizer", "pruning_plan", "resume_ckpt_path", "hparams")
_METHODS = ("build_model", "base_model", "dense_reference", "merge_recovery_adapters", "cut_step", "resume_from",
            "fill_omitted_base")
_DATA_METHODS = ("calibration_windows", "calibration_candidates", "probe_windows")


def prunable(pl_module: Any) -> PrunableModule:
    """``pl_module`` if it implements :class:`PrunableModule`, else a clear error naming what is missing.

    Checked by name without calling anything (``isinstance`` on a runtime-checkable protocol would
    evaluate ``base_model``, which raises before the model is built).
    """
    import inspect

    missing = [n for n in _ATTRIBUTES if not hasattr(pl_module, n)]
    for name in _METHODS:
        try:
            inspect.getattr_static(type(pl_module), name)
        except AttributeError:
            missing.append(name)
    if missing:
        raise ConfigError("model", type(pl_module).__name__, "a LightningModule implementing nirvana_lightning."
                          f"contract.PrunableModule (NirvanaModule does); missing: {', '.join(missing)}")
    return pl_module


def calibration_data(datamodule: Any) -> CalibrationData:
    """``datamodule`` if it implements :class:`CalibrationData`, else a clear error naming what is missing."""
    import inspect

    missing = []
    for name in _DATA_METHODS:
        try:
            inspect.getattr_static(type(datamodule), name)
        except AttributeError:
            missing.append(name)
    if datamodule is None or missing:
        raise ConfigError("data", type(datamodule).__name__, "a datamodule implementing nirvana_lightning.contract."
                          f"CalibrationData (NirvanaDataModule does); missing: {', '.join(missing or _DATA_METHODS)}")
    return datamodule

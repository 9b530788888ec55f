"""After a cut in the middle of training: rebuild what holds the old parameters."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, SingleDeviceStrategy

from ..errors import ConfigError

#: strategies whose wrappers :func:`rebuild_optimization` knows how to rebuild
REBUILDABLE_STRATEGIES = (SingleDeviceStrategy, DDPStrategy, ModelParallelStrategy)


#: the private Lightning / torch names :func:`rebuild_optimization` relies on (no public API re-wraps DDP or
#: fast-forwards a scheduler's cached learning rates); :func:`check_private_api` fails loudly when one is gone
PRIVATE_API = {DDPStrategy: ("_setup_model", "_register_ddp_hooks")}


def check_private_api() -> None:
    """Raise when an installed Lightning lacks a private method :func:`rebuild_optimization` calls."""
    import torch

    for cls, names in PRIVATE_API.items():
        for name in names:
            if not callable(getattr(cls, name, None)):
                raise RuntimeError(f"lightning {L.__version__}: {cls.__name__}.{name} is gone; "
                                   "nirvana_lightning.recovery.rebuild must be updated for this Lightning version")
    scheduler = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0),
                                                  lambda step: 1.0)
    if not hasattr(scheduler, "_last_lr") or not hasattr(scheduler, "lr_lambdas"):
        raise RuntimeError(f"torch {torch.__version__}: LambdaLR no longer has _last_lr / lr_lambdas; "
                           "nirvana_lightning.recovery.rebuild must be updated")


def _rewrap_ddp(strategy: DDPStrategy, pl_module: L.LightningModule) -> None:
    """The private calls, in one place: a new DDP wrapper over the cut module, and its comm hooks."""
    strategy.model = strategy._setup_model(pl_module)
    strategy._register_ddp_hooks()


def check_rebuildable(trainer: L.Trainer, key: str) -> None:
    """Fail early when the Trainer's strategy cannot be re-wrapped after a mid-training cut."""
    strategy = trainer.strategy
    if type(strategy) not in REBUILDABLE_STRATEGIES:
        raise ConfigError(key, type(strategy).__name__,
                          "single-device, ddp or ModelParallelStrategy (FSDP2) for pruning during training")
    check_private_api()


def rebuild_optimization(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
    """Re-wrap the model for DDP and rebuild optimizers and LR schedulers after parameters changed.

    * DDP: a new ``DistributedDataParallel`` over the pruned module (its buckets and its
      parameter broadcast are built from the current parameters).
    * FSDP2 (``ModelParallelStrategy``): nothing to re-wrap here; the module's ``configure_model``
      already sharded the cut model again (:meth:`NirvanaModule.cut_step`).
    * Optimizers: ``configure_optimizers`` runs again, so the optimizer holds exactly the
      trainable parameters that exist now. Adam moments start from zero (the optimizer is
      rebuilt, not patched: composer's and our house rule).
    * Precision: the precision plugin converts the module again (fresh LoRA adapters get the
      dtype of ``bf16-true`` / ``16-true`` runs, as at setup).
    * Schedulers: fast-forwarded to the number of times Lightning has stepped them (optimizer
      steps or epochs, divided by their frequency), so the learning rate continues its curve
      (warmup is not repeated).
    """
    strategy = trainer.strategy
    check_rebuildable(trainer, "trainer.strategy")
    # the precision plugin's conversion again (bf16-true / 16-true), as Strategy.setup does: fresh
    # adapters are created in fp32 by peft and must train in the same dtype as before the cut
    strategy.precision_plugin.convert_module(pl_module)
    if isinstance(strategy, DDPStrategy):
        _rewrap_ddp(strategy, pl_module)
    strategy.setup_optimizers(trainer)
    for config in trainer.lr_scheduler_configs:
        scheduler = config.scheduler
        done = trainer.current_epoch if config.interval == "epoch" else trainer.global_step
        step = done // max(1, config.frequency)  # how many times Lightning has stepped it so far
        scheduler.last_epoch = step
        lrs = [base * fn(step) for fn, base in zip(scheduler.lr_lambdas, scheduler.base_lrs)] \
            if hasattr(scheduler, "lr_lambdas") else None
        if lrs is None:
            raise NotImplementedError(f"cannot fast-forward {type(scheduler).__name__}; use a LambdaLR schedule")
        for group, lr in zip(scheduler.optimizer.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = lrs

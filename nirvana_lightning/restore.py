"""Checkpoint shapes: what a checkpoint of a pruned run carries, and how a module gets its shapes back.

A checkpoint written after pruning holds tensors of the pruned shapes; Lightning loads them into the module as
it is, so the module must have been cut the same way before. The checkpoint carries the plan (never recomputed:
calibration or code may differ since) and, with LoRA, may leave out the frozen base, which is ``source`` + plan.
:class:`~nirvana_lightning.module.NirvanaModule`'s checkpoint hooks call these functions with itself (this module sits
below it: it reads the module's declared state, ``pruning_plan``, ``recovery_applied``, ``base_modified``, and calls
``base_model``, ``keep_float32_buffers`` and ``configure_model``).
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from .errors import ConfigError
from .io import checkpoint_file, load_checkpoint
from .loading import load_model
from .pruning import PruningPlan
from .pruning.api import cut
from .sharding import is_sharded

#: the plan (:meth:`PruningPlan.to_dict`) of the model the checkpoint holds
PLAN_KEY = "nirvana_pruning_plan"
#: set in checkpoints whose state_dict holds the trainable (LoRA) parameters only
BASE_OMITTED_KEY = "nirvana_base_omitted"
#: set in checkpoints whose base weights are no longer ``source`` + plan (adapters merged into them)
BASE_MODIFIED_KEY = "nirvana_base_modified"


def cut_saved_plan(module: L.LightningModule, data: dict | None, origin: str) -> None:
    """Cut the module's base model by a saved plan (``None``: nothing was pruned), biases included."""
    if data is None:
        return
    module.pruning_plan = PruningPlan.from_dict(data)
    cut(module.base_model, module.pruning_plan)
    if module.pruning_plan.provenance.get("bias_compensation"):  # the biases' values come with the checkpoint
        from .pruning.compensation import add_biases

        add_biases(module.base_model, None)
    rank_zero_info(f"restored pruning plan {module.pruning_plan.fingerprint()} from {origin}")


def restore_plan_from_checkpoint(module: L.LightningModule) -> None:
    """When the Trainer resumes from a checkpoint written after pruning, cut the same units now.

    Lightning loads checkpoint weights after ``setup``/``configure_model``; the pruned shapes
    must exist by then, and pruning must not be recomputed (calibration or code may differ).
    """
    if not module.resume_ckpt_path:
        return
    ckpt_path = checkpoint_file(module.resume_ckpt_path)  # a sharded checkpoint keeps the plan in meta.pt
    if not ckpt_path.is_file():
        return  # "last"/"best"/URLs: on_load_checkpoint rebuilds the shapes instead
    checkpoint = load_checkpoint(ckpt_path)  # weights_only: never runs code from the file
    cut_saved_plan(module, checkpoint.get(PLAN_KEY), ckpt_path)


def annotate_checkpoint(module: L.LightningModule, checkpoint: dict) -> None:
    """Add the plan; with LoRA, leave out the frozen base weights (rebuilt from ``source`` and the plan).

    An 8B model's checkpoint would otherwise write its 12 GiB base at every save, for a few MiB of
    adapters. Only while the base is still ``source`` + plan: after an iterative step merged the
    adapters into it (or bias compensation changed it), the base is state to keep and is written in full.
    Sharded checkpoints keep the base too (the distributed checkpoint loader restores every key of the
    module, each rank its shard).
    """
    plan = module.pruning_plan
    if plan is not None:
        checkpoint[PLAN_KEY] = plan.to_dict()
    state = checkpoint.get("state_dict")
    if (module.hparams.recovery == "lora" and module.recovery_applied and state is not None
            and not module.base_modified and not is_sharded(module.trainer.strategy)
            and not (plan is not None and plan.provenance.get("bias_compensation"))):
        trainable = {n for n, p in module.named_parameters() if p.requires_grad}
        frozen = [k for k in state if k.startswith("model.") and k not in trainable]
        for k in frozen:
            del state[k]
        checkpoint[BASE_OMITTED_KEY] = len(frozen)
    if module.base_modified:
        checkpoint[BASE_MODIFIED_KEY] = True


def restore_shapes(module: L.LightningModule, checkpoint: dict) -> None:
    """Make the module's shapes those of the checkpoint before Lightning loads its weights.

    Covers ``load_from_checkpoint``, ``--ckpt_path=last|best`` and Python ``trainer.fit(ckpt_path=...)``
    without ``resume_ckpt_path``: when the model's plan differs from the saved one, the base
    model is reloaded, the saved plan applied and the recovery adapters attached again.
    Optimizers do not exist yet at this point, so nothing else holds the old parameters.
    """
    saved = checkpoint.get(PLAN_KEY)
    current = module.pruning_plan.fingerprint() if module.pruning_plan is not None else None
    wanted = PruningPlan.from_dict(saved).fingerprint() if saved is not None else None
    # a base that recovery merged into stays "modified" in every later checkpoint (written in full)
    module.base_modified = bool(checkpoint.get(BASE_MODIFIED_KEY))
    trainer = module._trainer
    if current != wanted and trainer is not None and is_sharded(trainer.strategy):
        raise ConfigError("ckpt_path", "last/best", "an explicit checkpoint directory under a sharded strategy "
                          "(it is restored after the model is sharded, too late to change its shapes; a path "
                          "is read at setup)")
    try:
        if current == wanted:
            return
        recovery_applied = module.recovery_applied
        module.model, module.pruning_plan, module.recovery_applied = None, None, False
        hp = module.hparams
        module.model, module.tokenizer = load_model(hp.source, hp.dtype, cache_dir=hp.cache_dir)
        module.keep_float32_buffers()
        cut_saved_plan(module, saved, "the checkpoint")
        if recovery_applied or any(".lora_" in k for k in checkpoint.get("state_dict", {})):
            module.configure_model()  # the checkpoint's adapters need their modules (load_from_checkpoint too)
    finally:
        fill_omitted_base(module, checkpoint)


def fill_omitted_base(module: L.LightningModule, checkpoint: dict) -> None:
    """A LoRA checkpoint without its frozen base: take the base from the model as rebuilt (``source`` + plan),
    so the strict load that follows still checks every key and shape."""
    if not checkpoint.get(BASE_OMITTED_KEY):
        return
    state = checkpoint["state_dict"]
    for name, tensor in module.state_dict().items():
        if name.startswith("model.") and name not in state:
            state[name] = tensor

"""The LightningModule: lifecycle glue around a Hugging Face causal LM (no pruning maths here)."""

from __future__ import annotations

import functools
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torchmetrics.aggregation import MeanMetric

from . import restore
from .devices import resolve_device
from .errors import ConfigError, check_choice, check_positive
from .families import ROLES, get_family, remote_modeling, unwrap_model
from .loading import DTYPES, load_model, validate_source
from .pruning import PruningPlan
from .pruning.api import cut
from .pruning.plan import compose_plans
from .recovery import RECOVERY_MODES, apply_recovery
from .recovery.lora import merge_into_base, merged_model
from .recovery.objectives import distillation_loss, lm_loss, warmup_cosine
from .recovery.precision import adapters_in_float32, float32_buffers, restore_buffers
from .sharding import (
    check_strategy,
    full_state_dict,
    is_fully_sharded,
    is_sharded,
    load_from_rank_zero,
    on_rank_zero,
    shard_model,
)

OBJECTIVES = ("lm", "kd")


class NirvanaModule(L.LightningModule):
    """Wraps a causal LM for recovery training and evaluation.

    The model is loaded lazily by :meth:`build_model` (called by the pruning callback at setup,
    or by :meth:`configure_model`), so a bad config fails before any weights are read and
    pruning happens before adapters, optimizers and distributed wrappers exist.

    Args:
        source: embedded name (``smollm2-135m``), local HF directory or hub id.
        dtype: weight dtype at load time; mixed precision comes from ``trainer.precision``.
        cache_dir: where embedded models are converted.
        recovery: ``lora``, ``full`` or ``none``.
        lora_r / lora_alpha / lora_dropout: LoRA hyper-parameters.
        lora_targets: roles (``q k v o gate up down``) that receive adapters.
        lr / weight_decay / betas: AdamW settings.
        warmup_steps: linear warmup steps, then cosine decay to ``min_lr_ratio * lr``.
        min_lr_ratio: the learning rate at the end of the cosine decay, as a fraction of ``lr``.
        gradient_checkpointing: recompute activations in backward to save memory.
        objective: ``lm`` (next-token loss) or ``kd`` (distillation from the dense model).
        kd_temperature: softmax temperature tau of both teacher and student in ``kd``; the KL term
            is scaled by tau**2 so its gradient scale does not depend on tau.
        kd_alpha: weight of the KL term; the loss is ``kd_alpha * KL + (1 - kd_alpha) * LM``.
        teacher_device: where the frozen dense teacher lives (default: the training device): ``cpu``,
            ``+N`` (this rank's accelerator index + N, modulo the node's count: 4 ranks on cuda:0-3 of an
            8-GPU node with ``+4`` put their teachers on cuda:4-7), or a device such as ``cuda:1``
            (single process only: under DDP every rank's teacher would land on that one GPU).
        teacher_dtype: teacher weight dtype (default: ``dtype``), e.g. ``bfloat16`` to halve its memory.
    """

    # ------------------------------------------------ state: plain attributes (never submodules), declared once
    #: recovery (LoRA adapters, or full recovery's trainable flags) is applied to ``model``
    recovery_applied: bool = False
    #: the base weights are no longer ``source`` + plan (adapters merged into them): checkpoints carry the base
    base_modified: bool = False
    #: this process read the weights from ``source`` (False before loading and on sharding's other ranks)
    read_weights: bool = False
    #: the frozen dense model (:meth:`dense_reference`), kept out of ``_modules`` (checkpoints, optimizers)
    _dense_reference: torch.nn.Module | None = None
    #: the model's float32 buffers as loaded (None: not taken yet), put back after every precision conversion
    _float32_buffers: dict[str, torch.Tensor] | None = None
    #: the data's sequence length was compared with the model's context (warned once)
    _context_checked: bool = False
    #: the half-precision full-recovery warning was given
    _warned_half: bool = False
    #: the long-warmup warning was given
    _warned_warmup: bool = False

    def __init__(
        self,
        source: str = "smollm2-135m",
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        cache_dir: str | None = None,
        recovery: Literal["lora", "full", "none"] = "lora",
        lora_r: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.05,
        lora_targets: list[str] | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 10,
        min_lr_ratio: float = 0.1,
        gradient_checkpointing: bool = False,
        objective: Literal["lm", "kd"] = "lm",
        kd_temperature: float = 1.0,
        kd_alpha: float = 1.0,
        teacher_device: str | None = None,
        teacher_dtype: Literal["float32", "bfloat16", "float16"] | None = None,
    ) -> None:
        super().__init__()
        validate_source(source, "model.source")
        check_choice("model.dtype", dtype, DTYPES)
        check_choice("model.recovery", recovery, RECOVERY_MODES)
        lora_targets = list(lora_targets) if lora_targets is not None else list(ROLES)
        for i, role in enumerate(lora_targets):
            check_choice(f"model.lora_targets[{i}]", role, ROLES)
        check_positive("model.lr", lr)
        check_positive("model.lora_r", lora_r)
        check_positive("model.warmup_steps", warmup_steps, allow_zero=True)
        check_positive("model.weight_decay", weight_decay, allow_zero=True)
        if not 0.0 <= lora_dropout < 1.0:
            raise ConfigError("model.lora_dropout", lora_dropout, "a probability in [0, 1)")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ConfigError("model.min_lr_ratio", min_lr_ratio, "a fraction in [0, 1]")
        check_choice("model.objective", objective, OBJECTIVES)
        check_positive("model.kd_temperature", kd_temperature)
        if not 0.0 <= kd_alpha <= 1.0:
            raise ConfigError("model.kd_alpha", kd_alpha, "a weight in [0, 1]")
        if teacher_dtype is not None:
            check_choice("model.teacher_dtype", teacher_dtype, DTYPES)
        if teacher_device is not None:
            resolve_device(teacher_device, torch.device("cpu"), 1, key="model.teacher_device")  # syntax only
        if objective == "kd" and recovery == "none":
            raise ConfigError("model.objective", objective, "'lm' when recovery is 'none' (nothing is trained)")
        self.save_hyperparameters()
        self.model: torch.nn.Module | None = None
        self.tokenizer = None
        self.pruning_plan: PruningPlan | None = None
        #: checkpoint the Trainer will restore (set through :meth:`resume_from`)
        self.resume_ckpt_path: str | None = None
        self.val_nll = MeanMetric()

    # ------------------------------------------------------------ lifecycle
    def build_model(self) -> torch.nn.Module:
        """Load the base model once (idempotent) and return it (unwrapped, without adapters)."""
        if self.model is None:
            hp = self.hparams
            if self._trainer is not None:  # strategies and callbacks that cannot run right: before any weight loads
                check_strategy(self._trainer.strategy, self._trainer.callbacks)
                self._check_callbacks_before_load(self._trainer)
            device = self._load_device()
            self.model, self.tokenizer = load_model(hp.source, hp.dtype, cache_dir=hp.cache_dir, device=device)
            self.read_weights = device != "meta"
            self.keep_float32_buffers()
            restore.restore_plan_from_checkpoint(self)
        return self.base_model

    def _check_callbacks_before_load(self, trainer) -> None:
        """Every callback's :class:`~nirvana_lightning.contract.ChecksBeforeLoad` check, with the config only."""
        from transformers import AutoConfig

        from .contract import ChecksBeforeLoad
        from .loading import resolve_source

        checks = [c for c in trainer.callbacks if isinstance(c, ChecksBeforeLoad)]
        if checks:
            config = AutoConfig.from_pretrained(resolve_source(self.hparams.source, self.hparams.cache_dir))
            for callback in checks:
                callback.check_before_load(trainer, self, config)

    def resume_from(self, ckpt_path: str | None) -> None:
        """Name the checkpoint the Trainer will restore, before ``fit`` / ``validate`` / ``test`` starts.

        The Trainer loads checkpoint weights after ``setup``; the saved plan must be cut before that, when
        the model is built (:meth:`build_model`). The CLI calls this for ``--ckpt_path``; in Python call
        ``module.resume_from(path)`` before ``trainer.fit(module, ckpt_path=path)``. (``last`` / ``best`` and
        Python calls without it still work: :meth:`on_load_checkpoint` rebuilds the shapes then.)
        """
        self.resume_ckpt_path = str(ckpt_path) if ckpt_path else None

    def dense_reference(self, device: torch.device | str | None = None) -> torch.nn.Module:
        """The frozen dense model (the distillation teacher and the KL reference), loaded once.

        Loaded from ``source`` (not copied from the student, which may already be pruned or
        resumed), in ``teacher_dtype``, on ``teacher_device`` or else ``device`` or else the
        module's device. It is not a submodule: it is never in checkpoints, optimizers,
        distributed wrappers or ``parameters()``. Later calls return the same object.
        """
        teacher = self._dense_reference
        if teacher is None:
            hp = self.hparams
            teacher, _ = load_model(hp.source, hp.teacher_dtype or hp.dtype, cache_dir=hp.cache_dir)
            teacher.requires_grad_(False)
            teacher.eval()
            teacher.to(self._teacher_device() if hp.teacher_device else (device or self.device))
            object.__setattr__(self, "_dense_reference", teacher)  # bypasses nn.Module registration on purpose
            rank_zero_info(f"dense reference loaded on {next(teacher.parameters()).device} "
                           f"({next(teacher.parameters()).dtype})")
        return teacher

    def _load_device(self) -> str | None:
        """Where :meth:`build_model` puts the weights it loads.

        Single device and DDP: each rank's own accelerator, straight (no host copy per rank). Sharded
        (FSDP2): rank 0 loads the model in host memory (it scores it and is the source of every rank's
        shards); the other ranks build it on the meta device, read no weight and receive their shards
        from rank 0 in :meth:`configure_model` (8 ranks of a 70B model would otherwise hold 8 host copies).
        """
        trainer = self._trainer
        if trainer is None:
            return None
        if is_sharded(trainer.strategy):
            return "meta" if trainer.global_rank != 0 else None
        return None if trainer.strategy.root_device.type == "cpu" else str(trainer.strategy.root_device)

    def _teacher_device(self) -> torch.device:
        trainer = self._trainer
        root = trainer.strategy.root_device if trainer is not None else self.device
        world = trainer.world_size if trainer is not None else 1
        return resolve_device(self.hparams.teacher_device, root, world, key="model.teacher_device")

    PLAN_KEY = restore.PLAN_KEY
    BASE_OMITTED_KEY = restore.BASE_OMITTED_KEY
    BASE_MODIFIED_KEY = restore.BASE_MODIFIED_KEY

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Add the plan; with LoRA, leave out the frozen base (:func:`~nirvana_lightning.restore.annotate_checkpoint`)."""
        restore.annotate_checkpoint(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Make the model's shapes those of the checkpoint before Lightning loads its weights
        (:func:`~nirvana_lightning.restore.restore_shapes`)."""
        restore.restore_shapes(self, checkpoint)

    def fill_omitted_base(self, checkpoint: dict) -> None:
        """A LoRA checkpoint without its frozen base: take the base from the model as rebuilt (``source`` + plan),
        so the strict load that follows still checks every key and shape."""
        restore.fill_omitted_base(self, checkpoint)

    def _warn_beyond_context(self) -> None:
        """Windows longer than the model's context give positions it never saw: say so once, before training."""
        if self._context_checked:
            return
        self._context_checked = True
        limit = get_family(self.base_model).max_sequence_length
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if limit is None or datamodule is None:
            return
        value = getattr(datamodule, "seq_len", None)
        if isinstance(value, int) and value > limit:
            rank_zero_warn(f"data.seq_len={value} exceeds the model's context of {limit} positions: positions "
                           "beyond it were never trained and quality will suffer (lower data.seq_len)")

    def merge_recovery_adapters(self) -> None:
        """Fold LoRA adapters into the base weights and drop the wrapper (no-op without adapters).

        Called before an iterative step scores the model, so saliency sees the weights that
        recovery produced (``W + BA``), not the frozen base.
        """
        if is_fully_sharded(self.model):
            self._unshard_for_pruning()
            return
        if self.recovery_applied and self.hparams.recovery == "lora":
            self.model = merge_into_base(self.model)
            self.recovery_applied = False
            self.base_modified = True  # checkpoints must now carry the base

    def _unshard_for_pruning(self) -> None:
        """Sharded (FSDP2): replace the sharded model by a plain one that can be scored and cut (a collective).

        Every rank sends its shards; rank 0 receives the full state in host memory and builds the plain
        model from it with the LoRA adapters merged (what recovery learnt so far is kept); the other ranks
        build the same shapes on the meta device. After the cut, :meth:`configure_model` attaches fresh
        adapters, shards again and fills the shards from rank 0, as at the start of the run.
        """
        trainer = self.trainer
        state = full_state_dict(self.model)
        built: dict[str, torch.nn.Module] = {}

        def build() -> None:  # rank 0; a failure is sent to the other ranks instead of leaving them waiting
            built["model"] = merged_model(self.model, state)

        on_rank_zero(trainer, build, what="gathering the sharded model for pruning")
        plain = built.get("model")
        if plain is None:
            base = unwrap_model(self.model)
            with torch.device("meta"):
                plain = remote_modeling.pruned_class(base.config.model_type)(base.config)
            plain.to(base.get_input_embeddings().weight.dtype)
        self.model = plain
        self.recovery_applied = False
        self.base_modified = True

    def cut_step(self, step: PruningPlan) -> PruningPlan:
        """Cut ``step`` (a plan made for the model as it is now) during training; returns the composed plan.

        LoRA recovery: the adapters are merged into the base weights (if
        :meth:`merge_recovery_adapters` did not already), the base is cut, and fresh adapters are attached (B = 0, so the function is unchanged by re-attaching). Merging
        first keeps what recovery learnt so far and lets the next scoring see the real weights;
        slicing adapter matrices instead would leave low-rank products on removed units. Full
        recovery: the parameters are cut in place. Either way the optimizer and its scheduler
        must be rebuilt afterwards (:func:`nirvana_lightning.recovery.rebuild_optimization`),
        since they hold the old parameter objects.
        """
        self.merge_recovery_adapters()
        base = self.base_model
        base.zero_grad(set_to_none=True)
        cut(base, step)
        previous = self.pruning_plan  # None when the schedule's first step comes during training
        if previous is None:
            self.pruning_plan = PruningPlan.from_dict(step.to_dict())
        else:  # steps at two granularities compose at query_head, with the unit costs the family declares there
            family = get_family(base)
            kinds = [family.unit_kinds(layer, "query_head") for layer in family.layers()] \
                if previous.granularity != step.granularity else None
            self.pruning_plan = compose_plans(previous, step, kinds)
        if not self.recovery_applied:
            self.configure_model()
        self.model.to(self.device)
        return self.pruning_plan

    @property
    def base_model(self) -> torch.nn.Module:
        """The transformers model under any peft wrapper."""
        if self.model is None:
            raise RuntimeError("model not built yet: call build_model() first")
        return unwrap_model(self.model)

    def configure_model(self) -> None:
        """Build the model and attach the recovery adapters (after any pruning at setup)."""
        self.build_model()
        if self._float32_buffers is None:  # a model handed in as module.model, not loaded by build_model
            self.keep_float32_buffers()
        self._warn_beyond_context()
        if self.recovery_applied:
            return
        hp = self.hparams
        self.model = apply_recovery(self.model, hp.recovery, lora_r=hp.lora_r, lora_alpha=hp.lora_alpha,
                                    lora_dropout=hp.lora_dropout, lora_targets=hp.lora_targets or ROLES)
        if hp.gradient_checkpointing:
            base = self.base_model
            kwargs = {"use_reentrant": False}
            if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x name
                base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            self.base_model.config.use_cache = False
        self.model.train()  # loaded in eval mode; dropout (LoRA) must be live during recovery
        self.recovery_applied = True
        trainer = self._trainer
        if trainer is not None and getattr(self, "_device_mesh", None) is not None and is_sharded(trainer.strategy):
            # ModelParallelStrategy (FSDP2): after pruning and LoRA, so each rank keeps 1/N of the pruned model
            mesh = self.device_mesh
            if mesh["tensor_parallel"].size() != 1:
                raise ConfigError("trainer.strategy.init_args.tensor_parallel_size", mesh["tensor_parallel"].size(),
                                  "1 (layers of per-layer widths are sharded with FSDP2, not split by tensor "
                                  "parallelism; set data_parallel_size to the number of processes)")
            full = self.model.state_dict() if trainer.global_rank == 0 else {}  # references: no copy
            buffers = {n: b.cpu() for n, b in self.model.named_buffers()} if trainer.global_rank == 0 else None
            shard_model(self.model, mesh["data_parallel"])
            load_from_rank_zero(self.model, full, trainer.strategy.broadcast(buffers, src=0),
                                trainer.strategy.root_device)
            self.keep_float32_buffers()  # the other ranks' snapshot was taken of meta tensors

    def forward(self, **batch):
        return self.model(**batch)

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict, batch_idx: int):
        if self.hparams.objective == "kd":
            loss, n_token = self._distillation_loss(batch)
        else:
            loss, n_token = lm_loss(self.model, batch)
        self._stop_unless_finite("loss", loss.detach())
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        self.log("train/tokens", float(n_token), reduce_fx="sum", batch_size=1)
        if self.hparams.recovery == "none":
            return None  # nothing is trainable: no backward
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return  # fp16 loss scaling: an overflowing step is skipped by the GradScaler, by design
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(g.detach(), dtype=torch.float32) for g in grads]))
            self._stop_unless_finite("gradient norm", norm)

    def _stop_unless_finite(self, what: str, value: torch.Tensor) -> None:
        """Stop the run with a clear error at the first non-finite loss or gradient (on every rank at once).

        Lightning offers ``Trainer(detect_anomaly=True)`` (autograd anomaly mode: slow, backward only) and
        ``EarlyStopping(check_finite=True)`` (a monitored metric, checked at validation time, no error);
        neither stops at the first bad step, so the check is here: one all-reduce of a flag per step
        under a distributed strategy, nothing else.
        """
        finite = bool(torch.isfinite(value).all())
        if self.trainer.world_size > 1:
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            lrs = [g["lr"] for opt in self.trainer.optimizers for g in opt.param_groups]
            raise FloatingPointError(
                f"non-finite {what} ({value.item() if value.numel() == 1 else value}) at global step "
                f"{self.trainer.global_step} with learning rate {lrs}: training stopped before any non-finite "
                "weight could be exported; lower model.lr, check the data, or use 32-bit precision")

    def _distillation_loss(self, batch: dict) -> tuple[torch.Tensor, int]:
        """``alpha * tau^2 * KL(teacher_tau || student_tau) + (1 - alpha) * LM`` per scored token."""
        hp = self.hparams
        teacher = self.dense_reference()
        wanted = self._teacher_device() if hp.teacher_device else self.device
        if next(teacher.parameters()).device != wanted:  # e.g. first loaded on the CPU by KLToDenseCallback
            teacher.to(wanted)
        out = distillation_loss(self.model, teacher, batch, temperature=hp.kd_temperature, alpha=hp.kd_alpha)
        bs = batch["input_ids"].shape[0]
        self.log("train/kd", out["kd"].detach(), batch_size=bs)
        if out["lm"] is not None:
            self.log("train/lm_loss", out["lm"].detach(), batch_size=bs)
        return out["loss"], out["n_token"]

    def _accumulate_metrics_in_full_precision(self) -> None:
        """``bf16-true`` / ``16-true`` convert the whole module, torchmetrics states included; a perplexity summed
        over hundreds of batches in bf16 is off by percents. The states are put back into float64 (float32 on
        MPS) before every evaluation loop, after any conversion."""
        dtype = torch.float32 if self.device.type == "mps" else torch.float64
        self.val_nll.set_dtype(dtype)

    def on_validation_start(self) -> None:
        self._accumulate_metrics_in_full_precision()
        self._restore_float32_buffers()

    def on_test_start(self) -> None:
        self._accumulate_metrics_in_full_precision()
        self._restore_float32_buffers()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, n_token = lm_loss(self.model, batch)
        self.val_nll.update(loss.detach().float(), weight=n_token)

    def _log_epoch_nll(self, prefix: str) -> None:
        nll = self.val_nll.compute()  # token-weighted, already reduced across ranks by torchmetrics
        self.val_nll.reset()
        self.log(f"{prefix}/loss", nll)
        self.log(f"{prefix}/ppl", torch.exp(nll), prog_bar=prefix == "val")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_nll("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self._log_epoch_nll("test")

    # ------------------------------------------------------------ optimizer
    def keep_float32_buffers(self) -> None:
        """Remember the model's float32 buffers (RoPE ``inv_freq``) as loaded, before any precision plugin runs."""
        self._float32_buffers = float32_buffers(self.base_model)

    def _restore_float32_buffers(self) -> None:
        """Undo the precision plugin's conversion of float32 buffers (:func:`~.recovery.precision.restore_buffers`)."""
        if self.model is not None:
            restore_buffers(self.base_model, self._float32_buffers or {})

    def _apply(self, fn, recurse: bool = True):
        """Every conversion of the module (``bf16-true``'s ``module.to(bfloat16)``, device moves) ends with the
        float32 buffers and LoRA adapters put back: here, not in a later hook, because DDP wraps the module
        right after the precision plugin converts it and builds its gradient buckets from the dtypes then."""
        super()._apply(fn, recurse)
        if getattr(self, "model", None) is not None and self._float32_buffers is not None:
            self._restore_float32_buffers()
            self._trainable_in_float32([p for p in self.model.parameters() if p.requires_grad], strict=False)
        return self

    def _trainable_in_float32(self, params: list[torch.nn.Parameter], strict: bool = True) -> None:
        """LoRA adapters stay float32 (:func:`~.recovery.precision.adapters_in_float32`); runs after every
        conversion of the module and again when the optimizer is built (``strict``)."""
        if self.hparams.recovery == "lora":
            precision = str(self.trainer.precision) if strict else ""
            adapters_in_float32(params, strict=strict, precision=precision)
        elif strict and any(p.dtype in (torch.bfloat16, torch.float16) for p in params) \
                and not self._warned_half:
            self._warned_half = True
            rank_zero_warn("recovery 'full' with half-precision weights: weights and AdamW states are "
                           f"{params[0].dtype}, so small updates are lost; use trainer.precision bf16-mixed "
                           "with model.dtype float32 for float32 master weights")

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            return None
        self._trainable_in_float32(params)  # strict: a sharded adapter left in a half dtype is an error here
        hp = self.hparams
        optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay, betas=tuple(hp.betas))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(hp.warmup_steps, total)
        if hp.warmup_steps > total // 2 and not self._warned_warmup:
            self._warned_warmup = True
            rank_zero_warn(f"model.warmup_steps={hp.warmup_steps} is more than half of this run's {total} optimizer "
                           "steps: the learning rate barely decays (lower model.warmup_steps)")

        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, functools.partial(warmup_cosine, warmup=warmup, total=total, min_lr_ratio=hp.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

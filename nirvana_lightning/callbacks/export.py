"""ExportCallback: write the pruned (and recovered) model as a Hugging Face directory."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from ..contract import prunable
from ..errors import ConfigError, check_choice
from ..export import save_pruned
from ..families import unwrap_model
from ..io import PathLock, PathLocked, load_checkpoint, write_dir_atomic
from ..recovery.lora import merged_model
from ..serving.gguf_export import GGUF_DTYPES, check_gguf_support, save_gguf
from ..sharding import full_state_dict, is_fully_sharded, is_sharded, on_rank_zero

FORMATS = ("hf", "gguf")


class ExportCallback(L.Callback):
    """At fit end, export the model: a Hugging Face directory (:func:`nirvana_lightning.save_pruned`, which
    transformers, and vLLM through our plugin, load) and/or GGUF files (:func:`nirvana_lightning.save_gguf`,
    for llama.cpp and Ollama).

    Args:
        path: destination directory (relative paths are resolved against ``trainer.log_dir``).
        overwrite: replace an existing non-empty destination.
        adapter_only: write only the LoRA adapter, the plan and a base reference (``hf`` only).
        best: export the best checkpoint of the Trainer's ``ModelCheckpoint`` instead of the final
            weights (they are loaded into the model first).
        format: ``hf``, ``gguf`` or both (``[hf, gguf]``). GGUF files go to ``<path>/gguf/model-<dtype>.gguf``
            with an Ollama ``Modelfile`` each.
        gguf_dtypes: the GGUF weight types to write (``f32``, ``f16``, ``bf16``, ``q8_0``, ``q4_0``), each once.
        quantize: ``int8_weight_only`` writes the Hugging Face export's block weights as torchao int8
            (:func:`nirvana_lightning.save_pruned`'s ``quantize``); null keeps them float.

    The destination is checked before the model loads: not a file, empty (or ``overwrite``), writable, and
    not claimed by another running fit (a lock ``.<name>.lock`` beside it, held until this fit ends). If
    the export still fails at fit end, the trained model is first saved to ``<path>.fallback-<time>`` (a
    plain Hugging Face export) and the error names that directory.
    """

    def __init__(self, path: str = "export", overwrite: bool = False, adapter_only: bool = False,
                 best: bool = False, format: str | list[str] = "hf", gguf_dtypes: list[str] | str | None = None,
                 quantize: str | None = None) -> None:
        if not path:
            raise ConfigError("ExportCallback.path", path, "a directory path")
        formats = [format] if isinstance(format, str) else list(format)
        if not formats:
            raise ConfigError("ExportCallback.format", format, f"one or more of {list(FORMATS)}")
        for f in formats:
            check_choice("ExportCallback.format", f, FORMATS)
        dtypes = [gguf_dtypes] if isinstance(gguf_dtypes, str) else list(gguf_dtypes) if gguf_dtypes is not None \
            else ["f16"]
        for d in dtypes:
            check_choice("ExportCallback.gguf_dtypes", d, GGUF_DTYPES)
        repeated = sorted({d for d in dtypes if dtypes.count(d) > 1})
        if repeated:
            raise ConfigError("ExportCallback.gguf_dtypes", dtypes, f"each type once (one file per type; {repeated} "
                              "repeated)")
        if quantize is not None:
            from ..serving.quantize import METHODS

            check_choice("ExportCallback.quantize", quantize, METHODS)
            if adapter_only:
                raise ConfigError("ExportCallback.quantize", quantize, "null with adapter_only: true (the adapter "
                                  "needs the float base)")
            if "hf" not in formats:
                raise ConfigError("ExportCallback.quantize", quantize, "null unless format includes hf (GGUF has its "
                                  "own types: gguf_dtypes)")
            try:
                import torchao  # noqa: F401
            except ImportError:
                raise ConfigError("ExportCallback.quantize", quantize, "null, or install torchao "
                                  "(pip install 'nirvana-lightning[quant]')") from None
        if "gguf" in formats and not dtypes:
            raise ConfigError("ExportCallback.gguf_dtypes", dtypes, f"one or more of {list(GGUF_DTYPES)}")
        if adapter_only and "gguf" in formats:
            raise ConfigError("ExportCallback.adapter_only", True, "false when format includes gguf (GGUF holds "
                              "the merged model)")
        self.path, self.overwrite, self.adapter_only, self.best = path, overwrite, adapter_only, best
        self.formats, self.gguf_dtypes, self.quantize = formats, dtypes, quantize
        self.exported: Path | None = None
        self.fallback: Path | None = None  # where the trained model went when the export failed
        self._lock: PathLock | None = None  # rank 0's claim on the destination, from setup to fit end
        self._checked = False

    def check_before_load(self, trainer: L.Trainer, pl_module: L.LightningModule, config) -> None:
        """Everything about the destination and the format that can be known from the config (no weights)."""
        if getattr(trainer.state, "fn", None) not in (None, "fit"):
            return
        self._check_settings(trainer, pl_module)
        if "gguf" in self.formats:
            from ..serving.gguf_export import ARCHITECTURES

            if config.model_type not in ARCHITECTURES:
                raise ConfigError("ExportCallback.format", "gguf", f"hf only for model_type {config.model_type!r}: "
                                  f"GGUF files are written for {sorted(ARCHITECTURES)}")
        self._claim_destination(trainer)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._check_settings(trainer, pl_module)
        self._claim_destination(trainer)  # done already when the module ran the checks before loading

    def _check_settings(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.adapter_only and pl_module.hparams.get("recovery") != "lora":
            raise ConfigError("ExportCallback.adapter_only", True, "false unless model.recovery is 'lora'")
        if self.best and trainer.checkpoint_callback is None:
            raise ConfigError("ExportCallback.best", True, "a ModelCheckpoint in trainer.callbacks")
        if is_sharded(trainer.strategy):
            for key, value in (("adapter_only", self.adapter_only), ("best", self.best)):
                if value:
                    raise ConfigError(f"ExportCallback.{key}", True, f"false under {type(trainer.strategy).__name__}: "
                                      "the sharded export gathers and merges the final weights (an adapter-only "
                                      "or best-checkpoint export from shards is not implemented)")

    def _claim_destination(self, trainer: L.Trainer) -> None:
        """Not a file, empty or ``overwrite``, writable, and locked for this run (rank 0; errors reach every rank)."""
        if self._checked:
            return
        target = self._target(trainer)  # on every rank: log_dir is a broadcast
        on_rank_zero(trainer, lambda: self._lock_target(target), what="ExportCallback's destination check")
        self._checked = True

    def _lock_target(self, target: Path) -> None:
        if target.exists() and not target.is_dir():
            raise ConfigError("ExportCallback.path", str(target), "a directory path (this is a file)")
        if target.exists() and any(target.iterdir()) and not self.overwrite:  # fail before any training
            raise ConfigError("ExportCallback.path", str(target), "a new or empty directory, or overwrite: true")
        blocker = next((p for p in target.parents if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise ConfigError("ExportCallback.path", str(target), f"a writable location ({blocker} is a file, not a "
                              "directory)")
        try:  # creating the lock file beside the destination proves the directory is writable
            self._lock = PathLock(target).acquire(wait=False)
        except PathLocked as err:
            raise ConfigError("ExportCallback.path", str(target), f"a destination no other running fit exports to "
                              f"({err.strerror})") from None
        except OSError as err:
            raise ConfigError("ExportCallback.path", str(target), f"a writable location ({err.strerror or err}: "
                              f"{err.filename or target.parent})") from None

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._release()
        self._checked = False

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._release()

    def _target(self, trainer: L.Trainer) -> Path:
        path = Path(self.path)
        return path if path.is_absolute() else Path(trainer.log_dir or trainer.default_root_dir) / path

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.best:
            ckpt = trainer.checkpoint_callback
            if not (isinstance(ckpt, ModelCheckpoint) and ckpt.best_model_path):
                raise RuntimeError("ExportCallback(best=True): the ModelCheckpoint saved no best checkpoint "
                                   "(set its monitor and make sure validation runs)")
            checkpoint = load_checkpoint(ckpt.best_model_path, mmap=False)  # never runs code
            pl_module.fill_omitted_base(checkpoint)  # a LoRA checkpoint holds the adapters only
            pl_module.load_state_dict(checkpoint["state_dict"])
        metrics = {k: round(float(v), 6) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        model = pl_module.model
        if is_fully_sharded(model):  # FSDP2: every rank sends its shards, rank 0 builds the plain model
            state = full_state_dict(model)
            model = merged_model(model, state) if trainer.global_rank == 0 else None
        self._export(self._target(trainer), pl_module, model, metrics)  # _target on every rank: log_dir broadcasts
        self._release()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """GGUF refusals (family, widths, rope, tokenizer) surface before training, not after it."""
        plan = prunable(pl_module).pruning_plan
        if self.adapter_only and plan is not None and plan.provenance.get("bias_compensation"):
            raise ConfigError("ExportCallback.adapter_only", True, "false with bias compensation (the compensated "
                              "biases belong to the base, which an adapter-only export does not carry)")
        if "gguf" in self.formats:
            self._check_gguf(pl_module)

    @staticmethod
    def _save_fallback(target: Path, pl_module, model, tokenizer, plan, metrics, err: BaseException) -> Path:
        """The trained model as a plain float Hugging Face export beside ``target`` (or in the working
        directory when that is not writable): a late export failure never loses the training."""
        import time

        stamp = time.strftime("%Y%m%d-%H%M%S")
        for parent in (target.parent, Path.cwd()):
            fallback = parent / f"{target.name}.fallback-{stamp}"
            try:
                return write_dir_atomic(fallback, lambda tmp: save_pruned(
                    model, tokenizer, tmp, plan, base_model=pl_module.hparams.source, metrics=metrics, into=tmp),
                    manifest=True)
            except Exception:  # noqa: BLE001 - try the next place; the original error is raised by the caller
                continue
        raise RuntimeError(f"ExportCallback: the export to {target} failed ({type(err).__name__}: {err}) and so did "
                           f"the fallback saves beside it and in {Path.cwd()}") from err

    @staticmethod
    def _check_gguf(pl_module: L.LightningModule) -> None:
        try:
            check_gguf_support(pl_module.model, pl_module.tokenizer)
        except ConfigError as err:
            raise ConfigError("ExportCallback.format", "gguf", f"a model GGUF can express: {err}") from None

    @rank_zero_only
    def _export(self, target: Path, pl_module: L.LightningModule, model, metrics: dict) -> None:
        tokenizer, plan = pl_module.tokenizer, pl_module.pruning_plan
        gguf_error = None
        if "gguf" in self.formats:
            try:  # an iterative schedule may have changed the widths since training started
                self._check_gguf(pl_module)
            except ConfigError as err:
                gguf_error = err
        if gguf_error is not None and "hf" not in self.formats:
            raise gguf_error
        if "gguf" in self.formats and gguf_error is None and unwrap_model(model) is not model:
            model = merged_model(model)  # merge LoRA once for every file (no copy of the model)

        def write(tmp: Path) -> None:
            if "hf" in self.formats:
                save_pruned(model, tokenizer, tmp, plan, adapter_only=self.adapter_only,
                            base_model=pl_module.hparams.source, metrics=metrics, into=tmp, quantize=self.quantize)
            for dtype in self.gguf_dtypes if "gguf" in self.formats and gguf_error is None else ():
                save_gguf(model, tokenizer, tmp / "gguf" / f"model-{dtype}.gguf", plan, dtype=dtype,
                          name=pl_module.hparams.source)

        # one atomic swap for everything: the destination holds the old export or the complete new one
        try:
            self.exported = write_dir_atomic(target, write, overwrite=self.overwrite, manifest=True)
        except Exception as err:  # noqa: BLE001 - the trained model is saved first, then the error is raised
            self.fallback = self._save_fallback(target, pl_module, model, tokenizer, plan, metrics, err)
            raise RuntimeError(f"ExportCallback: the export to {target} failed ({type(err).__name__}: {err}); the "
                               f"trained model was saved to {self.fallback} (a Hugging Face export: load_pruned, or "
                               "save_pruned / save_gguf it again from there)") from err
        if gguf_error is not None:  # the trained model is kept (HF), then the refusal is reported
            raise ConfigError(gguf_error.key, gguf_error.value,
                              f"{gguf_error.expected} (the Hugging Face export was written to {target}; "
                              "no GGUF file was)") from None
        rank_zero_info(f"exported the model ({', '.join(self.formats)}) to {target}")

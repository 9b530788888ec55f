"""NirvanaPruningCallback: prunes at fit setup, before adapters, optimizers and wrappers exist."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from ..errors import ConfigError, check_choice, check_positive
from ..io import write_text_atomic
from ..pruning import PruningPlan, make_plan
from ..pruning.allocation import MODES, ROUND_TO_CHOICES, validate_targets
from ..pruning.api import SCORING_DTYPES, cut
from ..pruning.gradients import ACCUMULATE
from ..pruning.saliency import CRITERIA, FUNCTIONALS
from ..pruning.selection import select_calibration


class NirvanaPruningCallback(L.Callback):
    """Structured pruning of the LightningModule's model at the start of ``fit``.

    Runs in the ``setup`` hook, which Lightning calls before ``configure_model`` (where recovery
    adapters are attached), before optimizers are configured and before the model is wrapped for
    distributed training, so nothing has to be patched afterwards. Calibration windows come from
    the datamodule's ``calibration_windows()``; scoring runs on the Trainer's root device.

    Writes ``plan.json`` (the plan with provenance) and ``plan.md`` (per-layer table) into
    ``trainer.log_dir`` and logs ``prune/params_before``, ``prune/params_after`` and
    ``prune/sparsity``.

    Args:
        sparsity: fraction of block linear weights to remove, in [0, 1).
        param_budget: alternatively a total parameter count to reach (then leave ``sparsity`` null).
        gamma: MLP-to-attention pruning-fraction ratio.
        criterion: ``nirvana`` | ``magnitude`` | ``taylor`` | ``random``.
        functional: NIRVANA output functional.
        round_to: kept MLP width per layer rounded up to a multiple of this.
        skip_layers: layer indices left untouched.
        allocation: ``global`` or ``uniform``.
        calibration_samples / calibration_seq_len / calibration_seed: override the datamodule's.
        micro_batch_size / accumulate / checkpointing / scoring_dtype: scoring-pass memory settings.
        seed: seed of the ``random`` criterion.
        plan_path: apply this saved plan instead of scoring.
        select: ``kl`` tries ``num_candidates`` calibration sets and keeps the one whose pruned
            model has the lowest KL to the dense model on a probe of held-out documents
            (``probe_samples`` x ``probe_seq_len`` tokens); the table goes to ``selection.md``.
        candidate_mode: ``random`` (seeded window draws) or ``document`` (one document each).
    """

    def __init__(
        self,
        sparsity: float | None = 0.2,
        param_budget: int | None = None,
        gamma: float = 1.0,
        criterion: Literal["nirvana", "magnitude", "taylor", "random"] = "nirvana",
        functional: Literal["max_over_seq", "max_over_vocab", "sum_logits"] = "max_over_seq",
        round_to: int = 8,
        skip_layers: list[int] | None = None,
        allocation: Literal["global", "uniform"] = "global",
        calibration_samples: int | None = None,
        calibration_seq_len: int | None = None,
        calibration_seed: int | None = None,
        micro_batch_size: int | None = None,
        accumulate: Literal["gradient", "saliency"] = "gradient",
        checkpointing: bool = True,
        scoring_dtype: Literal["float32", "model"] = "float32",
        seed: int = 0,
        plan_path: str | None = None,
        select: Literal["none", "kl"] = "none",
        num_candidates: int = 8,
        candidate_mode: Literal["random", "document"] = "random",
        probe_samples: int = 128,
        probe_seq_len: int = 64,
        probe_seed: int = 0,
    ) -> None:
        key = "NirvanaPruningCallback."
        check_choice(key + "criterion", criterion, CRITERIA)
        check_choice(key + "functional", functional, FUNCTIONALS)
        check_choice(key + "allocation", allocation, MODES)
        check_choice(key + "accumulate", accumulate, ACCUMULATE)
        check_choice(key + "scoring_dtype", scoring_dtype, SCORING_DTYPES)
        check_choice(key + "round_to", round_to, ROUND_TO_CHOICES)
        if plan_path is None:
            if (sparsity is None) == (param_budget is None):
                raise ConfigError(key + "sparsity", sparsity, "exactly one of sparsity and param_budget set")
            if sparsity is not None:
                try:
                    validate_targets(sparsity, gamma, round_to, allocation)
                except ConfigError as err:
                    raise ConfigError(key + err.key, err.value, err.expected) from None
            check_positive(key + "gamma", gamma)
        elif not Path(plan_path).is_file():
            raise ConfigError(key + "plan_path", plan_path, "an existing plan.json file")
        elif select != "none":
            raise ConfigError(key + "select", select, "'none' when plan_path is set (the plan is applied as saved)")
        check_choice(key + "select", select, ("none", "kl"))
        check_choice(key + "candidate_mode", candidate_mode, ("random", "document"))
        for name, value in (("num_candidates", num_candidates), ("probe_samples", probe_samples),
                            ("probe_seq_len", probe_seq_len)):
            check_positive(key + name, value)
        if select == "kl" and criterion in ("magnitude", "random"):
            raise ConfigError(key + "select", select, f"'none' with criterion {criterion!r} (it uses no calibration)")
        for name, value in (("calibration_samples", calibration_samples), ("calibration_seq_len", calibration_seq_len),
                            ("micro_batch_size", micro_batch_size), ("param_budget", param_budget)):
            if value is not None:
                check_positive(key + name, value)
        self.sparsity, self.param_budget, self.gamma = sparsity, param_budget, gamma
        self.criterion, self.functional, self.round_to = criterion, functional, round_to
        self.skip_layers, self.allocation = list(skip_layers or []), allocation
        self.calibration_samples, self.calibration_seq_len = calibration_samples, calibration_seq_len
        self.calibration_seed, self.micro_batch_size, self.accumulate = calibration_seed, micro_batch_size, accumulate
        self.checkpointing, self.scoring_dtype, self.seed = checkpointing, scoring_dtype, seed
        self.plan_path = plan_path
        self.select, self.num_candidates, self.candidate_mode = select, num_candidates, candidate_mode
        self.probe_samples, self.probe_seq_len, self.probe_seed = probe_samples, probe_seq_len, probe_seed
        self.selection = None
        self.plan: PruningPlan | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.plan is not None:
            return
        model = pl_module.build_model()
        if getattr(pl_module, "pruning_plan", None) is not None:  # resumed from a pruned checkpoint
            self.plan = pl_module.pruning_plan
            rank_zero_info("model already pruned (plan restored from the checkpoint): not pruning again")
            return
        if self.plan_path is not None:
            plan = PruningPlan.from_json(Path(self.plan_path).read_text())
        else:
            datamodule = trainer.datamodule
            if datamodule is None or not hasattr(datamodule, "calibration_windows"):
                raise ConfigError("data", type(datamodule).__name__, "a datamodule with calibration_windows()")
            model.to(trainer.strategy.root_device)
            settings = dict(sparsity=self.sparsity, param_budget=self.param_budget, gamma=self.gamma,
                            criterion=self.criterion, functional=self.functional, round_to=self.round_to,
                            skip_layers=self.skip_layers, allocation=self.allocation,
                            micro_batch_size=self.micro_batch_size, accumulate=self.accumulate,
                            checkpointing=self.checkpointing, scoring_dtype=self.scoring_dtype, seed=self.seed)
            try:
                if self.select == "kl":
                    plan = self._select(trainer, model, datamodule, settings)
                else:
                    calibration = None
                    if self.criterion in ("nirvana", "taylor"):
                        calibration = datamodule.calibration_windows(self.calibration_samples,
                                                                     self.calibration_seq_len, self.calibration_seed)
                    plan = make_plan(model, calibration, **settings)
            except ConfigError as err:  # name the key as the user wrote it
                raise ConfigError(f"NirvanaPruningCallback.{err.key}", err.value, err.expected) from None
            plan = self._agree(trainer, plan)
        cut(model, plan)
        self.plan = plan
        pl_module.pruning_plan = plan
        for logger in trainer.loggers:
            logger.log_metrics({"prune/params_before": float(plan.provenance["params_before"]),
                                "prune/params_after": float(plan.provenance["params_after"]),
                                "prune/sparsity": plan.realised_sparsity}, step=0)
        # trainer.log_dir is a collective under DDP (it broadcasts): read it on every rank, write on rank 0
        self._write(Path(trainer.log_dir or trainer.default_root_dir), plan)
        rank_zero_info("pruning plan per layer:\n" + plan.table())

    @staticmethod
    def _agree(trainer: L.Trainer, plan: PruningPlan) -> PruningPlan:
        """Every rank cuts rank 0's plan (scores can differ in the last bits across ranks: non-deterministic
        attention kernels, near-ties), so all ranks end with identical shapes."""
        if trainer.world_size <= 1:
            return plan
        return PruningPlan.from_dict(trainer.strategy.broadcast(plan.to_dict(), src=0))

    def _select(self, trainer: L.Trainer, model, datamodule, settings: dict) -> PruningPlan:
        """KL selection among candidate calibration sets; returns the winner's plan (not yet cut)."""
        candidates, spans = datamodule.calibration_candidates(
            self.num_candidates, self.calibration_samples, self.calibration_seq_len, self.calibration_seed,
            mode=self.candidate_mode)
        probe, probe_spans = datamodule.probe_windows(self.probe_samples, self.probe_seq_len, self.probe_seed)
        result = select_calibration(model, candidates, probe, candidate_spans=spans, probe_spans=probe_spans,
                                    **settings)
        self.selection = result
        result.plan.provenance.update({"candidate_mode": self.candidate_mode, "probe_shape": list(probe.shape)})
        for logger in trainer.loggers:
            logger.log_metrics({f"select/kl_{i}": kl for i, kl in enumerate(result.kls)}
                               | {"select/best_index": float(result.best_index)}, step=0)
        self._write_selection(Path(trainer.log_dir or trainer.default_root_dir), result)
        rank_zero_info("KL calibration selection:\n" + result.table())
        return result.plan

    @rank_zero_only
    def _write_selection(self, log_dir: Path, result) -> None:
        import json

        write_text_atomic(log_dir / "selection.md", result.table() + "\n")
        write_text_atomic(log_dir / "selection.json", json.dumps(result.to_dict(), indent=1))

    @rank_zero_only
    def _write(self, log_dir: Path, plan: PruningPlan) -> None:
        write_text_atomic(log_dir / "plan.json", plan.to_json())
        write_text_atomic(log_dir / "plan.md", plan.table() + "\n")
        rank_zero_info(f"wrote {log_dir / 'plan.json'} and plan.md")

"""NirvanaPruningCallback: prunes at fit setup, before adapters, optimizers and wrappers exist."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from ..adapters import get_adapter
from ..errors import ConfigError, check_choice, check_positive
from ..io import write_text_atomic
from ..pruning import PruningPlan, make_plan
from ..pruning.allocation import MODES, ROUND_TO_CHOICES, removal_counts, validate_targets
from ..pruning.api import SCORING_DTYPES, count_parameters, cut
from ..pruning.gamma import GAMMA_GRID, check_grid
from ..pruning.gradients import ACCUMULATE
from ..pruning.saliency import CRITERIA, DATA_CRITERIA, FUNCTIONALS
from ..pruning.schedule import SCHEDULES, cumulative_sparsity, step_sparsity
from ..pruning.selection import select_calibration
from ..recovery.rebuild import check_rebuildable, rebuild_optimization
from ..sharding import on_rank_zero


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
        gamma: MLP-to-attention pruning-fraction ratio, or ``auto``: the value of ``gamma_grid`` (default
            :data:`~nirvana_lightning.pruning.gamma.GAMMA_GRID`) whose masked model has the lowest KL to the
            dense model on the probe (held-out documents, ``probe_samples`` x ``probe_seq_len``, the same
            probe KL selection uses); the curve goes to ``gamma.md`` and the plan's provenance. Costs one
            dense and one masked probe pass per grid value; with ``select: kl`` each candidate runs it.
        criterion: ``nirvana`` | ``magnitude`` | ``taylor`` | ``random`` | ``wanda_sp`` | ``flap``.
        functional: NIRVANA output functional.
        round_to: kept MLP width per layer rounded up to a multiple of this (32 for GGUF q8_0/q4_0 blocks,
            256 for k-quants).
        tp_size: tensor-parallel degree the pruned model will be served at (vLLM ``--tensor-parallel-size``):
            every layer keeps a multiple of it in KV groups and in MLP neurons.
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
        schedule: ``once`` (prune at setup) or an iterative curve toward ``sparsity`` over
            ``n_steps`` pruning steps: ``linear``, ``constant`` (same fraction of what remains) or
            ``cubic`` (see :func:`nirvana_lightning.pruning.schedule.cumulative_sparsity`).
        n_steps: number of pruning steps of an iterative schedule.
        at_epochs: the epochs at whose start each step prunes (epoch 0 prunes at setup, before
            optimizers exist); or
        every_n_steps: prune at setup and then every N optimizer steps until ``n_steps`` are done.
        bias_compensation: add each removed unit's mean contribution on the calibration windows to the
            o_proj / down_proj biases (FLAP's compensation, any criterion; Llama-family configs; one-shot
            pruning only; see :mod:`nirvana_lightning.pruning.compensation`).
        offload_scoring: keep the model in host memory while scoring and run one layer at a time on the
            training device (accelerator memory: one layer's parameters and activations, not the model).

    Iterative steps re-score the current (already pruned, partly recovered) model on fresh
    calibration windows (seed ``calibration_seed + step``; with ``select: kl`` too), cut it,
    and rebuild what holds parameters: LoRA adapters are merged before the cut and fresh ones
    attached after (:meth:`NirvanaModule.apply_pruning_step`), the DDP wrapper, optimizer and LR
    scheduler are rebuilt (:func:`nirvana_lightning.recovery.rebuild_optimization`: Adam state
    restarts from zero, the LR continues its curve), and every callback with an
    ``on_nirvana_prune(trainer, pl_module, plan)`` method is told (EMA-style callbacks that hold
    parameter copies re-read them there). Each step's plan is written to
    ``plan_step_<k>.json``; ``plan.json`` is always the composed plan (keep indices into the
    dense model), which is what checkpoints carry; the step history is the callback's
    checkpoint state, so a resumed run continues the schedule.
    """

    def __init__(
        self,
        sparsity: float | None = 0.2,
        param_budget: int | None = None,
        gamma: float | Literal["auto"] = 1.0,
        gamma_grid: list[float] | None = None,
        criterion: Literal["nirvana", "magnitude", "taylor", "random", "wanda_sp", "flap"] = "nirvana",
        functional: Literal["max_over_seq", "max_over_vocab", "sum_logits"] = "max_over_seq",
        round_to: int = 8,
        tp_size: int = 1,
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
        schedule: Literal["once", "constant", "linear", "cubic"] = "once",
        n_steps: int = 1,
        at_epochs: list[int] | None = None,
        every_n_steps: int | None = None,
        offload_scoring: bool = False,
        bias_compensation: bool = False,
    ) -> None:
        key = "NirvanaPruningCallback."
        check_choice(key + "schedule", schedule, SCHEDULES)
        check_positive(key + "n_steps", n_steps)
        if schedule == "once":
            if n_steps != 1 or at_epochs is not None or every_n_steps is not None:
                raise ConfigError(key + "schedule", schedule,
                                  "an iterative schedule (constant, linear, cubic) when n_steps, at_epochs or every_n_steps is set")
        else:
            if sparsity is None or plan_path is not None:
                raise ConfigError(key + "schedule", schedule, "'once' unless the target is given as sparsity (no param_budget, no plan_path)")
            if (at_epochs is None) == (every_n_steps is None):
                raise ConfigError(key + "at_epochs", at_epochs, "exactly one of at_epochs and every_n_steps for an iterative schedule")
            if at_epochs is not None:
                at_epochs = list(at_epochs)
                if len(at_epochs) != n_steps or any(not isinstance(e, int) or e < 0 for e in at_epochs) \
                        or at_epochs != sorted(set(at_epochs)):
                    raise ConfigError(key + "at_epochs", at_epochs, f"{n_steps} distinct increasing epoch indices >= 0 (n_steps={n_steps})")
            if every_n_steps is not None:
                check_positive(key + "every_n_steps", every_n_steps)
        check_choice(key + "criterion", criterion, CRITERIA)
        check_choice(key + "functional", functional, FUNCTIONALS)
        check_choice(key + "allocation", allocation, MODES)
        check_choice(key + "accumulate", accumulate, ACCUMULATE)
        check_choice(key + "scoring_dtype", scoring_dtype, SCORING_DTYPES)
        check_choice(key + "round_to", round_to, ROUND_TO_CHOICES)
        check_positive(key + "tp_size", tp_size)
        if plan_path is None:
            if (sparsity is None) == (param_budget is None):
                raise ConfigError(key + "sparsity", sparsity, "exactly one of sparsity and param_budget set")
            if gamma == "auto":
                if schedule != "once":
                    raise ConfigError(key + "gamma", gamma, "a number with an iterative schedule (its removal counts "
                                      "are fixed from gamma before each step is scored)")
                check_grid(gamma_grid if gamma_grid is not None else GAMMA_GRID)
            if sparsity is not None:
                try:
                    validate_targets(sparsity, 1.0 if gamma == "auto" else gamma, round_to, allocation)
                except ConfigError as err:
                    raise ConfigError(key + err.key, err.value, err.expected) from None
            if gamma != "auto":
                check_positive(key + "gamma", gamma)
        elif not Path(plan_path).is_file():
            raise ConfigError(key + "plan_path", plan_path, "an existing plan.json file")
        elif select != "none":
            raise ConfigError(key + "select", select, "'none' when plan_path is set (the plan is applied as saved)")
        if plan_path is not None:  # read it now, before any model loads
            try:
                PruningPlan.from_json(Path(plan_path).read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as err:
                raise ConfigError(key + "plan_path", plan_path, f"a valid plan.json ({err})") from None
        check_choice(key + "select", select, ("none", "kl"))
        if offload_scoring and select == "kl":
            raise ConfigError(key + "offload_scoring", True, "false with select: kl (the KL probe runs the whole model "
                              "where it is; only scoring is offloaded layer by layer)")
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
        self.gamma_grid = list(gamma_grid) if gamma_grid is not None else list(GAMMA_GRID)
        self.criterion, self.functional, self.round_to, self.tp_size = criterion, functional, round_to, tp_size
        self.skip_layers, self.allocation = list(skip_layers or []), allocation
        self.calibration_samples, self.calibration_seq_len = calibration_samples, calibration_seq_len
        self.calibration_seed, self.micro_batch_size, self.accumulate = calibration_seed, micro_batch_size, accumulate
        self.checkpointing, self.scoring_dtype, self.seed = checkpointing, scoring_dtype, seed
        self.plan_path = plan_path
        self.select, self.num_candidates, self.candidate_mode = select, num_candidates, candidate_mode
        self.probe_samples, self.probe_seq_len, self.probe_seed = probe_samples, probe_seq_len, probe_seed
        self.schedule, self.n_steps, self.at_epochs, self.every_n_steps = schedule, n_steps, at_epochs, every_n_steps
        self.offload_scoring = offload_scoring
        if bias_compensation and schedule != "once":
            raise ConfigError(key + "bias_compensation", True, "false with an iterative schedule (compensation runs "
                              "at the one-shot cut)")
        self.bias_compensation = bias_compensation
        self.selection = None
        self.plan: PruningPlan | None = None  # the composed plan: keep indices into the dense model
        self.history: list[PruningPlan] = []  # one plan per step, each made for the model the previous left
        self.scored_on_this_rank = 0  # scoring passes run by this process (rank 0 only under DDP)
        self._deltas = None  # bias compensation's, from rank 0 with the plan

    @property
    def iterative(self) -> bool:
        return self.schedule != "once"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.plan is not None:
            return
        if self.iterative:
            check_rebuildable(trainer, "trainer.strategy")
            self._warn_if_schedule_cannot_finish(trainer)
        model = pl_module.build_model()
        if getattr(pl_module, "pruning_plan", None) is not None:  # resumed from a pruned checkpoint
            self.plan = pl_module.pruning_plan
            rank_zero_info("model already pruned (plan restored from the checkpoint): not pruning again"
                           + (" (the schedule continues from the checkpoint's step)" if self.iterative else ""))
            return
        self._deltas = None
        if self.plan_path is not None:
            plan = PruningPlan.from_json(Path(self.plan_path).read_text())
            plan.provenance.pop("bias_compensation", None)  # only what this run does to the model
            if self.bias_compensation:
                self._deltas = on_rank_zero(trainer, lambda: self._bias_deltas(trainer, model, plan, None),
                                            what="bias compensation")
        elif self.iterative and (self.at_epochs is not None and self.at_epochs[0] > 0):
            return  # the first step comes at the start of epoch at_epochs[0]
        else:
            plan = self._make_step_plan(trainer, model)
        cut(model, plan)
        if self.bias_compensation:
            from ..pruning.compensation import add_biases

            plan.provenance["bias_compensation"] = add_biases(model, self._deltas)
        self._record(trainer, pl_module, plan)

    def _bias_deltas(self, trainer: L.Trainer, model, plan: PruningPlan, calibration) -> list[dict] | None:
        """On rank 0: bias compensation's deltas from the dense columns, on ``calibration`` (the windows the plan
        was scored on; the configured ones for a saved plan), in the scoring micro-batches; moved to the host
        for the broadcast (every DDP rank adds the same biases; sharded ranks receive them with the shards)."""
        from ..pruning.compensation import bias_deltas, check_family
        from ..pruning.gradients import as_batches

        check_family(model)
        if calibration is None:
            datamodule = trainer.datamodule
            seed = self.calibration_seed if self.calibration_seed is not None else getattr(datamodule, "calibration_seed", 0)
            calibration = datamodule.calibration_windows(self.calibration_samples, self.calibration_seq_len, seed)
            if not self.offload_scoring:
                model.to(trainer.strategy.root_device)
        deltas = bias_deltas(model, plan, as_batches(calibration, self.micro_batch_size))
        return [{k: v.cpu() for k, v in d.items()} for d in deltas]

    def _warn_if_schedule_cannot_finish(self, trainer: L.Trainer) -> None:
        """Say before training, not after it, when max_steps / max_epochs end the run before the last step."""
        last = None
        if self.every_n_steps is not None and trainer.max_steps is not None and trainer.max_steps > 0:
            last, limit, unit = self.every_n_steps * (self.n_steps - 1), trainer.max_steps, "trainer.max_steps"
        elif self.at_epochs is not None and trainer.max_epochs is not None and trainer.max_epochs > 0:
            last, limit, unit = self.at_epochs[-1], trainer.max_epochs, "trainer.max_epochs"
        if last is not None and last >= limit:
            done = sum(1 for k in range(self.n_steps) if (self.every_n_steps or 0) * k < limit) \
                if self.every_n_steps is not None else sum(1 for e in self.at_epochs if e < limit)
            target = cumulative_sparsity(self.schedule, self.sparsity, max(done, 1), self.n_steps)
            rank_zero_warn(f"the pruning schedule cannot finish: its last step comes at {last} but {unit}={limit}, so "
                           f"only {done} of {self.n_steps} steps run and the model ends near sparsity {target:.3f}, not "
                           f"{self.sparsity} (raise {unit} or lower NirvanaPruningCallback.n_steps / every_n_steps)")

    # ----------------------------------------------------------- the schedule
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_epochs is None or len(self.history) >= self.n_steps:
            return
        if trainer.current_epoch == self.at_epochs[len(self.history)]:
            self._prune_during_training(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps is None or len(self.history) >= self.n_steps:
            return
        step = trainer.global_step
        if step > 0 and step >= self.every_n_steps * len(self.history):
            self._prune_during_training(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.iterative and len(self.history) < self.n_steps:
            rank_zero_warn(f"the pruning schedule ended after {len(self.history)} of {self.n_steps} steps (the run "
                           f"stopped first): realised sparsity "
                           f"{self.plan.realised_sparsity if self.plan else 0.0:.4f}, target {self.sparsity}")
            if self.plan is not None:
                self.plan.provenance["schedule_incomplete"] = {"steps_done": len(self.history), "n_steps": self.n_steps}

    def _prune_during_training(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.merge_recovery_adapters()  # score the weights recovery produced, not the frozen base
        plan = self._make_step_plan(trainer, pl_module.base_model)
        composed = pl_module.apply_pruning_step(plan)
        rebuild_optimization(trainer, pl_module)
        self._record(trainer, pl_module, plan, composed)
        for callback in trainer.callbacks:
            hook = getattr(callback, "on_nirvana_prune", None)
            if callable(hook):
                hook(trainer, pl_module, composed)

    def _make_step_plan(self, trainer: L.Trainer, model) -> PruningPlan:
        """Score the model as it is now and plan the next step (not cut)."""
        k = len(self.history) + 1  # 1-based step about to be taken
        settings = dict(sparsity=self.sparsity, param_budget=self.param_budget, gamma=self.gamma,
                        criterion=self.criterion, functional=self.functional, round_to=self.round_to,
                        tp_size=self.tp_size,
                        skip_layers=self.skip_layers, allocation=self.allocation,
                        micro_batch_size=self.micro_batch_size, accumulate=self.accumulate,
                        checkpointing=self.checkpointing, scoring_dtype=self.scoring_dtype, seed=self.seed + k - 1)
        if self.iterative:
            adapter = get_adapter(model)
            now = [adapter.layer_geometry(layer) for layer in adapter.layers()]
            dense = (list(zip(self.history[0].n_kv_group_before, self.history[0].mlp_dim_before)) if self.history
                     else now)
            dense_block = self.history[0].block_params_before if self.history else count_parameters(model)["block"]
            target = cumulative_sparsity(self.schedule, self.sparsity, k, self.n_steps)
            settings["sparsity"] = step_sparsity(target, dense_block, count_parameters(model)["block"])
            if self.allocation == "global":
                # units that must be gone after this step, from the DENSE widths (the one-shot counts at
                # s_k), minus those already gone: per-step floors do not accumulate into a shortfall
                want = removal_counts([a for a, _ in dense], [m for _, m in dense], sparsity=target, gamma=self.gamma,
                                      n_query_per_kv=adapter.n_query_per_kv, head_dim=adapter.head_dim,
                                      skip_layers=self.skip_layers)
                gone = (sum(a for a, _ in dense) - sum(a for a, _ in now), sum(m for _, m in dense) - sum(m for _, m in now))
                settings["counts"] = (max(0, want[0] - gone[0]), max(0, want[1] - gone[1]))
        datamodule = trainer.datamodule
        needs_data = self.criterion in DATA_CRITERIA
        if needs_data and (datamodule is None or not hasattr(datamodule, "calibration_windows")):
            raise ConfigError("data", type(datamodule).__name__, "a datamodule with calibration_windows()")
        if self.offload_scoring:  # the model stays in host memory; each layer visits the device in turn
            settings["scoring_device"] = str(trainer.strategy.root_device)
        seed = self.calibration_seed if self.calibration_seed is not None else getattr(datamodule, "calibration_seed", 0)
        seed += k - 1  # fresh calibration windows at every step
        if self.gamma == "auto":
            settings["gamma_grid"] = self.gamma_grid
        plan = self._on_rank_zero(trainer, lambda: self._score(trainer, model, datamodule, settings, seed, needs_data))
        if "gamma_search" in plan.provenance:
            self._write_gamma(Path(trainer.log_dir or trainer.default_root_dir), plan)
        plan.provenance.update({"schedule": self.schedule, "step": k, "n_steps": self.n_steps,
                                "global_step": trainer.global_step, "epoch": trainer.current_epoch})
        if self.iterative:
            plan.provenance.update({"step_sparsity": settings["sparsity"], "step_counts": settings.get("counts"),
                                    "target_cumulative_sparsity": target, "final_sparsity": self.sparsity})
        return plan

    def _score(self, trainer: L.Trainer, model, datamodule, settings: dict, seed: int, needs_data: bool) -> PruningPlan:
        """On rank 0 only (inside :meth:`_on_rank_zero`, so an error here, out of memory included, reaches the
        other ranks); they do not move their model, the strategy places it for training."""
        self.scored_on_this_rank += 1
        if "scoring_device" not in settings:
            model.to(trainer.strategy.root_device)
        try:
            if self.select == "kl":
                plan, calibration = self._select(trainer, model, datamodule, settings, seed)
            else:
                calibration = None
                if needs_data:
                    calibration = datamodule.calibration_windows(self.calibration_samples, self.calibration_seq_len,
                                                                 seed)
                if self.gamma == "auto":  # held-out documents, the probe KL selection uses
                    settings = {**settings, "probe": datamodule.probe_windows(self.probe_samples, self.probe_seq_len,
                                                                              self.probe_seed)[0]}
                plan = make_plan(model, calibration, **settings)
            if self.bias_compensation and not self.iterative:
                self._deltas = self._bias_deltas(trainer, model, plan, calibration)
            return plan
        except ConfigError as err:  # name the key as the user wrote it (data.* keys are the datamodule's)
            key = err.key if "." in err.key else f"NirvanaPruningCallback.{err.key}"
            raise ConfigError(key, err.value, err.expected) from None

    def _record(self, trainer: L.Trainer, pl_module: L.LightningModule, step: PruningPlan,
                composed: PruningPlan | None = None) -> None:
        """Keep the step, publish the composed plan, log and write both."""
        self.history.append(step)
        composed = composed or PruningPlan.from_dict(step.to_dict())  # the step plan stays as it was made
        if self.iterative:
            first = self.history[0].provenance
            composed.provenance.update({"params_before": first["params_before"], "sparsity": self.sparsity,
                                        "realised_sparsity": composed.realised_sparsity})
        self.plan = composed
        pl_module.pruning_plan = composed
        for logger in trainer.loggers:
            logger.log_metrics({"prune/params_before": float(composed.provenance["params_before"]),
                                "prune/params_after": float(step.provenance["params_after"]),
                                "prune/sparsity": composed.realised_sparsity,
                                "prune/step": float(len(self.history))}, step=trainer.global_step)
        # trainer.log_dir is a collective under DDP (it broadcasts): read it on every rank, write on rank 0
        self._write(Path(trainer.log_dir or trainer.default_root_dir), composed, step, len(self.history))
        k = f" step {len(self.history)}/{self.n_steps}" if self.iterative else ""
        rank_zero_info(f"pruning plan{k} per layer (composed, relative to the dense model):\n" + composed.table())

    def state_dict(self) -> dict:
        return {"history": [p.to_dict() for p in self.history]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = [PruningPlan.from_dict(d) for d in state_dict.get("history", [])]

    def _on_rank_zero(self, trainer: L.Trainer, make) -> PruningPlan:
        """Rank 0 scores and plans; every other rank waits and cuts the same plan.

        Scoring on every rank would cost each of them the scoring memory and time (and host memory
        for KL selection's reference log-probs) for a plan thrown away: scores can differ in the last
        bits across ranks (non-deterministic kernels, near-ties), so all ranks must cut rank 0's plan
        anyway (and under sharding only rank 0 holds weights). The other ranks wait in a collective for
        as long as scoring takes: the process group's timeout (Lightning's default 30 minutes;
        ``DDPStrategy(timeout=...)``) must exceed it.
        """
        def payload() -> dict:
            return {"plan": make().to_dict(), "deltas": getattr(self, "_deltas", None)}

        out = on_rank_zero(trainer, payload, what="pruning")
        self._deltas = out["deltas"]  # bias compensation's, identical on every rank
        return PruningPlan.from_dict(out["plan"])

    def _select(self, trainer: L.Trainer, model, datamodule, settings: dict, seed: int) -> PruningPlan:
        """KL selection among candidate calibration sets; returns the winner's plan (not yet cut)."""
        candidates, spans = datamodule.calibration_candidates(
            self.num_candidates, self.calibration_samples, self.calibration_seq_len, seed, mode=self.candidate_mode)
        probe, probe_spans = datamodule.probe_windows(self.probe_samples, self.probe_seq_len, self.probe_seed)
        result = select_calibration(model, candidates, probe, candidate_spans=spans, probe_spans=probe_spans,
                                    **settings)
        winner = candidates[result.best_index]
        self.selection = result
        result.plan.provenance.update({"candidate_mode": self.candidate_mode, "probe_shape": list(probe.shape)})
        for logger in trainer.loggers:
            logger.log_metrics({f"select/kl_{i}": kl for i, kl in enumerate(result.kls)}
                               | {"select/best_index": float(result.best_index)}, step=0)
        self._write_selection(Path(trainer.log_dir or trainer.default_root_dir), result)
        rank_zero_info("KL calibration selection:\n" + result.table())
        return result.plan, winner

    @rank_zero_only
    def _write_gamma(self, log_dir: Path, plan: PruningPlan) -> None:
        from ..pruning.gamma import GammaSearch

        d = plan.provenance["gamma_search"]
        search = GammaSearch(d["gammas"], d["kls"], d["perplexities"], d["best_index"], d["seconds"], d["infeasible"])
        write_text_atomic(log_dir / "gamma.md", "gamma 'auto': mean per-token KL(dense ‖ pruned) on the probe\n\n"
                          + search.table() + "\n")
        rank_zero_info("gamma 'auto':\n" + search.table())

    @rank_zero_only
    def _write_selection(self, log_dir: Path, result) -> None:
        import json

        write_text_atomic(log_dir / "selection.md", result.table() + "\n")
        write_text_atomic(log_dir / "selection.json", json.dumps(result.to_dict(), indent=1))

    @rank_zero_only
    def _write(self, log_dir: Path, plan: PruningPlan, step: PruningPlan, k: int) -> None:
        if self.iterative:
            write_text_atomic(log_dir / f"plan_step_{k}.json", step.to_json())
        write_text_atomic(log_dir / "plan.json", plan.to_json())
        write_text_atomic(log_dir / "plan.md", plan.table() + "\n")
        rank_zero_info(f"wrote {log_dir / 'plan.json'} and plan.md")

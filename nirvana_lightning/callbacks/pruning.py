"""NirvanaPruningCallback: prunes at fit setup, before adapters, optimizers and wrappers exist."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from ..contract import PrunableModule, PruneListener, calibration_data, prunable
from ..devices import resolve_device
from ..errors import ConfigError
from ..families import get_family
from ..io import write_text_atomic
from ..pruning import PruningPlan, make_plan
from ..pruning.allocation import UnitCosts
from ..pruning.api import count_parameters, cut, unit_layout
from ..pruning.plan import as_query_heads
from ..pruning.schedule import cumulative_sparsity, reachable_steps, step_target
from ..pruning.selection import select_calibration
from ..pruning.settings import (
    SECTIONS,
    Calibration,
    PruningTarget,
    Schedule,
    Scoring,
    Selection,
    as_settings,
    check_combination,
)
from ..recovery.rebuild import check_rebuildable, rebuild_optimization
from ..sharding import on_rank_zero


class NirvanaPruningCallback(L.Callback):
    """Structured pruning of the LightningModule's model at the start of ``fit`` (or on a schedule).

    Runs in the ``setup`` hook, which Lightning calls before ``configure_model`` (where recovery
    adapters are attached), before optimizers are configured and before the model is wrapped for
    distributed training, so nothing has to be patched afterwards. Calibration windows come from
    the datamodule's ``calibration_windows()``; scoring runs on the Trainer's root device, on rank 0.

    Writes ``plan.json`` (the plan with provenance) and ``plan.md`` (per-layer table) into
    ``trainer.log_dir`` and logs ``prune/params_before``, ``prune/params_after`` and ``prune/sparsity``.

    Args:
        target: how much to remove (:class:`~nirvana_lightning.pruning.settings.PruningTarget`).
        scoring: how units are scored (:class:`~nirvana_lightning.pruning.settings.Scoring`).
        calibration: the calibration windows (:class:`~nirvana_lightning.pruning.settings.Calibration`).
        selection: KL selection of the calibration set and the probe
            (:class:`~nirvana_lightning.pruning.settings.Selection`); the table goes to ``selection.md``.
        schedule: once at setup or iterative (:class:`~nirvana_lightning.pruning.settings.Schedule`).
        plan_path: apply this saved plan instead of scoring.
        bias_compensation: add each removed unit's mean contribution on the calibration windows to the
            o_proj / down_proj biases (FLAP's compensation, any criterion; Llama-family configs; one-shot
            pruning only; see :mod:`nirvana_lightning.pruning.compensation`).

    Iterative steps re-score the current (already pruned, partly recovered) model on fresh
    calibration windows (seed ``calibration.seed + step - 1``), cut it, and rebuild what holds
    parameters: LoRA adapters are merged before the cut and fresh ones attached after
    (:meth:`NirvanaModule.cut_step`), the DDP wrapper, optimizer and LR scheduler are rebuilt
    (:func:`nirvana_lightning.recovery.rebuild_optimization`: Adam state restarts from zero, the LR
    continues its curve), and every callback implementing
    :class:`~nirvana_lightning.contract.PruneListener` is told. Each step's plan is written to
    ``plan_step_<k>.json``; ``plan.json`` is always the composed plan (keep indices into the dense
    model), which is what checkpoints carry; the step history is the callback's checkpoint state, so
    a resumed run continues the schedule.
    """

    def __init__(
        self,
        target: PruningTarget = PruningTarget(),
        scoring: Scoring = Scoring(),
        calibration: Calibration = Calibration(),
        selection: Selection = Selection(),
        schedule: Schedule = Schedule(),
        plan_path: str | None = None,
        bias_compensation: bool = False,
    ) -> None:
        key = "NirvanaPruningCallback."
        given = {"target": target, "scoring": scoring, "calibration": calibration, "selection": selection,
                 "schedule": schedule}
        for name, cls in SECTIONS.items():  # a mapping (Python API, YAML) becomes the settings object
            given[name] = as_settings(cls, given[name], key + name)
        target, scoring, calibration = given["target"], given["scoring"], given["calibration"]
        selection, schedule = given["selection"], given["schedule"]
        try:
            check_combination(target, scoring, selection, schedule, plan_path=plan_path,
                              bias_compensation=bias_compensation)
        except ConfigError as err:
            raise ConfigError(key + err.key, err.value, err.expected) from None
        if plan_path is not None:  # read it now, before any model loads
            if not Path(plan_path).is_file():
                raise ConfigError(key + "plan_path", plan_path, "an existing plan.json file")
            try:
                PruningPlan.from_json(Path(plan_path).read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as err:
                raise ConfigError(key + "plan_path", plan_path, f"a valid plan.json ({err})") from None
        self.target, self.scoring, self.calibration = target, scoring, calibration
        self.selection, self.schedule = selection, schedule
        self.plan_path, self.bias_compensation = plan_path, bias_compensation
        self.selection_result = None  # KL selection's, when it ran
        self.plan: PruningPlan | None = None  # the composed plan: keep indices into the dense model
        self.history: list[PruningPlan] = []  # one plan per step, each made for the model the previous left
        self.scored_on_this_rank = 0  # scoring passes run by this process (rank 0 only under DDP)
        self._deltas = None  # bias compensation's, from rank 0 with the plan

    # ------------------------------------------------------------------ hooks
    def check_before_load(self, trainer: L.Trainer, pl_module: L.LightningModule, config) -> None:
        """With the model's config, before any weight loads: the family can carry compensation biases, and a
        saved plan was made for this architecture."""
        if self.bias_compensation:
            from ..pruning.compensation import check_family

            try:
                check_family(config)
            except ConfigError as err:
                raise ConfigError("NirvanaPruningCallback.bias_compensation", True, err.expected) from None
        from ..loading import build_shape_model

        shape_model = build_shape_model(config)  # names and shapes on the meta device: nothing read or allocated
        family = get_family(shape_model)
        tp = self.target.tp_size
        for i, layer in enumerate(family.layers()):
            try:  # the family's own refusals of these settings (T5 has no query-head granularity, ...)
                family.unit_kinds(layer, self.target.attention_granularity)
            except ConfigError as err:
                raise ConfigError(f"NirvanaPruningCallback.{err.key}", err.value, err.expected) from None
            for kind in (family.unit_kinds(layer, "group").values() if tp > 1 else ()):  # allocation's rule
                if kind.n_units % tp:
                    raise ConfigError("NirvanaPruningCallback.target.tp_size", tp, "a degree dividing every layer's "
                                      f"units (layer {i} has {kind.n_units} {kind.label})")
        if self.plan_path is not None and prunable(pl_module).resume_ckpt_path is None:
            from ..pruning.surgery import check_plan_matches

            plan = PruningPlan.from_json(Path(self.plan_path).read_text(encoding="utf-8"))
            try:  # against the model's names and shapes
                check_plan_matches(shape_model, plan)
            except (ValueError, ConfigError) as err:
                raise ConfigError("NirvanaPruningCallback.plan_path", self.plan_path,
                                  f"a plan made for model.source={pl_module.hparams.source!r} ({err})") from None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.plan is not None:
            return
        module = prunable(pl_module)
        if self.schedule.iterative:
            check_rebuildable(trainer, "trainer.strategy")
            self._warn_if_schedule_cannot_finish(trainer)
        model = module.build_model()
        self._warn_beyond_context(model)
        if module.pruning_plan is not None:  # resumed from a pruned checkpoint
            self.plan = module.pruning_plan
            rank_zero_info("model already pruned (plan restored from the checkpoint): not pruning again"
                           + (" (the schedule continues from the checkpoint's step)" if self.schedule.iterative else ""))
            return
        if self.plan_path is not None:
            self._cut_saved_plan(trainer, module, model)
        elif self.schedule.prunes_at_setup:
            self._prune_at_setup(trainer, module, model)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.schedule.due(epoch=trainer.current_epoch, step=trainer.global_step, done=len(self.history),
                             epoch_start=True):
            self._prune_during_training(trainer, prunable(pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.schedule.due(epoch=trainer.current_epoch, step=trainer.global_step, done=len(self.history),
                             epoch_start=False):
            self._prune_during_training(trainer, prunable(pl_module))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        n_steps = self.schedule.n_steps
        if self.schedule.iterative and len(self.history) < n_steps:
            rank_zero_warn(f"the pruning schedule ended after {len(self.history)} of {n_steps} steps (the run "
                           f"stopped first): realised sparsity "
                           f"{self.plan.realised_sparsity if self.plan else 0.0:.4f}, target {self.target.sparsity}")
            if self.plan is not None:
                self.plan.provenance["schedule_incomplete"] = {"steps_done": len(self.history), "n_steps": n_steps}

    def state_dict(self) -> dict:
        return {"history": [p.to_dict() for p in self.history]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = [PruningPlan.from_dict(d) for d in state_dict.get("history", [])]

    # ------------------------------------------------------------ the actions
    def _cut_saved_plan(self, trainer: L.Trainer, module: PrunableModule, model) -> None:
        plan = PruningPlan.from_json(Path(self.plan_path).read_text())
        plan.provenance.pop("bias_compensation", None)  # only what this run does to the model
        self._deltas = None
        if self.bias_compensation:
            self._deltas = on_rank_zero(trainer, lambda: self._bias_deltas(trainer, model, plan, None),
                                        what="bias compensation")
        self._cut_at_setup(trainer, module, model, plan)

    def _prune_at_setup(self, trainer: L.Trainer, module: PrunableModule, model) -> None:
        self._deltas = None
        self._cut_at_setup(trainer, module, model, self._make_step_plan(trainer, model))

    def _cut_at_setup(self, trainer: L.Trainer, module: PrunableModule, model, plan: PruningPlan) -> None:
        cut(model, plan)
        if self.bias_compensation:
            from ..pruning.compensation import add_biases

            plan.provenance["bias_compensation"] = add_biases(model, self._deltas)
        self._record(trainer, module, plan)

    def _prune_during_training(self, trainer: L.Trainer, module: PrunableModule) -> None:
        module.merge_recovery_adapters()  # score the weights recovery produced, not the frozen base
        plan = self._make_step_plan(trainer, module.base_model)
        composed = module.cut_step(plan)
        rebuild_optimization(trainer, module)
        self._record(trainer, module, plan, composed)
        for callback in trainer.callbacks:
            if isinstance(callback, PruneListener):
                callback.on_nirvana_prune(trainer, module, composed)

    def _make_step_plan(self, trainer: L.Trainer, model) -> PruningPlan:
        """Score the model as it is now and plan the next step (not cut)."""
        k = len(self.history) + 1  # 1-based step about to be taken
        target, counts, step = self.target, None, None
        scoring = dataclasses.replace(self.scoring, seed=self.scoring.seed + k - 1)
        if self.schedule.iterative:
            step = self._step_target(model, k)
            target, counts = dataclasses.replace(target, sparsity=step.sparsity), step.counts
        datamodule = calibration_data(trainer.datamodule) if scoring.needs_data or target.gamma == "auto" \
            else trainer.datamodule
        if scoring.device is not None:  # the model stays in host memory; each layer visits the device in turn
            device = resolve_device(scoring.device, trainer.strategy.root_device, trainer.world_size,
                                    key="NirvanaPruningCallback.scoring.device")
            scoring = dataclasses.replace(scoring, device=str(device))
        seed = self.calibration.seed + k - 1  # fresh calibration windows at every step
        plan = self._on_rank_zero(trainer, lambda: self._score(trainer, model, datamodule, target, scoring, counts,
                                                               seed))
        if "gamma_search" in plan.provenance:
            self._write_gamma(Path(trainer.log_dir or trainer.default_root_dir), plan)
        plan.provenance.update({"schedule": self.schedule.kind, "step": k, "n_steps": self.schedule.n_steps,
                                "global_step": trainer.global_step, "epoch": trainer.current_epoch})
        if step is not None:
            plan.provenance.update({"step_sparsity": step.sparsity, "step_counts": step.counts,
                                    "target_cumulative_sparsity": step.cumulative,
                                    "final_sparsity": self.target.sparsity})
        return plan

    def _step_target(self, model, k: int):
        """Step ``k``'s removal, from the dense widths (the first step's plan) and the current ones, in the
        attention units of the target's granularity (KV groups, or query heads)."""
        family = get_family(model)
        granularity = self.target.attention_granularity
        layout = unit_layout(family, granularity)
        costs = layout.costs
        now = list(zip(layout.attention_widths(), layout.mlp_widths()))
        first = self.history[0] if self.history else None
        if first is not None:  # the dense widths and costs: the first step's plan, at this step's granularity
            if first.granularity != granularity:
                first = as_query_heads(first, layout.kinds)
            per_kind = {name: (first.width_before[name], first.unit_cost[name]) for name in first.keep}
            if layout.parent is not None:
                head = layout.segments[0][1]
                per_group = [h // n for h, n in zip(per_kind[head][0], per_kind[layout.parent][0])]
                costs = UnitCosts.of_query_heads(per_kind[head][1], per_kind[layout.parent][1], per_group,
                                                 per_kind[layout.mlp][1])
            else:
                costs = UnitCosts([max(c) for c in zip(*(per_kind[n][1] for n in first.kinds_of("attention")))],
                                  per_kind[layout.mlp][1])
        dense = list(zip(first.attention_width_before(), first.mlp_dim_before)) if first else now
        current_block = count_parameters(model)["block"]
        return step_target(self.schedule.kind, self.target.sparsity, k, self.schedule.n_steps, dense_widths=dense,
                           current_widths=now, dense_block=first.block_params_before if first else current_block,
                           current_block=current_block, gamma=self.target.gamma,
                           n_query_per_kv=family.n_query_per_kv, head_dim=family.head_dim,
                           skip_layers=self.target.skip_layers, allocation=self.target.allocation, costs=costs)

    def _score(self, trainer: L.Trainer, model, datamodule, target: PruningTarget, scoring: Scoring, counts,
               seed: int) -> PruningPlan:
        """On rank 0 only (inside :meth:`_on_rank_zero`, so an error here, out of memory included, reaches the
        other ranks); they do not move their model, the strategy places it for training."""
        self.scored_on_this_rank += 1
        self.selection_result = None
        if scoring.device is None:
            model.to(trainer.strategy.root_device)
        try:
            probe = None
            if target.gamma == "auto" or self.selection.method == "kl":  # held-out documents
                probe, probe_spans = datamodule.probe_windows(self.selection.probe_samples,
                                                              self.selection.probe_seq_len, self.calibration.seed)
            if self.selection.method == "kl":
                plan, calibration = self._select(trainer, model, datamodule, target, scoring, counts, seed, probe,
                                                 probe_spans)
            else:
                calibration = None
                if scoring.needs_data:
                    calibration = datamodule.calibration_windows(self.calibration.samples, self.calibration.seq_len,
                                                                 seed, sources=self.calibration.source)
                plan = make_plan(model, calibration, target, scoring, probe=probe, counts=counts)
            if self.bias_compensation:
                self._deltas = self._bias_deltas(trainer, model, plan, calibration)
            return plan
        except ConfigError as err:  # name the key as the user wrote it (data.* / model.* keys are the others')
            key = err.key if err.key.split(".")[0] in ("data", "model", "trainer") \
                else f"NirvanaPruningCallback.{err.key}"
            raise ConfigError(key, err.value, err.expected) from None

    def _record(self, trainer: L.Trainer, module: PrunableModule, step: PruningPlan,
                composed: PruningPlan | None = None) -> None:
        """Keep the step, publish the composed plan, log and write both."""
        self.history.append(step)
        composed = composed or PruningPlan.from_dict(step.to_dict())  # the step plan stays as it was made
        if self.schedule.iterative:
            first = self.history[0].provenance
            composed.provenance.update({"params_before": first["params_before"], "sparsity": self.target.sparsity,
                                        "realised_sparsity": composed.realised_sparsity})
        self.plan = composed
        module.pruning_plan = composed
        for logger in trainer.loggers:
            logger.log_metrics({"prune/params_before": float(composed.provenance["params_before"]),
                                "prune/params_after": float(step.provenance["params_after"]),
                                "prune/sparsity": composed.realised_sparsity,
                                "prune/step": float(len(self.history))}, step=trainer.global_step)
        # trainer.log_dir is a collective under DDP (it broadcasts): read it on every rank, write on rank 0
        self._write(Path(trainer.log_dir or trainer.default_root_dir), composed, step, len(self.history))
        k = f" step {len(self.history)}/{self.schedule.n_steps}" if self.schedule.iterative else ""
        rank_zero_info(f"pruning plan{k} per layer (composed, relative to the dense model):\n" + composed.table())

    def _bias_deltas(self, trainer: L.Trainer, model, plan: PruningPlan, calibration) -> list[dict] | None:
        """On rank 0: bias compensation's deltas from the dense columns, on ``calibration`` (the windows the plan
        was scored on; the configured ones for a saved plan), in the scoring micro-batches; moved to the host
        for the broadcast (every DDP rank adds the same biases; sharded ranks receive them with the shards)."""
        from ..pruning.compensation import bias_deltas, check_family
        from ..pruning.gradients import as_batches

        check_family(model)
        if calibration is None:
            calibration = trainer.datamodule.calibration_windows(self.calibration.samples, self.calibration.seq_len,
                                                                 self.calibration.seed, sources=self.calibration.source)
            if self.scoring.device is None:
                model.to(trainer.strategy.root_device)
        deltas = bias_deltas(model, plan, as_batches(calibration, self.scoring.micro_batch_size))
        return [{k: v.cpu() for k, v in d.items()} for d in deltas]

    def _warn_if_schedule_cannot_finish(self, trainer: L.Trainer) -> None:
        """Say before training, not after it, when max_steps / max_epochs end the run before the last step."""
        sched = self.schedule
        short = reachable_steps(sched.at_epochs, sched.every_n_steps, sched.n_steps, trainer.max_steps,
                                trainer.max_epochs)
        if short is not None:
            done, unit, limit = short
            target = cumulative_sparsity(sched.kind, self.target.sparsity, max(done, 1), sched.n_steps)
            rank_zero_warn(f"the pruning schedule cannot finish: {unit}={limit} ends the run after {done} of "
                           f"{sched.n_steps} steps, so the model ends near sparsity {target:.3f}, not "
                           f"{self.target.sparsity} (raise {unit} or lower NirvanaPruningCallback.schedule.n_steps "
                           "/ every_n_steps)")

    def _warn_beyond_context(self, model) -> None:
        """Calibration windows longer than the model's context give positions it never saw."""
        limit = get_family(model).max_sequence_length
        seq_len = self.calibration.seq_len
        if self.scoring.needs_data and limit is not None and seq_len > limit:
            rank_zero_warn(f"NirvanaPruningCallback.calibration.seq_len={seq_len} exceeds the model's "
                           f"context of {limit} positions: scores would come from positions it was never trained on")

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
            plan = make()
            return {"plan": plan.to_dict(), "deltas": getattr(self, "_deltas", None),
                    "selection": self.selection_result}

        out = on_rank_zero(trainer, payload, what="pruning")
        self._deltas = out["deltas"]  # bias compensation's, identical on every rank
        self.selection_result = out["selection"]
        if self.selection_result is not None:  # logged and written outside the rank-0 region (log_dir broadcasts)
            self._publish_selection(trainer, self.selection_result)
        return PruningPlan.from_dict(out["plan"])

    def _select(self, trainer: L.Trainer, model, datamodule, target: PruningTarget, scoring: Scoring, counts,
                seed: int, probe, probe_spans) -> tuple[PruningPlan, object]:
        """KL selection among candidate calibration sets; returns the winner's plan (not yet cut) and windows."""
        sel = self.selection
        candidates, spans = datamodule.calibration_candidates(sel.num_candidates, self.calibration.samples,
                                                              self.calibration.seq_len, seed, mode=sel.candidate_mode,
                                                              sources=self.calibration.source)
        result = select_calibration(model, candidates, probe, target, scoring, candidate_spans=spans,
                                    probe_spans=probe_spans, counts=counts)
        winner = candidates[result.best_index]
        self.selection_result = result
        result.plan.provenance.update({"candidate_mode": sel.candidate_mode, "probe_shape": list(probe.shape)})
        return result.plan, winner

    def _publish_selection(self, trainer: L.Trainer, result) -> None:
        """Log, print and write KL selection's outcome; on every rank (``trainer.log_dir`` is a collective)."""
        for logger in trainer.loggers:
            logger.log_metrics({f"select/kl_{i}": kl for i, kl in enumerate(result.kls)}
                               | {"select/best_index": float(result.best_index)}, step=0)
        self._write_selection(Path(trainer.log_dir or trainer.default_root_dir), result)
        rank_zero_info("KL calibration selection:\n" + result.table())

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
        if self.schedule.iterative:
            write_text_atomic(log_dir / f"plan_step_{k}.json", step.to_json())
        write_text_atomic(log_dir / "plan.json", plan.to_json())
        write_text_atomic(log_dir / "plan.md", plan.table() + "\n")
        rank_zero_info(f"wrote {log_dir / 'plan.json'} and plan.md")

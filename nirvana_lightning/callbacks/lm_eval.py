"""lm-eval accuracy of the dense, pruned and recovered model (and every N steps), as a table at fit end."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from ..errors import ConfigError
from ..eval.lm_eval import run_lm_eval, validate_settings, validate_tasks
from .staged import SUMMARY_STAGES, check_every_n_steps

_LABELS = {"dense": "dense (before pruning)", "pruned": "pruned, before recovery", "recovered": "after recovery"}


class LmEvalCallback(L.Callback):
    """Runs lm-evaluation-harness on the in-memory model around recovery.

    * ``dense`` (when ``dense=True``): at setup, before pruning. List this callback BEFORE
      ``NirvanaPruningCallback`` in ``trainer.callbacks`` (callbacks run in list order); a model
      that is already pruned at that point is an error.
    * ``pruned``: at fit start, after pruning and before any training step.
    * ``step_<n>``: every ``every_n_steps`` optimizer steps (``trainer.global_step``), except the
      last step, which ``recovered`` covers.
    * ``recovered``: at fit end; then a table of every stage is printed.

    ``results`` is ``{stage: {task: {metric: value}}}`` (metrics as in
    :func:`~nirvana_lightning.eval.lm_eval.flatten_results`, e.g. ``acc``, ``acc_stderr``,
    ``acc_norm``). Every value goes to every logger as ``lm_eval/<stage>/<task>/<metric>`` at
    ``trainer.global_step``. The results are part of the callback's state, so a resumed run keeps
    its dense and pruned values.

    Under DDP only global rank 0 evaluates (lm-eval on an in-memory model is single-process);
    the other ranks wait for its results in a broadcast, so every rank holds the same ``results``.
    A long evaluation must fit in the process group's timeout.

    Args:
        tasks: offline tasks shipped with the package (``nirvana_brown_cloze``) and/or lm-eval
            task names (``hellaswag``, ``arc_easy``, ...; those need their datasets: network or cache).
        num_fewshot: few-shot examples per item.
        limit: evaluate only the first ``limit`` items of each task.
        batch_size: loglikelihood requests per forward pass.
        every_n_steps: also evaluate every N optimizer steps during recovery.
        dense: also evaluate the dense model at setup.
    """

    def __init__(
        self,
        tasks: list[str] = ["nirvana_brown_cloze"],  # noqa: B006 (copied, never mutated; shown in CLI help)
        num_fewshot: int = 0,
        limit: int | None = None,
        batch_size: int = 8,
        every_n_steps: int | None = None,
        dense: bool = False,
    ) -> None:
        key = "LmEvalCallback."
        self.tasks = validate_tasks(tasks, key + "tasks")
        validate_settings(num_fewshot, limit, batch_size, key)
        check_every_n_steps(key + "every_n_steps", every_n_steps)
        self.num_fewshot, self.limit, self.batch_size = num_fewshot, limit, batch_size
        self.every_n_steps, self.dense = every_n_steps, dense
        self.results: dict[str, dict[str, dict[str, float]]] = {}

    # ------------------------------------------------------------------- hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not self.dense or "dense" in self.results:
            return
        if getattr(pl_module, "resume_ckpt_path", None):  # resuming: the dense values come back with our state
            return
        pl_module.build_model()
        if getattr(pl_module, "pruning_plan", None) is not None:
            raise ConfigError("trainer.callbacks", "LmEvalCallback after NirvanaPruningCallback",
                              "LmEvalCallback listed first when dense: true (the model was already pruned)")
        pl_module.model.to(trainer.strategy.root_device)
        self.evaluate(trainer, pl_module, "dense")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if "pruned" not in self.results:
            self.evaluate(trainer, pl_module, "pruned")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        # with gradient accumulation this hook runs several times per step: the key guards repeats
        if not self.every_n_steps or step == 0 or step % self.every_n_steps or f"step_{step}" in self.results:
            return
        if 0 < trainer.max_steps <= step:
            return  # the fit-end evaluation covers the last step
        self.evaluate(trainer, pl_module, f"step_{step}")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.evaluate(trainer, pl_module, "recovered")
        rank_zero_info("\n" + self.table())

    # ------------------------------------------------------------------ work
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> dict[str, dict[str, float]]:
        """Evaluate ``pl_module.model`` on global rank 0, share the results with every rank, log them."""
        results, error = None, None
        if trainer.is_global_zero:
            try:
                tokenizer = getattr(pl_module, "tokenizer", None)
                if tokenizer is None:
                    tokenizer = getattr(trainer.datamodule, "tokenizer", None)
                if tokenizer is None:
                    raise RuntimeError("LmEvalCallback: neither the module nor the datamodule has a tokenizer")
                results = run_lm_eval(pl_module.model, tokenizer, self.tasks, num_fewshot=self.num_fewshot,
                                      limit=self.limit, batch_size=self.batch_size)
            except Exception as err:
                if trainer.world_size == 1:
                    raise
                error = err  # tell the waiting ranks before raising, or they hang in the broadcast
        # a collective: every rank reaches this line at the same hook and step
        results, message = trainer.strategy.broadcast((results, repr(error) if error else None), src=0)
        if error is not None:
            raise error
        if message is not None:
            raise RuntimeError(f"LmEvalCallback: evaluation failed on rank 0 at stage {stage!r}: {message}")
        self.results[stage] = results
        metrics = {f"lm_eval/{stage}/{task}/{metric}": value
                   for task, values in results.items() for metric, value in values.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        return results

    def table(self) -> str:
        """Markdown table: one row per task and metric (standard errors left out), one column per stage."""
        stages = [s for s in SUMMARY_STAGES[:2] if s in self.results]
        stages += [s for s in self.results if s.startswith("step_")] + [s for s in SUMMARY_STAGES[2:] if s in self.results]
        rows = ["| task | metric | " + " | ".join(_LABELS.get(s, s.replace("_", " ")) for s in stages) + " |",
                "|---|---|" + "---|" * len(stages)]
        keys = dict.fromkeys((task, metric) for s in stages for task, values in self.results[s].items()
                             for metric in values if not metric.endswith("_stderr"))
        for task, metric in keys:
            cells = []
            for s in stages:
                value = self.results[s].get(task, {}).get(metric)
                stderr = self.results[s].get(task, {}).get(f"{metric}_stderr")
                cells.append("" if value is None else f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else ""))
            rows.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
        return "\n".join(rows)

    def summary_rows(self) -> dict[str, dict[str, float]]:
        """``{"<task> <metric>": {stage: value}}`` for the dense, pruned and recovered stages."""
        rows: dict[str, dict[str, float]] = {}
        for stage in SUMMARY_STAGES:
            for task, values in self.results.get(stage, {}).items():
                for metric, value in values.items():
                    if not metric.endswith("_stderr"):
                        rows.setdefault(f"{task} {metric}", {})[stage] = value
        return rows

    def state_dict(self) -> dict:
        return {"results": {s: {t: dict(m) for t, m in tasks.items()} for s, tasks in self.results.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        self.results = {s: {t: dict(m) for t, m in tasks.items()} for s, tasks in state_dict.get("results", {}).items()}

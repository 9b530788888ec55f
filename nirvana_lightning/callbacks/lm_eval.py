"""lm-eval accuracy of the dense, pruned and recovered model (and every N steps), as a table at fit end."""

from __future__ import annotations

import lightning as L

from ..contract import prunable
from ..eval.lm_eval import run_lm_eval, validate_settings, validate_tasks
from ..sharding import on_rank_zero
from .staged import StagedEvaluation


class LmEvalCallback(StagedEvaluation):
    """Runs lm-evaluation-harness on the in-memory model around recovery.

    * ``dense`` (when ``dense=True``): at setup, before pruning. List this callback BEFORE
      ``NirvanaPruningCallback`` in ``trainer.callbacks`` (callbacks run in list order); a model
      that is already pruned at that point is an error.
    * ``pruned``: at fit start, after pruning and before any training step.
    * ``step_<n>``: every ``every_n_steps`` optimizer steps (``trainer.global_step``), except the
      last step, which ``recovered`` covers.
    * ``recovered``: at fit end; then a table of every stage is printed.

    ``results`` is ``{stage: {"<task>/<metric>": value}}`` (metrics as in
    :func:`~nirvana_lightning.eval.lm_eval.flatten_results`, e.g. ``acc``, ``acc_stderr``,
    ``acc_norm``). Logging follows :class:`~nirvana_lightning.callbacks.staged.StagedEvaluation`:
    ``lm_eval/<task>/<metric>`` as a curve and ``lm_eval/<task>/<metric>/<stage>``. The results
    are part of the callback's state, so a resumed run keeps its dense and pruned values.

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

    prefix = "lm_eval"

    def __init__(
        self,
        tasks: list[str] = ["nirvana_brown_cloze"],  # noqa: B006 (copied, never mutated; shown in CLI help)
        num_fewshot: int = 0,
        limit: int | None = None,
        batch_size: int = 8,
        every_n_steps: int | None = None,
        dense: bool = False,
    ) -> None:
        super().__init__(dense=dense, every_n_steps=every_n_steps)
        key = "LmEvalCallback."
        self.tasks = validate_tasks(tasks, key + "tasks")
        validate_settings(num_fewshot, limit, batch_size, key)
        self.num_fewshot, self.limit, self.batch_size = num_fewshot, limit, batch_size

    def metric_label(self, metric: str) -> str:
        return metric.replace("/", " ", 1)  # "<task>/<metric>" -> "<task> <metric>"

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> dict[str, float]:
        """Evaluate ``pl_module.model`` on global rank 0 and share the results with every rank."""
        def run() -> dict:
            tokenizer = prunable(pl_module).tokenizer
            if tokenizer is None:
                raise RuntimeError("LmEvalCallback: the module has no tokenizer (build_model() sets it)")
            return run_lm_eval(pl_module.model, tokenizer, self.tasks, num_fewshot=self.num_fewshot,
                               limit=self.limit, batch_size=self.batch_size)

        # a collective: every rank reaches this line at the same hook and step
        results = on_rank_zero(trainer, run, what=f"LmEvalCallback at stage {stage!r}")
        return {f"{task}/{metric}": value for task, values in results.items() for metric, value in values.items()}

    def summary_rows(self) -> dict[str, dict[str, float]]:
        """Rows ``"<task> <metric>"`` for the dense, pruned and recovered stages (standard errors left out)."""
        return {label: values for label, values in super().summary_rows().items() if not label.endswith("_stderr")}

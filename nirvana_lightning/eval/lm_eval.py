"""lm-evaluation-harness on an in-memory model (no reload from disk), with offline tasks shipped here.

lm-eval is an optional dependency (``pip install nirvana-lightning[eval]``): it is imported inside
the functions that need it. Task names are checked by :func:`validate_tasks` before any model loads.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info

from ..errors import ConfigError, check_positive_int
from ..families import get_family

_TASK_DIR = Path(__file__).resolve().parent / "tasks"

#: Tasks shipped inside the package (YAML + JSONL under ``eval/tasks/``; provenance in its README.md).
#: They run without network access; their data paths are resolved to the installed location at run time.
OFFLINE_TASKS: dict[str, Path] = {
    "nirvana_brown_cloze": _TASK_DIR / "nirvana_brown_cloze.yaml",
}
_EXAMPLES = ("hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "lambada_openai", "mmlu")
_INSTALL_HINT = "lm-eval is not installed: pip install nirvana-lightning[eval]"
# lm-eval warns on every in-memory model; both warnings are expected here (one process, our own model)
_EXPECTED_WARNINGS = ("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized model")


def _require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise ImportError(_INSTALL_HINT)


@functools.cache
def _task_manager(include_defaults: bool):
    """A cached ``lm_eval`` TaskManager.

    With the standard tasks it indexes ~14,000 YAML files (about 10 s on two CPU cores), so it is
    built at most once per process and only when a name is not an offline task.
    """
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError(_INSTALL_HINT) from err
    return TaskManager(include_defaults=include_defaults)


def validate_settings(num_fewshot: int, limit: int | None, batch_size: int, key: str = "") -> None:
    """Raise :class:`ConfigError` unless ``num_fewshot >= 0``, ``limit`` is None or > 0 and ``batch_size > 0``.

    ``key`` prefixes the names in error messages (e.g. ``"LmEvalCallback."``).
    """
    check_positive_int(key + "num_fewshot", num_fewshot, minimum=0)
    check_positive_int(key + "limit", limit, minimum=1, allow_none=True)
    check_positive_int(key + "batch_size", batch_size, minimum=1)


def validate_tasks(tasks: Sequence[str], key: str = "tasks") -> list[str]:
    """Check task names before any model loads; return them as a list.

    Offline tasks (:data:`OFFLINE_TASKS`) are checked without reading anything. Any other name must
    be a task, group or tag known to the installed lm-eval, which costs one TaskManager index (cached).

    Args:
        tasks: task names, e.g. ``["nirvana_brown_cloze", "hellaswag"]``.
        key: the config key as the user wrote it; errors name ``<key>[<i>]``.

    Raises:
        ConfigError: empty list, a non-string entry or an unknown name.
        ImportError: lm-eval is not installed.
    """
    if isinstance(tasks, str) or not isinstance(tasks, Sequence) or not tasks:
        raise ConfigError(key, tasks, "a non-empty list of task names")
    _require_lm_eval()
    for i, name in enumerate(tasks):
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{key}[{i}]", name, "a task name (string)")
        if name in OFFLINE_TASKS:
            continue
        known = _task_manager(include_defaults=True).all_tasks
        if name not in known:
            import difflib

            close = difflib.get_close_matches(name, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(
                f"{key}[{i}]", name,
                f"an offline task ({', '.join(OFFLINE_TASKS)}) or a task known to lm-eval "
                f"(e.g. {', '.join(_EXAMPLES)}, ...){hint}",
            )
    return list(tasks)


def offline_task_config(name: str) -> dict[str, Any]:
    """The config dict of a shipped task, its ``data_files`` made absolute (the installed location)."""
    import yaml

    path = OFFLINE_TASKS[name]
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    files = config["dataset_kwargs"]["data_files"]
    config["dataset_kwargs"]["data_files"] = {split: str(path.parent / f) for split, f in files.items()}
    return config


def flatten_results(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from lm-eval's ``results["results"]``.

    Keeps numeric ``"<metric>,<filter>"`` entries: the ``none`` filter is dropped from the name
    (``acc,none`` -> ``acc``), other filters are appended (``exact_match,strict-match`` ->
    ``exact_match_strict-match``). Standard errors are kept as ``<metric>_stderr`` when lm-eval
    computed one (it writes ``"N/A"`` otherwise, which is skipped). Non-metric entries (``alias``,
    ``sample_len``) are dropped.
    """
    flat: dict[str, dict[str, float]] = {}
    for task, entries in results.items():
        metrics: dict[str, float] = {}
        for name, value in entries.items():
            if "," not in name or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, filt = name.split(",", 1)
            metric = metric if filt == "none" else f"{metric}_{filt}"
            if not math.isnan(value):
                metrics[metric] = float(value)
        flat[task] = metrics
    return flat


class _DropExpected(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_EXPECTED_WARNINGS)


@contextmanager
def _quiet_in_memory_warnings() -> Iterator[None]:
    logger = logging.getLogger("lm_eval.models.huggingface")
    filt = _DropExpected()
    logger.addFilter(filt)
    try:
        yield
    finally:
        logger.removeFilter(filt)


@contextmanager
def _preserved_rng() -> Iterator[None]:
    """``simple_evaluate`` seeds the global RNGs; put them back so training continues unchanged."""
    import numpy as np

    py_state, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def run_lm_eval(
    model: torch.nn.Module,
    tokenizer,
    tasks: Sequence[str],
    *,
    num_fewshot: int = 0,
    limit: int | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    seed: int = 1234,
) -> dict[str, dict[str, float]]:
    """Evaluate an in-memory causal LM (or T5, with lm-eval's seq2seq backend) with lm-evaluation-harness.

    The model is wrapped as ``HFLM(pretrained=model)``; nothing is written to or read from disk
    except the task data (offline tasks read the JSONL shipped in the package; standard tasks go
    through ``datasets``, so they need network access or a populated HF datasets cache). A peft
    model is evaluated as is (adapters active). The model's weights are not changed; the
    train/eval mode of every submodule, the model's device and the global RNG states are restored.

    Args:
        model: a transformers causal LM, or a peft wrapper of one.
        tokenizer: its tokenizer (with a pad token; lm-eval adds one when there is none).
        tasks: offline task names (:data:`OFFLINE_TASKS`) and/or lm-eval task, group or tag names.
        num_fewshot: few-shot examples per item (tasks whose YAML pins 0 keep 0).
        limit: evaluate only the first ``limit`` items of each task (offline items are shuffled).
        batch_size: loglikelihood requests per forward pass.
        device: where to evaluate; default where the model already is. The model goes back after.
        seed: the python, numpy, torch and few-shot seeds given to ``simple_evaluate``.

    Returns:
        ``{task: {metric: value}}``, e.g. ``{"nirvana_brown_cloze": {"acc": 0.31, "acc_stderr": 0.03,
        "acc_norm": 0.33, "acc_norm_stderr": 0.03}}``; groups appear next to their subtasks. See
        :func:`flatten_results` for the metric names.
    """
    tasks = validate_tasks(tasks)
    validate_settings(num_fewshot, limit, batch_size)
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        raise ImportError(_INSTALL_HINT) from err

    only_offline = all(t in OFFLINE_TASKS for t in tasks)
    task_manager = _task_manager(include_defaults=not only_offline)
    specs: list[str | dict] = [offline_task_config(t) if t in OFFLINE_TASKS else t for t in tasks]

    home = next(model.parameters()).device
    target = torch.device(device) if device is not None else home
    modes = {m: m.training for m in model.modules()}  # HFLM calls model.eval()
    rank_zero_info(f"lm-eval: {', '.join(tasks)} ({num_fewshot}-shot, limit {limit}, batch {batch_size}) on {target}")
    try:
        if target != home:
            model.to(target)
        with _preserved_rng(), _quiet_in_memory_warnings():
            # log-probs in float32 whatever the model's dtype: a bf16 log-softmax over a large vocabulary
            # rounds every choice's score and flips close multiple-choice answers
            # an encoder-decoder (T5) runs lm-eval's seq2seq backend: the context goes to the encoder, each
            # choice is scored by the decoder
            backend = get_family(model).lm_eval_backend
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, softmax_dtype=torch.float32,
                      backend=backend)
            out = lm_eval.simple_evaluate(
                model=lm, tasks=specs, num_fewshot=num_fewshot, limit=limit, task_manager=task_manager,
                log_samples=False, bootstrap_iters=1000, random_seed=seed, numpy_random_seed=seed,
                torch_random_seed=seed, fewshot_random_seed=seed,
            )
    finally:
        if target != home:
            model.to(home)
        for module, training in modes.items():
            module.training = training
    if out is None:  # lm-eval returns results on its rank 0 only (LOCAL_RANK != 0 here)
        raise RuntimeError("lm-eval returned no results: call run_lm_eval on local rank 0 only")
    results = flatten_results(out["results"])
    for task, metrics in results.items():
        shown = ", ".join(f"{m} {v:.4f}" for m, v in metrics.items() if not m.endswith("_stderr"))
        rank_zero_info(f"lm-eval {task}: {shown}")
    return results

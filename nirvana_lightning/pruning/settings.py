"""Typed pruning settings: each declared once here, validated once when constructed.

The same objects configure the Python API (``prune(model, calibration, target=PruningTarget(...))``)
and the pruning callback, where they nest in YAML::

    - class_path: nirvana_lightning.NirvanaPruningCallback
      init_args:
        target: {sparsity: 0.2, gamma: 3.0}
        scoring: {criterion: nirvana}
        calibration: {samples: 32, seq_len: 128}

A bad value raises :class:`~nirvana_lightning.errors.ConfigError` naming ``<section>.<field>``
(``target.sparsity``), the value and the valid choices. ``docs/configs.md`` lists every field and is
checked against these classes by ``tests/test_settings.py``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any

from ..errors import ConfigError, check_choice, check_positive_int
from ..families.base import GRANULARITIES
from .saliency import CRITERIA, DATA_CRITERIA, FUNCTIONALS

#: allocation modes: ``global`` ranks units of all layers together; ``uniform`` the same fraction per layer
MODES = ("global", "uniform")
ROUND_TO_CHOICES = (1, 8, 16, 32, 64, 128, 256)
#: micro-batch accumulation: exact gradient sums, or lean per-micro-batch saliency sums
ACCUMULATE = ("gradient", "saliency")
SCHEDULES = ("once", "constant", "linear", "cubic")
SCORING_DTYPES = ("float32", "model")
SELECTION_METHODS = ("none", "kl")
CANDIDATE_MODES = ("random", "document")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_index(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _freeze(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # normalising a frozen dataclass's own field in __post_init__


#: gamma "auto"'s default grid: uniform fractions (1) to the paper's range (3-4) and beyond
GAMMA_GRID = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


@dataclass(frozen=True)
class PruningTarget:
    """How much to remove, and how it is shared between attention and MLP.

    Args:
        sparsity: fraction of block linear weights to remove, in [0, 1) (0 is the identity).
        param_budget: alternatively, the total parameter count to reach (then set ``sparsity: null``).
        gamma: MLP-to-attention pruning-fraction ratio (1: equal fractions), or ``auto``: the value of
            ``gamma_grid`` whose masked model has the lowest KL to the dense model on the probe.
        gamma_grid: the gammas ``auto`` tries (default 0.5, 1, 1.5, 2, 3, 4, 6).
        round_to: kept MLP width per layer rounded up to a multiple of this (32 fits GGUF q8_0/q4_0
            blocks, 256 its k-quants).
        tp_size: tensor-parallel degree the pruned model will be served at: every layer keeps a multiple
            of it in KV groups and in MLP neurons.
        skip_layers: layer indices left untouched.
        allocation: ``global`` (one ranking across layers, the paper's) or ``uniform`` (the same fractions
            in every layer).
        attention_granularity: ``group`` (whole KV groups: the paper's) or ``query_head``: single query heads
            (their q rows and o columns) are ranked too; a layer keeps the same number of heads per KV group,
            and a group goes whole (k/v too) when all its heads go. Saves q/o weights and attention compute,
            not KV cache.
    """

    sparsity: float | None = 0.2
    param_budget: int | None = None
    gamma: float | str = 1.0
    gamma_grid: tuple[float, ...] | None = None
    round_to: int = 8
    tp_size: int = 1
    skip_layers: tuple[int, ...] = ()
    allocation: str = "global"
    attention_granularity: str = GRANULARITIES[0]

    def __post_init__(self) -> None:
        if (self.sparsity is None) == (self.param_budget is None):
            raise ConfigError("target.sparsity", self.sparsity,
                              f"exactly one of target.sparsity and target.param_budget set "
                              f"(param_budget={self.param_budget!r})")
        if self.sparsity is not None and (not _is_number(self.sparsity) or not 0.0 <= self.sparsity < 1.0):
            raise ConfigError("target.sparsity", self.sparsity, "a fraction in [0, 1)")
        if self.param_budget is not None:
            check_positive_int("target.param_budget", self.param_budget)
        if isinstance(self.gamma, str):
            if self.gamma != "auto":
                raise ConfigError("target.gamma", self.gamma, "a finite number > 0 or 'auto'")
        elif not _is_number(self.gamma) or self.gamma <= 0:
            raise ConfigError("target.gamma", self.gamma, "a finite number > 0 or 'auto' (1 gives equal fractions)")
        if self.gamma_grid is not None:
            grid = (self.gamma_grid,) if _is_number(self.gamma_grid) else self.gamma_grid
            if isinstance(grid, (str, dict)) or not hasattr(grid, "__iter__"):
                raise ConfigError("target.gamma_grid", grid, "one or more numbers > 0 (a list)")
            grid = tuple(grid)
            if not grid or any(not _is_number(g) or g <= 0 for g in grid):
                raise ConfigError("target.gamma_grid", list(grid), "one or more numbers > 0")
            _freeze(self, "gamma_grid", tuple(float(g) for g in grid))
        check_choice("target.round_to", self.round_to, ROUND_TO_CHOICES)
        check_positive_int("target.tp_size", self.tp_size)
        skip = self.skip_layers
        if isinstance(skip, bool) or not (skip is None or isinstance(skip, (int, list, tuple))):
            raise ConfigError("target.skip_layers", skip, "a list of layer indices (or one index)")
        skip = (skip,) if isinstance(skip, int) else tuple(skip or ())  # skip_layers: 0 means layer 0, not none
        for i, layer in enumerate(skip):
            check_positive_int(f"target.skip_layers[{i}]", layer, minimum=0)
        _freeze(self, "skip_layers", skip)
        check_choice("target.allocation", self.allocation, MODES)
        check_choice("target.attention_granularity", self.attention_granularity, GRANULARITIES)

    @property
    def grid(self) -> tuple[float, ...]:
        """The gammas ``auto`` tries."""
        return self.gamma_grid if self.gamma_grid is not None else tuple(GAMMA_GRID)


@dataclass(frozen=True)
class Scoring:
    """How units are scored.

    Args:
        criterion: ``nirvana`` | ``magnitude`` | ``taylor`` | ``random`` | ``wanda_sp`` | ``flap``.
        functional: NIRVANA's output functional: ``max_over_seq`` | ``max_over_vocab`` | ``sum_logits``.
        dtype: ``float32`` (a half-precision model is scored in float32 one layer at a time, never
            converted) or ``model``.
        micro_batch_size: calibration windows per backward pass (default: all at once).
        accumulate: ``gradient`` (sum gradients over micro-batches, then saliency: the paper's) or
            ``saliency`` (sum per-micro-batch saliencies).
        checkpointing: recompute each layer's activations in backward (memory).
        device: score on this device one layer at a time while the model stays where it is (host
            memory): ``cuda:1``, or ``+0`` in the callback for each rank's own accelerator. Default:
            where the model is (the callback moves it to the training device).
        seed: seed of the ``random`` criterion.
    """

    criterion: str = "nirvana"
    functional: str = "max_over_seq"
    dtype: str = "float32"
    micro_batch_size: int | None = None
    accumulate: str = "gradient"
    checkpointing: bool = True
    device: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("scoring.criterion", self.criterion, CRITERIA)
        check_choice("scoring.functional", self.functional, FUNCTIONALS)
        check_choice("scoring.dtype", self.dtype, SCORING_DTYPES)
        if self.micro_batch_size is not None:
            check_positive_int("scoring.micro_batch_size", self.micro_batch_size)
        check_choice("scoring.accumulate", self.accumulate, ACCUMULATE)
        if not isinstance(self.checkpointing, bool):
            raise ConfigError("scoring.checkpointing", self.checkpointing, (True, False))
        if self.device is not None:
            check_device_spec("scoring.device", self.device)
        check_positive_int("scoring.seed", self.seed, minimum=0)

    @property
    def needs_data(self) -> bool:
        """Whether the criterion reads calibration text."""
        return self.criterion in DATA_CRITERIA


def check_device_spec(key: str, spec: str) -> str:
    """``cpu``, ``cuda:1`` or ``+N`` (N devices after each rank's own); syntax only."""
    import torch

    text = str(spec).strip()
    if text.startswith("+"):
        if text[1:].isdigit():
            return text
    else:
        try:
            torch.device(text)
            return text
        except (RuntimeError, TypeError):
            pass
    raise ConfigError(key, spec, "cpu, a device such as cuda:1, or +N (N accelerators after each rank's own)")


@dataclass(frozen=True)
class Calibration:
    """The calibration windows scoring reads (drawn by the data module).

    Args:
        samples: number of windows N.
        seq_len: tokens per window T.
        seed: seed of the window draw (iterative step k draws with ``seed + k - 1``); the probe windows of
            KL selection and of ``gamma: auto`` are drawn from held-out text with the same seed.
        source: text to draw them from, in the forms ``data.sources`` takes (builtin corpora, local
            ``.txt`` / ``.jsonl`` / ``.json`` files, ``hf:<dataset>``); default: the training side of the data
            module's split (for ``sft``: prompt + response).
    """

    samples: int = 32
    seq_len: int = 128
    seed: int = 0
    source: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        check_positive_int("calibration.samples", self.samples)
        check_positive_int("calibration.seq_len", self.seq_len)
        check_positive_int("calibration.seed", self.seed, minimum=0)
        if self.source is not None:
            from ..data.sources import validate_source_spec

            source = (self.source,) if isinstance(self.source, str) else tuple(self.source)
            if not source:
                raise ConfigError("calibration.source", [], "null (the training text) or one source or more")
            for i, spec in enumerate(source):
                validate_source_spec(spec, f"calibration.source[{i}]")
            _freeze(self, "source", source)


@dataclass(frozen=True)
class Selection:
    """Choosing the calibration set by KL divergence (and the probe ``gamma: auto`` uses).

    Args:
        method: ``none`` (the seeded windows) or ``kl``: try ``num_candidates`` calibration sets and keep the
            one whose pruned model has the lowest KL to the dense model on the probe.
        num_candidates: candidate calibration sets.
        candidate_mode: ``random`` (seeded window draws) or ``document`` (one document each).
        probe_samples / probe_seq_len: probe windows from held-out (validation-side) documents.
    """

    method: str = "none"
    num_candidates: int = 8
    candidate_mode: str = "random"
    probe_samples: int = 128
    probe_seq_len: int = 64

    def __post_init__(self) -> None:
        check_choice("selection.method", self.method, SELECTION_METHODS)
        check_positive_int("selection.num_candidates", self.num_candidates)
        check_choice("selection.candidate_mode", self.candidate_mode, CANDIDATE_MODES)
        check_positive_int("selection.probe_samples", self.probe_samples)
        check_positive_int("selection.probe_seq_len", self.probe_seq_len, minimum=2)  # next-token KL needs 2


@dataclass(frozen=True)
class Schedule:
    """When pruning happens: once at setup, or in ``n_steps`` steps along a curve toward the target.

    Args:
        kind: ``once`` (prune at setup) or an iterative curve: ``linear``, ``constant`` (the same fraction
            of what remains at each step) or ``cubic`` (large cuts first).
        n_steps: pruning steps of an iterative schedule.
        at_epochs: the epochs at whose start each step prunes (epoch 0 prunes at setup); or
        every_n_steps: prune at setup and then every N optimizer steps until ``n_steps`` are done.
    """

    kind: str = "once"
    n_steps: int = 1
    at_epochs: tuple[int, ...] | None = None
    every_n_steps: int | None = None

    def __post_init__(self) -> None:
        check_choice("schedule.kind", self.kind, SCHEDULES)
        check_positive_int("schedule.n_steps", self.n_steps)
        if self.kind == "once":
            if self.n_steps != 1 or self.at_epochs is not None or self.every_n_steps is not None:
                raise ConfigError("schedule.kind", self.kind, "an iterative schedule (constant, linear, cubic) when "
                                  "n_steps, at_epochs or every_n_steps is set")
            return
        if (self.at_epochs is None) == (self.every_n_steps is None):
            raise ConfigError("schedule.at_epochs", self.at_epochs,
                              "exactly one of schedule.at_epochs and schedule.every_n_steps for an iterative schedule")
        if self.at_epochs is not None:
            epochs = tuple(self.at_epochs)
            if len(epochs) != self.n_steps or any(not _is_index(e) for e in epochs) \
                    or list(epochs) != sorted(set(epochs)):
                raise ConfigError("schedule.at_epochs", list(epochs), f"{self.n_steps} distinct increasing epoch "
                                  f"indices >= 0 (n_steps={self.n_steps})")
            _freeze(self, "at_epochs", epochs)
        if self.every_n_steps is not None:
            check_positive_int("schedule.every_n_steps", self.every_n_steps)

    @property
    def iterative(self) -> bool:
        return self.kind != "once"

    @property
    def prunes_at_setup(self) -> bool:
        """Whether the first step runs at fit setup (before optimizers exist)."""
        return not self.iterative or self.every_n_steps is not None or self.at_epochs[0] == 0

    def due(self, *, epoch: int, step: int, done: int, epoch_start: bool) -> bool:
        """Whether pruning step ``done + 1`` is due now (pure; the callback asks at every epoch start and
        after every optimizer step).

        ``epoch_start``: asked at the start of epoch ``epoch`` (``at_epochs`` schedules) rather than after
        optimizer step ``step`` (``every_n_steps`` schedules). Steps at setup are not asked for here.
        """
        if not self.iterative or done >= self.n_steps:
            return False
        if self.at_epochs is not None:
            return epoch_start and epoch == self.at_epochs[done]
        return not epoch_start and step > 0 and step >= self.every_n_steps * done


def check_combination(target: PruningTarget, scoring: Scoring, selection: Selection, schedule: Schedule, *,
                      plan_path: str | None = None, bias_compensation: bool = False) -> None:
    """The rules that span two settings, checked once when the callback is built (the Python API's functions
    take one target and one scoring each: these combinations cannot reach them)."""
    if schedule.iterative:
        if target.sparsity is None or plan_path is not None:
            raise ConfigError("schedule.kind", schedule.kind, "'once' unless the target is given as target.sparsity "
                              "(no target.param_budget, no plan_path)")
        if target.gamma == "auto":
            raise ConfigError("target.gamma", "auto", "a number with an iterative schedule (its removal counts are "
                              "fixed from gamma before each step is scored)")
        if bias_compensation:
            raise ConfigError("bias_compensation", True, "false with an iterative schedule (compensation runs at the "
                              "one-shot cut)")
    if selection.method == "kl":
        if plan_path is not None:
            raise ConfigError("selection.method", "kl", "'none' when plan_path is set (the plan is applied as saved)")
        if not scoring.needs_data:
            raise ConfigError("selection.method", "kl", f"'none' with scoring.criterion {scoring.criterion!r} (it "
                              "uses no calibration)")
        if scoring.device is not None:
            raise ConfigError("scoring.device", scoring.device, "null with selection.method kl (the KL probe runs "
                              "the whole model where it is; only scoring is offloaded layer by layer)")


#: the flat keyword arguments of 0.1's ``prune`` / ``make_plan`` / ``select_calibration``, and where each lives now
FLAT_KEYWORDS: dict[str, tuple[str, str]] = {
    **{name: ("target", name) for name in ("sparsity", "param_budget", "gamma", "gamma_grid", "round_to", "tp_size",
                                            "skip_layers", "allocation", "attention_granularity")},
    **{name: ("scoring", name) for name in ("criterion", "functional", "micro_batch_size", "accumulate",
                                            "checkpointing", "seed")},
    "scoring_dtype": ("scoring", "dtype"),
    "scoring_device": ("scoring", "device"),
}

#: 0.1's flat ``NirvanaPruningCallback`` keys and the data module's calibration keys: their new names
RENAMED_KEYS: dict[str, str] = {
    **{f"NirvanaPruningCallback.{flat}": f"NirvanaPruningCallback.{section}.{name}"
       for flat, (section, name) in FLAT_KEYWORDS.items() if flat not in ("scoring_device", "attention_granularity")},
    "NirvanaPruningCallback.offload_scoring": "NirvanaPruningCallback.scoring.device (+0: each rank's accelerator)",
    "NirvanaPruningCallback.calibration_samples": "NirvanaPruningCallback.calibration.samples",
    "NirvanaPruningCallback.calibration_seq_len": "NirvanaPruningCallback.calibration.seq_len",
    "NirvanaPruningCallback.calibration_seed": "NirvanaPruningCallback.calibration.seed",
    "NirvanaPruningCallback.select": "NirvanaPruningCallback.selection.method",
    "NirvanaPruningCallback.num_candidates": "NirvanaPruningCallback.selection.num_candidates",
    "NirvanaPruningCallback.candidate_mode": "NirvanaPruningCallback.selection.candidate_mode",
    "NirvanaPruningCallback.probe_samples": "NirvanaPruningCallback.selection.probe_samples",
    "NirvanaPruningCallback.probe_seq_len": "NirvanaPruningCallback.selection.probe_seq_len",
    "NirvanaPruningCallback.probe_seed": "NirvanaPruningCallback.calibration.seed (one seed draws both)",
    "NirvanaPruningCallback.schedule": "NirvanaPruningCallback.schedule.kind",
    "NirvanaPruningCallback.n_steps": "NirvanaPruningCallback.schedule.n_steps",
    "NirvanaPruningCallback.at_epochs": "NirvanaPruningCallback.schedule.at_epochs",
    "NirvanaPruningCallback.every_n_steps": "NirvanaPruningCallback.schedule.every_n_steps",
    "data.calibration_samples": "NirvanaPruningCallback.calibration.samples",
    "data.calibration_seq_len": "NirvanaPruningCallback.calibration.seq_len",
    "data.calibration_seed": "NirvanaPruningCallback.calibration.seed",
    "data.calibration_sources": "NirvanaPruningCallback.calibration.source",
}


def from_flat(target: PruningTarget | None, scoring: Scoring | None, flat: dict[str, Any],
              where: str) -> tuple[PruningTarget, Scoring]:
    """0.1-style keyword arguments (``sparsity=0.3, criterion="taylor"``) folded into the typed settings.

    A keyword overrides the same field of an object also passed; an unknown keyword is an error that
    lists the valid ones.
    """
    target = as_settings(PruningTarget, target, f"{where}: target") if target is not None else None
    scoring = as_settings(Scoring, scoring, f"{where}: scoring") if scoring is not None else None
    parts: dict[str, dict[str, Any]] = {"target": {}, "scoring": {}}
    for key, value in flat.items():
        if key not in FLAT_KEYWORDS:
            raise ConfigError(f"{where}({key}=...)", value, "a keyword among: target, scoring, "
                              + ", ".join(sorted(FLAT_KEYWORDS)))
        section, name = FLAT_KEYWORDS[key]
        parts[section][name] = value
    if target is None and flat.get("sparsity") is None and flat.get("param_budget") is None:
        raise ConfigError("target.sparsity", None, f"exactly one of target.sparsity and target.param_budget for {where} "
                          "(target=PruningTarget(...), sparsity= or param_budget=; nothing is pruned by default)")
    if "sparsity" not in flat and flat.get("param_budget") is not None:
        parts["target"].setdefault("sparsity", None)  # a budget alone replaces the default sparsity
    target = dataclasses.replace(target or PruningTarget(), **parts["target"]) if parts["target"] or target is None \
        else target
    scoring = dataclasses.replace(scoring or Scoring(), **parts["scoring"]) if parts["scoring"] or scoring is None \
        else scoring
    return target, scoring


SECTIONS = {"target": PruningTarget, "scoring": Scoring, "calibration": Calibration, "selection": Selection,
            "schedule": Schedule}
#: the one field a bare value stands for, where a user writes one (``target=0.3``, ``scoring="taylor"``)
SHORTHAND = {PruningTarget: ("sparsity", (int, float)), Scoring: ("criterion", (str,)),
             Selection: ("method", (str,)), Schedule: ("kind", (str,))}


def as_settings(cls: type, value: Any, key: str):
    """``value`` as a ``cls`` settings object: the object itself, a mapping of its fields, or the bare value
    of its one obvious field (:data:`SHORTHAND`); anything else is a ConfigError naming ``key``."""
    if isinstance(value, cls):
        return value
    names = [f.name for f in dataclasses.fields(cls)]
    if isinstance(value, dict):
        unknown = [k for k in value if k not in names]
        if unknown:
            raise ConfigError(f"{key}.{unknown[0]}", value[unknown[0]], f"a field of {cls.__name__}: {names}")
        return cls(**value)
    field_name, kinds = SHORTHAND.get(cls, (None, ()))
    if field_name and isinstance(value, kinds) and not isinstance(value, bool):
        return cls(**{field_name: value})
    short = f", or a bare {field_name}" if field_name else ""
    raise ConfigError(key, value, f"a {cls.__name__}, a mapping of its fields ({', '.join(names)}){short}")


def field_docs(cls: type) -> dict[str, str]:
    """Each field's description from the class docstring's ``Args:`` block (``a / b:`` lines document both)."""
    import inspect

    doc = inspect.getdoc(cls) or ""
    out: dict[str, str] = {}
    current: list[str] = []
    lines = doc.split("Args:", 1)[1].splitlines() if "Args:" in doc else []
    for line in lines:
        stripped = line.strip()
        if stripped and not line.startswith(" "):
            break  # the paragraph after the Args block
        head, sep, rest = stripped.partition(": ")
        names = [n.strip() for n in head.split("/")]
        if sep and line.startswith("    ") and not line.startswith("     ") \
                and all(n.isidentifier() for n in names):
            current = names
            for n in names:
                out[n] = rest.strip()
        elif stripped and current:
            for n in current:
                out[n] += " " + stripped
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in out.items() if k in names}

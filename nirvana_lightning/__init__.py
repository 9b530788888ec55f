"""nirvana-lightning: structured pruning of LLMs (NIRVANA) and recovery in one Lightning run.

Names are imported on first use (PEP 562), so light entry points (the vLLM plugin, the GGUF
writer) can be imported in a serving environment without Lightning, peft or lm-eval.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

#: public name -> submodule that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(
        ("ExportCallback", "KLToDenseCallback", "LmEvalCallback", "NirvanaPruningCallback", "PerplexityCallback",
         "PruningReportCallback", "RunSummaryCallback"), ".callbacks"),
    "NirvanaDataModule": ".data",
    "ConfigError": ".errors",
    **dict.fromkeys(("load_pruned", "save_pruned"), ".export"),
    "load_pruned_adapter": ".loading",
    "save_gguf": ".serving.gguf_export",
    **dict.fromkeys(("load_model", "load_tokenizer"), ".loading"),
    "NirvanaModule": ".module",
    **dict.fromkeys(
        ("PruningPlan", "UnitScores", "allocate", "apply_plan", "compute_output_functional", "compute_unit_scores",
         "count_parameters", "cut", "make_plan", "masked_units", "plan_from_scores", "prune", "select_calibration"),
        ".pruning"),
    **dict.fromkeys(("Calibration", "PruningTarget", "Schedule", "Scoring", "Selection"), ".pruning.settings"),
    **dict.fromkeys(("PrunableModule", "PruneListener", "SummarySource"), ".contract"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'nirvana_lightning' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs
    from .callbacks import (  # noqa: F401
        ExportCallback,
        KLToDenseCallback,
        LmEvalCallback,
        NirvanaPruningCallback,
        PerplexityCallback,
        PruningReportCallback,
        RunSummaryCallback,
    )
    from .contract import PrunableModule, PruneListener, SummarySource  # noqa: F401
    from .data import NirvanaDataModule  # noqa: F401
    from .errors import ConfigError  # noqa: F401
    from .export import load_pruned, save_pruned  # noqa: F401
    from .loading import (  # noqa: F401
        load_model,
        load_pruned_adapter,  # noqa: F401
        load_tokenizer,
    )
    from .module import NirvanaModule  # noqa: F401
    from .pruning import (  # noqa: F401
        PruningPlan,
        UnitScores,
        allocate,
        apply_plan,
        compute_output_functional,
        compute_unit_scores,
        count_parameters,
        cut,
        make_plan,
        masked_units,
        plan_from_scores,
        prune,
        select_calibration,
    )
    from .pruning.settings import Calibration, PruningTarget, Schedule, Scoring, Selection  # noqa: F401
    from .serving.gguf_export import save_gguf  # noqa: F401

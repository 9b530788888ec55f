"""nirvana-lightning: structured pruning of LLMs (NIRVANA) and recovery in one Lightning run."""

from .callbacks import (
    ExportCallback,
    KLToDenseCallback,
    LmEvalCallback,
    NirvanaPruningCallback,
    PerplexityCallback,
    PruningReportCallback,
    RunSummaryCallback,
)
from .data import NirvanaDataModule
from .errors import ConfigError
from .export import load_pruned, load_pruned_adapter, save_pruned
from .loading import load_model, load_tokenizer
from .module import NirvanaModule
from .pruning import (
    PruningPlan,
    UnitScores,
    allocate,
    apply_plan,
    compute_output_functional,
    compute_unit_scores,
    count_parameters,
    make_plan,
    masked_units,
    plan_from_scores,
    prune,
    select_calibration,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "ExportCallback", "KLToDenseCallback", "LmEvalCallback", "NirvanaDataModule", "NirvanaModule", "NirvanaPruningCallback",
    "PerplexityCallback", "PruningReportCallback", "RunSummaryCallback",
    "PruningPlan", "UnitScores", "allocate", "apply_plan", "compute_output_functional", "compute_unit_scores",
    "count_parameters", "load_model", "load_pruned", "load_pruned_adapter", "load_tokenizer", "make_plan",
    "masked_units", "plan_from_scores", "prune", "save_pruned", "select_calibration",
]

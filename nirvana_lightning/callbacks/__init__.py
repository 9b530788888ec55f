"""Lightning callbacks: they decide when; library functions do the work."""

from .export import ExportCallback
from .kl import KLToDenseCallback
from .lm_eval import LmEvalCallback
from .perplexity import PerplexityCallback
from .pruning import NirvanaPruningCallback
from .report import PruningReportCallback
from .staged import StagedEvaluation
from .summary import RunSummaryCallback

__all__ = ["ExportCallback", "KLToDenseCallback", "LmEvalCallback", "NirvanaPruningCallback", "PerplexityCallback",
           "PruningReportCallback", "RunSummaryCallback", "StagedEvaluation"]

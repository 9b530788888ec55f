"""Lightning callbacks: they decide when; library functions do the work."""

from .export import ExportCallback
from .perplexity import PerplexityCallback
from .pruning import NirvanaPruningCallback

__all__ = ["ExportCallback", "NirvanaPruningCallback", "PerplexityCallback"]

"""Lightning callbacks: they decide when; library functions do the work."""

from .perplexity import PerplexityCallback
from .pruning import NirvanaPruningCallback

__all__ = ["NirvanaPruningCallback", "PerplexityCallback"]

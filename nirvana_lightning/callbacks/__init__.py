"""Lightning callbacks: they decide when; library functions do the work."""

from .perplexity import PerplexityCallback

__all__ = ["PerplexityCallback"]

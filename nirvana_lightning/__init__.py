"""nirvana-lightning: structured pruning of LLMs (NIRVANA) and recovery in one Lightning run."""

from .callbacks import PerplexityCallback
from .data import NirvanaDataModule
from .errors import ConfigError
from .loading import load_model, load_tokenizer
from .module import NirvanaModule

__version__ = "0.1.0"

__all__ = ["ConfigError", "NirvanaDataModule", "NirvanaModule", "PerplexityCallback", "load_model", "load_tokenizer"]

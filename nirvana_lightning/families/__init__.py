"""Model families: one file each, the only code that knows Hugging Face attribute names.

Every module of this package is imported here; each :class:`~.base.ModelFamily` subclass with ``model_types``
registers itself, so adding a family is adding its file (see ``docs/extending.md``).
"""

from __future__ import annotations

import importlib
import pkgutil

from torch import nn

from ..errors import ConfigError
from .base import GRANULARITIES, ROLES, AttentionParts, MLPParts, ModelFamily, Owned, UnitKind

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("base", "remote_modeling"):
        importlib.import_module(f"{__name__}.{_module.name}")

#: model_type -> family class
FAMILIES: dict[str, type[ModelFamily]] = ModelFamily.registry


def unwrap_model(model: nn.Module) -> nn.Module:
    """The underlying transformers model of a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def auto_model_class(config) -> type:
    """``AutoModelForSeq2SeqLM`` for encoder-decoder configs (T5), ``AutoModelForCausalLM`` otherwise."""
    import transformers

    return transformers.AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) \
        else transformers.AutoModelForCausalLM


def get_family(model: nn.Module) -> ModelFamily:
    """The family spec of ``model.config.model_type``; unknown types raise listing the supported ones."""
    model = unwrap_model(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise ConfigError("model_type", model_type, sorted(FAMILIES))
    return FAMILIES[model_type](model)


__all__ = ["FAMILIES", "auto_model_class", "GRANULARITIES", "ROLES", "AttentionParts", "MLPParts", "ModelFamily", "Owned", "UnitKind",
           "get_family", "unwrap_model"]

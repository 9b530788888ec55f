"""Architecture adapters: the only code that knows Hugging Face attribute names."""

from __future__ import annotations

from torch import nn

from ..errors import ConfigError
from .base import ROLES, AttentionParts, MLPParts, ModelAdapter
from .gemma3 import Gemma3Adapter
from .llama import LlamaAdapter
from .mistral import MistralAdapter
from .qwen2 import Qwen2Adapter
from .qwen3 import Qwen3Adapter

ADAPTERS: dict[str, type[ModelAdapter]] = {
    t: cls for cls in (LlamaAdapter, MistralAdapter, Qwen2Adapter, Qwen3Adapter, Gemma3Adapter) for t in cls.model_types
}


def unwrap_model(model: nn.Module) -> nn.Module:
    """The underlying transformers model of a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model.config.model_type``; unknown types raise listing the supported ones."""
    model = unwrap_model(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise ConfigError("model_type", model_type, sorted(ADAPTERS))
    return ADAPTERS[model_type](model)


__all__ = ["ADAPTERS", "ROLES", "AttentionParts", "MLPParts", "ModelAdapter", "get_adapter", "unwrap_model"]

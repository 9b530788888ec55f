"""Qwen2 / Qwen2.5: q, k and v carry biases, which follow their rows when groups are cut."""

from .base import ModelAdapter


class Qwen2Adapter(ModelAdapter):
    model_types = ("qwen2",)

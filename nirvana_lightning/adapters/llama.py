"""Llama family (Llama 2/3.x, SmolLM2, TinyLlama): no projection biases by default."""

from .base import ModelAdapter


class LlamaAdapter(ModelAdapter):
    model_types = ("llama",)

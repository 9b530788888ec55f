"""Mistral: Llama layout with sliding-window attention (not affected by pruning)."""

from .base import ModelAdapter


class MistralAdapter(ModelAdapter):
    model_types = ("mistral",)

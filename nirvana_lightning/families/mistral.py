"""Mistral: Llama layout with sliding-window attention (not affected by pruning)."""

from .base import ModelFamily


class MistralFamily(ModelFamily):
    model_types = ("mistral",)
    tiny_models = {"tiny-mistral": {"sliding_window": 64}}
    vllm_served = True
    gguf_architectures = ("llama", "deci")

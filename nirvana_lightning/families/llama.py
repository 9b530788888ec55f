"""Llama family (Llama 2/3.x, SmolLM2, TinyLlama): no projection biases by default."""

from .base import ModelFamily


class LlamaFamily(ModelFamily):
    model_types = ("llama",)
    tiny_models = {"tiny-llama": {}}
    vllm_served = True
    gguf_architectures = ("llama", "deci")

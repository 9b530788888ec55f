"""Qwen2 / Qwen2.5: q, k and v carry biases, which follow their rows when groups are cut."""

from .base import ModelFamily


class Qwen2Family(ModelFamily):
    model_types = ("qwen2",)
    tiny_models = {"tiny-qwen2": {"attention_bias": True}}
    vllm_served = True
    gguf_architectures = ("qwen2", "deci")

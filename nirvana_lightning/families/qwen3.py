"""Qwen3: explicit head_dim (not hidden/heads) and per-head q_norm/k_norm over head_dim.

The norms act on head_dim, which pruning never changes, so they are left untouched.
"""

from .base import ModelFamily


class Qwen3Family(ModelFamily):
    model_types = ("qwen3",)
    # explicit head_dim different from hidden/heads, as in real Qwen3 checkpoints
    tiny_models = {"tiny-qwen3": {"head_dim": 32}}
    vllm_served = True
    gguf_architectures = ("qwen3", None)  # llama.cpp's per-layer graph (deci) has no q/k norms

"""Qwen3: explicit head_dim (not hidden/heads) and per-head q_norm/k_norm over head_dim.

The norms act on head_dim, which pruning never changes, so they are left untouched.
"""

from .base import ModelAdapter


class Qwen3Adapter(ModelAdapter):
    model_types = ("qwen3",)

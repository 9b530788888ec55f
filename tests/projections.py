"""The logical projections of a decoder layer (q, k, v, o, gate, up, down), for reference computations in tests.

Written from Hugging Face's module layouts, independently of the family specs the package reads: a fused
weight (Phi-3's ``qkv_proj``, ``gate_up_proj``) is split where the stock forward splits it.
"""

from __future__ import annotations

from types import SimpleNamespace

from torch import nn


class Part:
    """Rows ``[start, stop)`` of a linear: the weight, bias and gradient of one logical projection."""

    def __init__(self, linear: nn.Linear, start: int = 0, stop: int | None = None) -> None:
        self.linear, self.start = linear, start
        self.stop = linear.weight.shape[0] if stop is None else stop

    @property
    def weight(self):
        return self.linear.weight[self.start:self.stop]

    @property
    def grad(self):
        return self.linear.weight.grad[self.start:self.stop]

    @property
    def bias(self):
        return None if self.linear.bias is None else self.linear.bias[self.start:self.stop]

    @property
    def out_features(self) -> int:
        return self.stop - self.start

    @property
    def in_features(self) -> int:
        return self.linear.in_features


def projections(layer: nn.Module) -> tuple[SimpleNamespace, SimpleNamespace]:
    """``(attention, mlp)`` namespaces of :class:`Part`: ``q, k, v, o`` and ``gate, up, down``."""
    attn, mlp = layer.self_attn, layer.mlp
    if hasattr(attn, "qkv_proj"):  # Phi-3: [q | k | v] rows, q as wide as o's input
        n_q = attn.o_proj.in_features
        n_kv = (attn.qkv_proj.out_features - n_q) // 2
        a = SimpleNamespace(q=Part(attn.qkv_proj, 0, n_q), k=Part(attn.qkv_proj, n_q, n_q + n_kv),
                            v=Part(attn.qkv_proj, n_q + n_kv), o=Part(attn.o_proj))
    else:
        a = SimpleNamespace(q=Part(attn.q_proj), k=Part(attn.k_proj), v=Part(attn.v_proj), o=Part(attn.o_proj))
    if hasattr(mlp, "gate_up_proj"):  # Phi-3: [gate | up] rows, halves
        n = mlp.gate_up_proj.out_features // 2
        m = SimpleNamespace(gate=Part(mlp.gate_up_proj, 0, n), up=Part(mlp.gate_up_proj, n), down=Part(mlp.down_proj))
    else:
        m = SimpleNamespace(gate=Part(mlp.gate_proj), up=Part(mlp.up_proj), down=Part(mlp.down_proj))
    return a, m

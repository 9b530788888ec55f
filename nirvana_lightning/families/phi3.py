"""Phi-3 (Phi-3 / Phi-3.5 mini and medium, Phi-4 mini): fused ``qkv_proj`` and ``gate_up_proj``.

A unit owns slices INSIDE the fused weights (:class:`~.base.Owned` offsets): the ``qkv`` rows are
``[q (n_head * d) | k (n_kv * d) | v (n_kv * d)]``, so a KV group owns ``g * d`` q rows from 0, ``d`` k rows from
``n_head * d`` and ``d`` v rows from ``(n_head + n_kv) * d``; ``gate_up`` rows are ``[gate (n) | up (n)]``, so a
neuron owns one row from 0 and one from ``n``. The stock forward splits ``qkv`` at
``config.num_attention_heads * head_dim`` and ``gate_up`` in halves: after a cut each attention reads a config of
its own layer's widths (:meth:`Phi3Family.set_layer_widths`), and the halves stay halves.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from ..errors import check_choice
from .base import GRANULARITIES, ModelFamily, Owned, UnitKind

#: our projection roles: the two fused weights and the two output projections
PROJECTIONS = ("qkv", "o", "gate_up", "down")


class Phi3Family(ModelFamily):
    model_types = ("phi3",)
    # pad/eos inside the tiny vocabulary (the stock ids are 32000); no long-context RoPE scaling
    tiny_models = {"tiny-phi3": {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                                 "original_max_position_embeddings": 512}}
    # LoRA targets: q, k and v all name the fused qkv_proj (gate and up the fused gate_up_proj), each once
    role_names: ClassVar[dict[str, str]] = {"q": "qkv_proj", "k": "qkv_proj", "v": "qkv_proj", "o": "o_proj",
                                            "gate": "gate_up_proj", "up": "gate_up_proj", "down": "down_proj"}

    def projection(self, layer: nn.Module, role: str) -> nn.Linear:
        modules = {"qkv": layer.self_attn.qkv_proj, "o": layer.self_attn.o_proj,
                   "gate_up": layer.mlp.gate_up_proj, "down": layer.mlp.down_proj}
        return modules[check_choice("role", role, PROJECTIONS)]

    def block_linears(self):
        for i, layer in enumerate(self.layers()):
            for role in PROJECTIONS:
                yield i, role, self.projection(layer, role)

    def unit_kinds(self, layer: nn.Module, granularity: str = GRANULARITIES[0]) -> dict[str, UnitKind]:
        check_choice("target.attention_granularity", granularity, GRANULARITIES)
        d = self.head_dim
        o, qkv, down = (self.projection(layer, r) for r in ("o", "qkv", "down"))
        hidden, n_q = o.out_features, o.in_features // d
        n_kv = (qkv.out_features - n_q * d) // (2 * d)
        g, n_mlp = n_q // n_kv, down.in_features
        k_at, v_at = n_q * d, (n_q + n_kv) * d
        neuron = UnitKind("neuron", n_mlp, (Owned("gate_up", 0, 1), Owned("gate_up", 0, 1, n_mlp), Owned("down", 1, 1)),
                          3 * hidden, "mlp", "MLP neurons")
        if granularity == "group":
            group = UnitKind("kv_group", n_kv, (Owned("qkv", 0, g * d), Owned("qkv", 0, d, k_at), Owned("qkv", 0, d, v_at),
                                                Owned("o", 1, g * d)), 2 * (g + 1) * d * hidden, "attention", "KV groups")
            return {"kv_group": group, "neuron": neuron}
        group = UnitKind("kv_group", n_kv, (Owned("qkv", 0, d, k_at), Owned("qkv", 0, d, v_at)), 2 * d * hidden,
                         "attention", "KV groups")
        head = UnitKind("q_head", n_q, (Owned("qkv", 0, d), Owned("o", 1, d)), 2 * d * hidden, "attention",
                        "query heads", parent="kv_group")
        return {"kv_group": group, "q_head": head, "neuron": neuron}

    def layer_attributes(self, layer: nn.Module, n_kv_group: int, n_head: int, mlp_dim: int) -> dict:
        """The stock attention splits ``qkv`` where ``self.config.num_attention_heads`` says: every attention
        reads a config of its layer's widths (a shallow copy; the model's config is untouched)."""
        return {**super().layer_attributes(layer, n_kv_group, n_head, mlp_dim),
                "self_attn.config.num_attention_heads": n_head, "self_attn.config.num_key_value_heads": n_kv_group}

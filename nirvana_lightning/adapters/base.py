"""The adapter contract: the one place that maps Hugging Face attribute names to pruning roles."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .remote_modeling import WIDTHS_KEY


@dataclass(frozen=True)
class AttentionParts:
    """The projections of one attention block, weights stored [out, in]."""

    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear


@dataclass(frozen=True)
class MLPParts:
    """The projections of one gated MLP block."""

    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear


ROLES = ("q", "k", "v", "o", "gate", "up", "down")


class ModelAdapter:
    """Maps one model family's modules to roles and keeps module, config and tensors in agreement.

    Subclasses set ``model_types`` and the attribute names; everything outside ``adapters/``
    talks in roles (``q``, ``k``, ``v``, ``o``, ``gate``, ``up``, ``down``).
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    #: HF module attribute name for each role (used for LoRA target names and for lookup).
    role_names: ClassVar[dict[str, str]] = {
        "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
        "gate": "gate_proj", "up": "up_proj", "down": "down_proj",
    }

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config

    # ----------------------------------------------------------------- structure
    def layers(self) -> list[nn.Module]:
        """The decoder layers, in order."""
        return list(self._base_model().layers)

    def attention(self, layer: nn.Module) -> AttentionParts:
        attn = layer.self_attn
        n = self.role_names
        return AttentionParts(getattr(attn, n["q"]), getattr(attn, n["k"]), getattr(attn, n["v"]), getattr(attn, n["o"]))

    def mlp(self, layer: nn.Module) -> MLPParts:
        mlp = layer.mlp
        n = self.role_names
        return MLPParts(getattr(mlp, n["gate"]), getattr(mlp, n["up"]), getattr(mlp, n["down"]))

    def _base_model(self) -> nn.Module:
        return self.model.model

    def body(self) -> nn.Module:
        """The decoder stack without the LM head; its output has ``last_hidden_state`` (B, T, hidden)."""
        return self._base_model()

    def lm_head(self) -> nn.Linear:
        return self.model.lm_head

    # ------------------------------------------------------- hidden states -> logits
    @property
    def logit_softcap(self) -> float | None:
        """Final-logit soft-capping (Gemma 2/3: ``cap * tanh(logits / cap)``), None when the family has none."""
        return None

    def finalize_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """What the family's forward applies to ``lm_head(hidden)``: scorers and losses that apply the head
        themselves, chunk by chunk, call this so they see the model's own logits."""
        cap = self.logit_softcap
        return logits if not cap else cap * torch.tanh(logits / cap)

    @contextmanager
    def raw_logits(self) -> Iterator[None]:
        """The forward returns ``lm_head(hidden)`` unchanged (no soft-capping) inside the block."""
        yield

    def block_linears(self) -> Iterator[tuple[int, str, nn.Linear]]:
        """``(layer_index, role, module)`` for every prunable projection, layer-major, roles in ROLES order."""
        for i, layer in enumerate(self.layers()):
            attn, mlp = self.attention(layer), self.mlp(layer)
            for role in ROLES:
                yield i, role, getattr(attn if role in ("q", "k", "v", "o") else mlp, role)

    @contextmanager
    def checkpointed_layers(self) -> Iterator[None]:
        """Recompute each decoder layer's activations in backward (non-reentrant), restoring after.

        Independent of the HF ``gradient_checkpointing`` flag, which only acts in train mode.
        """
        layers = self.layers()
        # a layer may already carry an instance-level forward (accelerate hooks): put it back after
        saved = [layer.__dict__.get("forward") for layer in layers]
        for layer in layers:
            forward = layer.forward

            def run(*args, _forward=forward, **kwargs):
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

            layer.forward = run
        try:
            yield
        finally:
            for layer, previous in zip(layers, saved):
                if previous is None:
                    del layer.forward  # the class method is visible again
                else:
                    layer.forward = previous

    # ------------------------------------------------------------------ geometry
    @property
    def n_layer(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def n_head(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def n_kv_head(self) -> int:
        return int(getattr(self.config, "num_key_value_heads", None) or self.n_head)

    @property
    def head_dim(self) -> int:
        """Per-head width; read from the config when present, never assumed to be hidden/heads."""
        hd = getattr(self.config, "head_dim", None)
        return int(hd) if hd else int(self.config.hidden_size) // self.n_head

    @property
    def hidden_dim(self) -> int:
        return int(self.config.hidden_size)

    @property
    def intermediate_dim(self) -> int:
        return int(self.config.intermediate_size)

    @property
    def n_query_per_kv(self) -> int:
        """g: query heads per KV head (unchanged by pruning, which removes whole groups)."""
        return self.n_head // self.n_kv_head

    def layer_geometry(self, layer: nn.Module) -> tuple[int, int]:
        """(n_kv_group, mlp_dim) of one layer as its tensors say (layers differ after pruning)."""
        parts = self.attention(layer)
        return parts.k.weight.shape[0] // self.head_dim, self.mlp(layer).gate.weight.shape[0]

    # --------------------------------------------------------------- LoRA roles
    def lora_target_modules(self, roles: list[str] | tuple[str, ...] = ROLES) -> list[str]:
        """HF module names for the given roles, as peft's ``target_modules`` expects."""
        from ..errors import check_choice

        return [self.role_names[check_choice("recovery.lora_targets", r, ROLES)] for r in roles]

    # ------------------------------------------------------------------ surgery
    def set_layer_attention_shape(self, layer: nn.Module, n_kv_group: int) -> None:
        """Update module attributes after attention projections were sliced to ``n_kv_group`` groups."""
        attn = layer.self_attn
        g = self.n_query_per_kv
        # Stock Llama/Qwen attention in transformers 5.x infers head counts from tensor shapes in
        # forward; these attributes are kept in agreement for code that reads them.
        for name, value in (("num_heads", n_kv_group * g), ("num_key_value_heads", n_kv_group)):
            if hasattr(attn, name):
                setattr(attn, name, value)
        if hasattr(attn, "num_key_value_groups"):
            attn.num_key_value_groups = g

    #: config attribute carrying per-layer widths after pruning (stock configs have one global value)
    LAYER_WIDTHS_KEY: ClassVar[str] = WIDTHS_KEY

    def record_layer_widths(self, n_kv_group: list[int], mlp_dim: list[int]) -> None:
        """Write per-layer widths into the HF config so config and tensors agree.

        ``head_dim`` is pinned explicitly (it must never be re-derived from hidden/heads). When
        every layer has the same widths, the global fields are updated too, so a stock config
        describes the model; otherwise the globals keep the dense values and the per-layer
        lists in ``config.nirvana_layer_widths`` are authoritative.
        """
        g = self.n_query_per_kv
        self.config.head_dim = self.head_dim
        widths = {
            "num_key_value_heads": list(n_kv_group),
            "num_attention_heads": [n * g for n in n_kv_group],
            "intermediate_size": list(mlp_dim),
        }
        setattr(self.config, self.LAYER_WIDTHS_KEY, widths)
        if len(set(n_kv_group)) == 1 and len(set(mlp_dim)) == 1:
            for key, values in widths.items():
                setattr(self.config, key, values[0])

    def set_layer_mlp_shape(self, layer: nn.Module, mlp_dim: int) -> None:
        """Update module attributes after MLP projections were sliced to ``mlp_dim`` neurons."""
        if hasattr(layer.mlp, "intermediate_size"):
            layer.mlp.intermediate_size = mlp_dim

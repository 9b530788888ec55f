"""FLAP's bias compensation, for any criterion: what a removed unit contributed on average stays.

An output projection (``o_proj`` for attention groups, ``down_proj`` for MLP neurons) computes
``y = W x + b``. Removing input channels ``R`` drops ``W[:, R] x_R``; FLAP (An et al. 2024, eq. 5)
keeps its calibration mean by adding ``W[:, R] E[x_R]`` to the bias. The pruned, compensated model
therefore equals the dense model whose removed channels are replaced by their calibration means
(``tests/test_compensation.py`` checks exactly that).

Families without those biases get them: the config's ``attention_bias`` / ``mlp_bias`` are switched on,
so stock transformers (and vLLM) rebuild q/k/v/o and gate/up/down with biases; the ones that were not
there are zeros. Only families whose config has both switches can hold them (Llama); the others are
refused. GGUF export refuses MLP biases, so a compensated model is served through vLLM or
transformers, not llama.cpp.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..families import FAMILIES, get_family, unwrap_model
from .gradients import input_statistics
from .plan import PruningPlan
from .surgery import kept_inputs


def _with_bias(linear: nn.Linear) -> None:
    if linear.bias is None:
        w = linear.weight
        linear.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device),
                                   requires_grad=w.requires_grad)


def bias_deltas(model: nn.Module, plan: PruningPlan, calibration: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Before cutting ``plan``: per layer, ``W[:, R] E[x_R]`` for o_proj and down_proj (``{"o": ..., "down": ...}``).

    Args:
        model: the model the plan was made for (not cut yet; not modified).
        plan: the plan about to be applied.
        calibration: ``(B, T)`` token batches whose input means are used (the scoring calibration).
    """
    model = unwrap_model(model)
    family = get_family(model)
    check_family(model)
    stats = input_statistics(model, family, calibration)
    out = []
    with torch.no_grad():
        for i, layer in enumerate(family.layers()):
            kept = kept_inputs(family, layer, plan, i)
            deltas = {}
            for role in ("o", "down"):
                lin = family.projection(layer, role)
                cols = (~kept[role]).nonzero().flatten() if role in kept else torch.zeros(0, dtype=torch.long)
                w = lin.weight.detach()
                if cols.numel() == 0:
                    deltas[role] = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
                    continue
                count, total, _ = stats[id(lin)]
                mean = (total / count)[cols.to(total.device)].to(w.device).double()
                deltas[role] = w[:, cols.to(w.device)].double() @ mean
            out.append(deltas)
    return out


def check_family(model_or_config) -> None:
    """Refuse bias compensation for a family whose config cannot hold the biases (a model or its config)."""
    config = getattr(unwrap_model(model_or_config), "config", model_or_config)
    family = FAMILIES.get(config.model_type)
    if family is not None and not family.carries_output_biases(config):  # unknown types: get_family lists the known
        raise ConfigError("bias_compensation", True, f"false for model_type {config.model_type!r}: its config cannot "
                          "hold biases of the output projections (o, down), so stock transformers could not reload "
                          "the model (llama can)")


def add_biases(model: nn.Module, deltas: list[dict[str, torch.Tensor]] | None) -> dict[str, float]:
    """After the cut: give every q/k/v/o and gate/up/down a bias (zeros where there was none), add the deltas to
    o_proj / down_proj and switch the config's ``attention_bias`` / ``mlp_bias`` on.

    ``deltas`` None: zeros only (a meta model, or a resumed model whose biases come from the checkpoint).
    Returns ``{"max_abs_bias", "layers"}`` for the plan's provenance.
    """
    model = unwrap_model(model)
    family = get_family(model)
    check_family(model)
    largest = 0.0
    with torch.no_grad():
        for i, layer in enumerate(family.layers()):
            attn, mlp = family.attention(layer), family.mlp(layer)
            for lin in (attn.q, attn.k, attn.v, attn.o, mlp.gate, mlp.up, mlp.down):
                _with_bias(lin)
            if deltas is None:
                continue
            for role, lin in (("o", attn.o), ("down", mlp.down)):
                lin.bias += deltas[i][role].to(lin.bias.device, lin.bias.dtype)
                largest = max(largest, float(deltas[i][role].abs().max()))
    family.enable_output_biases(model.config)
    return {"max_abs_bias": largest, "layers": len(family.layers())}

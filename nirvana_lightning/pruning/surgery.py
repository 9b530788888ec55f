"""Slicing weights by a plan, and the equivalent masking (no copy) used to check it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..adapters import get_adapter, unwrap_model
from .plan import PruningPlan


def _describe(identity: dict) -> str:
    return (f"{identity.get('model_type')} ({identity.get('n_layer')} layers, hidden {identity.get('hidden_size')}, "
            f"vocab {identity.get('vocab_size')}, parameter fingerprint {identity.get('fingerprint')})")


def check_plan_matches(model: nn.Module, plan: PruningPlan) -> None:
    """Raise (naming the layer) unless the plan was made for the model's current shapes."""
    plan.validate()
    adapter = get_adapter(model)
    wanted = plan.provenance.get("model_identity")
    if wanted:  # plans written before identities were recorded carry none; their shapes are still checked
        from .api import model_identity

        have = model_identity(model)
        if have != wanted:
            raise ValueError(
                f"this plan was made for another model: {_describe(wanted)}; it is being applied to "
                f"{_describe(have)} (a plan cuts only the model, with the same parameter names and shapes, it was "
                "made for)")
    layers = adapter.layers()
    if len(layers) != plan.n_layer:
        raise ValueError(f"plan has {plan.n_layer} layers, the model {len(layers)}")
    if plan.head_dim != adapter.head_dim or plan.n_query_per_kv != adapter.n_query_per_kv:
        raise ValueError(f"plan head_dim={plan.head_dim}, g={plan.n_query_per_kv}; model head_dim={adapter.head_dim}, "
                         f"g={adapter.n_query_per_kv}")
    for i, layer in enumerate(layers):
        n_kv_group, mlp_dim = adapter.layer_geometry(layer)
        if (n_kv_group, mlp_dim) != (plan.n_kv_group_before[i], plan.mlp_dim_before[i]):
            raise ValueError(f"plan layer {i} expects {plan.n_kv_group_before[i]} KV groups and "
                             f"{plan.mlp_dim_before[i]} MLP neurons; the model has {n_kv_group} and {mlp_dim}")


def _slice_linear_(linear: nn.Linear, index: torch.Tensor, dim: int) -> None:
    """Keep ``index`` along ``dim`` of the weight (0 = output rows, with the bias; 1 = input columns)."""
    index = index.to(linear.weight.device)
    weight = linear.weight.detach().index_select(dim, index).clone()
    linear.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    if dim == 0:
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.detach().index_select(0, index).clone(),
                                       requires_grad=linear.bias.requires_grad)
        linear.out_features = weight.shape[0]
    else:
        linear.in_features = weight.shape[1]


def expand_group_index(groups: list[int] | torch.Tensor, block: int) -> torch.Tensor:
    """Row indices of whole blocks: groups [0, 2], block 3 -> [0, 1, 2, 6, 7, 8]."""
    groups = torch.as_tensor(groups, dtype=torch.long)
    return (groups[:, None] * block + torch.arange(block)).reshape(-1)


def cut_model(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """Physically remove the units the plan does not keep (in place); returns the model.

    Everything is checked before the first tensor changes, so a mismatched plan leaves the
    model untouched. head_dim never changes, so RoPE and per-head norms are unaffected.
    """
    model_ = unwrap_model(model)
    check_plan_matches(model_, plan)
    adapter = get_adapter(model_)
    g, d = plan.n_query_per_kv, plan.head_dim
    for i, layer in enumerate(adapter.layers()):
        attn, mlp = adapter.attention(layer), adapter.mlp(layer)
        if plan.n_kv_group_after[i] != plan.n_kv_group_before[i]:
            q_rows = expand_group_index(plan.attention_keep[i], g * d)
            kv_rows = expand_group_index(plan.attention_keep[i], d)
            _slice_linear_(attn.q, q_rows, 0)
            _slice_linear_(attn.k, kv_rows, 0)
            _slice_linear_(attn.v, kv_rows, 0)
            _slice_linear_(attn.o, q_rows, 1)
            adapter.set_layer_attention_shape(layer, plan.n_kv_group_after[i])
        if plan.mlp_dim_after[i] != plan.mlp_dim_before[i]:
            keep = torch.as_tensor(plan.mlp_keep[i], dtype=torch.long)
            _slice_linear_(mlp.gate, keep, 0)
            _slice_linear_(mlp.up, keep, 0)
            _slice_linear_(mlp.down, keep, 1)
            adapter.set_layer_mlp_shape(layer, plan.mlp_dim_after[i])
    adapter.record_layer_widths(plan.n_kv_group_after, plan.mlp_dim_after)
    return model


@contextmanager
def masked_units(model: nn.Module, plan: PruningPlan) -> Iterator[None]:
    """Make the model compute as if the plan were applied, without changing any weight.

    Removing a KV group removes its g query heads; each head's attention is independent, so
    zeroing the inputs of o_proj for those heads is exact. Removing a neuron is zeroing the
    input of down_proj at that index. Hooks are removed on exit.
    """
    model_ = unwrap_model(model)
    check_plan_matches(model_, plan)
    adapter = get_adapter(model_)
    g, d = plan.n_query_per_kv, plan.head_dim
    handles = []

    def gate(mask: torch.Tensor):
        def pre_hook(_module, args):
            x = args[0]
            return (x * mask.to(device=x.device, dtype=x.dtype), *args[1:])
        return pre_hook

    try:
        for i, layer in enumerate(adapter.layers()):
            attn, mlp = adapter.attention(layer), adapter.mlp(layer)
            attn_mask = torch.zeros(plan.n_kv_group_before[i] * g * d)
            attn_mask[expand_group_index(plan.attention_keep[i], g * d)] = 1
            mlp_mask = torch.zeros(plan.mlp_dim_before[i])
            mlp_mask[torch.as_tensor(plan.mlp_keep[i], dtype=torch.long)] = 1
            handles.append(attn.o.register_forward_pre_hook(gate(attn_mask)))
            handles.append(mlp.down.register_forward_pre_hook(gate(mlp_mask)))
        yield
    finally:
        for h in handles:
            h.remove()

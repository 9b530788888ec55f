"""Slicing weights by a plan, and the equivalent masking (no copy) used to check it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..families import ModelFamily, get_family, unwrap_model
from .plan import PruningPlan


def _describe(identity: dict) -> str:
    return (f"{identity.get('model_type')} ({identity.get('n_layer')} layers, hidden {identity.get('hidden_size')}, "
            f"vocab {identity.get('vocab_size')}, parameter fingerprint {identity.get('fingerprint')})")


def model_identity(model: nn.Module) -> dict:
    """What a plan is made for: model_type, sizes, and a fingerprint of every parameter's name and shape.

    The fingerprint ignores values and dtype, so a plan applies to the same architecture in another
    precision or after fine-tuning, and to nothing else.
    """
    import hashlib

    model = unwrap_model(model)
    config = model.config
    spec = ";".join(f"{n}:{tuple(p.shape)}" for n, p in sorted(model.named_parameters()))
    return {"model_type": config.model_type, "hidden_size": int(config.hidden_size),
            "vocab_size": int(config.vocab_size), "n_layer": int(config.num_hidden_layers),
            "fingerprint": hashlib.sha256(spec.encode()).hexdigest()[:16]}


def check_plan_matches(model: nn.Module, plan: PruningPlan, family: ModelFamily | None = None) -> None:
    """Raise (naming the layer) unless the plan was made for the model's current shapes."""
    plan.validate()
    family = family or get_family(model)
    wanted = plan.provenance.get("model_identity")
    if wanted:  # plans written before identities were recorded carry none; their shapes are still checked
        have = model_identity(model)
        if have != wanted:
            raise ValueError(
                f"this plan was made for another model: {_describe(wanted)}; it is being applied to "
                f"{_describe(have)} (a plan cuts only the model, with the same parameter names and shapes, it was "
                "made for)")
    layers = family.layers()
    if len(layers) != plan.n_layer:
        raise ValueError(f"plan has {plan.n_layer} layers, the model {len(layers)}")
    if plan.head_dim != family.head_dim:
        raise ValueError(f"plan head_dim={plan.head_dim}; model head_dim={family.head_dim}")
    per_layer = [family.unit_kinds(layer, plan.granularity) for layer in layers]
    model_kinds = {name for kinds in per_layer for name in kinds}  # a kind some layers lack: width 0 there
    if set(plan.keep) != model_kinds:
        raise ValueError(f"plan has unit kinds {sorted(plan.keep)}; the model's are {sorted(model_kinds)}")

    def units(widths: dict[str, int], heads: int) -> str:
        return ", ".join(f"{n} {_UNIT_NAMES.get(k, k)}" for k, n in widths.items()) + f", {heads} query heads"

    for i, (layer, kinds) in enumerate(zip(layers, per_layer)):
        have = {name: kinds[name].n_units if name in kinds else 0 for name in plan.keep}
        want = {name: plan.width_before[name][i] for name in plan.keep}
        heads = family.layer_widths(layer)[1]
        if have != want or heads != plan.n_head_before[i]:
            raise ValueError(f"plan layer {i} expects {units(want, plan.n_head_before[i])}; the model has "
                             f"{units(have, heads)}")
        # unit costs are the family's declaration, recomputed: an edited cost would falsify every sparsity
        cost = {name: kinds[name].cost if name in kinds else 0 for name in plan.keep}
        written = {name: plan.unit_cost[name][i] for name in plan.keep}
        if cost != written:
            raise ValueError(f"plan layer {i}: unit_cost {written} differs from the family's cost per unit {cost} "
                             "(plan.json was edited, or made by another version; every reported sparsity would "
                             "be wrong)")


#: how errors name the unit kinds
_UNIT_NAMES = {"self_attn": "self-attention KV groups", "q_head": "query-head units", "cross_attn": "cross-attention heads",
               "mlp": "MLP neurons"}


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


def _owned_keeps(family, layer, plan: PruningPlan, i: int) -> list[tuple[str, int, torch.Tensor]]:
    """``(role, axis, kept indices)`` for every slice the plan's unit kinds own in layer ``i`` (a kind that keeps
    every unit is left out)."""
    out = []
    for name, kind in family.unit_kinds(layer, plan.granularity).items():
        keep = plan.keep[name][i]
        if len(keep) == kind.n_units:
            continue
        for owned in kind.owns:
            out.append((owned.role, owned.axis, expand_group_index(keep, owned.block)))
    return out


def cut_model(model: nn.Module, plan: PruningPlan, family: ModelFamily | None = None) -> nn.Module:
    """Physically remove the units the plan does not keep (in place); returns the model.

    Every slice comes from the family's unit kinds (which rows or columns of which projection a unit owns).
    Everything is checked before the first tensor changes, so a mismatched plan leaves the
    model untouched. head_dim never changes, so RoPE and per-head norms are unaffected.
    """
    model_ = unwrap_model(model)
    family = family or get_family(model_)
    check_plan_matches(model_, plan, family)
    for i, (layer, widths) in enumerate(zip(family.layers(), plan.widths_after())):
        for role, axis, index in _owned_keeps(family, layer, plan, i):
            _slice_linear_(family.projection(layer, role), index, axis)
        family.after_cut(layer, {name: plan.keep[name][i] for name in family.unit_kinds(layer, plan.granularity)})
        family.set_layer_widths(layer, *widths)
    family.record_layer_widths(plan.widths_after())
    return model


def kept_inputs(family, layer, plan: PruningPlan, i: int) -> dict[str, torch.Tensor]:
    """Per output projection a unit kind feeds (``o``, ``down``), the boolean mask of the input columns that
    survive layer ``i``'s cut: a column goes with any unit that owns it."""
    masks: dict[str, torch.Tensor] = {}
    for name, kind in family.unit_kinds(layer, plan.granularity).items():
        owned = kind.gate
        if owned is None:
            continue
        mask = masks.setdefault(owned.role, torch.ones(family.projection(layer, owned.role).in_features,
                                                       dtype=torch.bool))
        unit = torch.zeros(kind.n_units, dtype=torch.bool)
        unit[torch.as_tensor(plan.keep[name][i], dtype=torch.long)] = True
        mask &= unit.repeat_interleave(owned.block)
    return masks


@contextmanager
def masked_units(model: nn.Module, plan: PruningPlan) -> Iterator[None]:
    """Make the model compute as if the plan were applied, without changing any weight.

    Each unit kind with an output projection (a KV group's or a query head's o columns, a neuron's down
    column) is masked by zeroing that projection's inputs at the columns of removed units. Every head's
    attention is independent, so this is exact; a KV group goes only with all its heads. Hooks are removed
    on exit.
    """
    model_ = unwrap_model(model)
    family = get_family(model_)
    check_plan_matches(model_, plan, family)
    handles = []

    def gate(mask: torch.Tensor):
        def pre_hook(_module, args):
            x = args[0]
            return (x * mask.to(device=x.device, dtype=x.dtype), *args[1:])
        return pre_hook

    try:
        for i, layer in enumerate(family.layers()):
            for role, kept in kept_inputs(family, layer, plan, i).items():
                handles.append(family.projection(layer, role).register_forward_pre_hook(gate(kept.float())))
        yield
    finally:
        for h in handles:
            h.remove()

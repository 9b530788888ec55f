"""Slicing weights by a plan, and the equivalent masking (no copy) used to check it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..families import ModelFamily, Owned, get_family, unwrap_model
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

    labels = {name: kind.label for kinds in per_layer for name, kind in kinds.items()}

    def units(widths: dict[str, int], heads: int) -> str:
        return ", ".join(f"{n} {labels.get(k, k)}" for k, n in widths.items()) + f", {heads} query heads"

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
        # labels are for reports (a converted 0.2 plan carries the old ones); roles and nesting must agree
        roles = {name: (kind.allocation, kind.parent) for name, kind in kinds.items()}
        written = {name: (plan.kinds[name]["allocation"], plan.kinds[name]["parent"]) for name in roles}
        if roles != written:
            raise ValueError(f"plan layer {i}: unit kinds (allocation, parent) {written} differ from the family's "
                             f"{roles}")


def _slice_(module: nn.Module, index: torch.Tensor, dim: int) -> None:
    """Keep ``index`` along ``dim`` of a projection's weight (0 = output rows, with the bias; 1 = input columns), or
    of a norm's 1-D weight (its entries)."""
    index = index.to(module.weight.device)
    weight = module.weight.detach().index_select(dim, index).clone()
    module.weight = nn.Parameter(weight, requires_grad=module.weight.requires_grad)
    if weight.dim() == 1:
        if hasattr(module, "normalized_shape"):
            module.normalized_shape = (weight.shape[0],)
        return
    if dim == 0:
        if getattr(module, "bias", None) is not None:
            module.bias = nn.Parameter(module.bias.detach().index_select(0, index).clone(),
                                       requires_grad=module.bias.requires_grad)
        module.out_features = weight.shape[0]
    else:
        module.in_features = weight.shape[1]


def expand_group_index(groups: list[int] | torch.Tensor, block: int) -> torch.Tensor:
    """Row indices of whole blocks: groups [0, 2], block 3 -> [0, 1, 2, 6, 7, 8]."""
    return Owned("", 0, block).index(groups)


def kept_slices(family: ModelFamily, layer: nn.Module, keep: dict[str, list[int]],
                granularity: str) -> dict[tuple[str, int], torch.Tensor]:
    """Per ``(projection role, axis)`` the indices a layer keeps: every index a removed unit owns goes, the rest
    stays (rows or columns no kind owns, e.g. a fused weight's unowned part, are kept). Projections no kind cuts
    are left out."""
    gone: dict[tuple[str, int], list[torch.Tensor]] = {}
    for name, kind in family.unit_kinds(layer, granularity).items():
        dropped = sorted(set(range(kind.n_units)) - set(keep[name]))
        if not dropped:
            continue
        for owned in kind.owns:
            gone.setdefault((owned.role, owned.axis), []).append(owned.index(dropped))
    out = {}
    for (role, axis), parts in gone.items():
        size = family.projection(layer, role).weight.shape[axis]
        mask = torch.ones(size, dtype=torch.bool)
        mask[torch.cat(parts)] = False
        out[(role, axis)] = mask.nonzero().squeeze(1)
    return out


def cut_model(model: nn.Module, plan: PruningPlan, family: ModelFamily | None = None) -> nn.Module:
    """Physically remove the units the plan does not keep (in place); returns the model.

    Every slice comes from the family's unit kinds (which rows or columns of which projection a unit owns, at
    which offset inside a fused weight). Everything is checked before the first tensor changes, so a mismatched
    plan leaves the model untouched. head_dim never changes, so RoPE and per-head norms are unaffected.
    """
    model_ = unwrap_model(model)
    family = family or get_family(model_)
    check_plan_matches(model_, plan, family)
    for i, layer in enumerate(family.layers()):
        keep = _layer_keep(family, layer, plan, i)
        for (role, axis), index in kept_slices(family, layer, keep, plan.granularity).items():
            _slice_(family.projection(layer, role), index, axis)
        family.after_cut(layer, keep)
    family.record_layer_widths()
    return model


def _layer_keep(family, layer, plan: PruningPlan, i: int) -> dict[str, list[int]]:
    """Layer ``i``'s kept units per kind the layer has."""
    return {name: plan.keep[name][i] for name in family.unit_kinds(layer, plan.granularity)}


def _gate_masks(family, layer, slices: dict[tuple[str, int], torch.Tensor],
                granularity: str) -> dict[str, torch.Tensor]:
    """The boolean input-column masks of the output projections the layer's unit kinds feed (``o``, ``down``),
    from the layer's kept slices (:func:`kept_slices`); all true where nothing is cut."""
    masks: dict[str, torch.Tensor] = {}
    for kind in family.unit_kinds(layer, granularity).values():
        owned = kind.gate
        if owned is None or owned.role in masks:
            continue
        index = slices.get((owned.role, 1))
        size = family.projection(layer, owned.role).weight.shape[1]
        mask = torch.ones(size, dtype=torch.bool) if index is None else torch.zeros(size, dtype=torch.bool)
        if index is not None:
            mask[index] = True
        masks[owned.role] = mask
    return masks


def kept_inputs(family, layer, plan: PruningPlan, i: int) -> dict[str, torch.Tensor]:
    """Per output projection a unit kind feeds (``o``, ``down``), the boolean mask of the input columns that
    survive layer ``i``'s cut: a column goes with any unit that owns it."""
    slices = kept_slices(family, layer, _layer_keep(family, layer, plan, i), plan.granularity)
    return _gate_masks(family, layer, slices, plan.granularity)


@contextmanager
def masked_units(model: nn.Module, plan: PruningPlan) -> Iterator[None]:
    """Make the model compute as if the plan were applied, without changing any weight.

    Each unit kind with an output projection (a KV group's or a query head's o columns, a neuron's down
    column) is masked by zeroing that projection's inputs at the columns of removed units. Every head's
    attention is independent, so this is exact; a KV group goes only with all its heads. A family whose modules
    mix units (OLMo-2's q/k norms over the full width) adds its own hooks (``masking_hooks``). Hooks are removed
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
            slices = kept_slices(family, layer, _layer_keep(family, layer, plan, i), plan.granularity)
            for role, kept in _gate_masks(family, layer, slices, plan.granularity).items():
                handles.append(family.projection(layer, role).register_forward_pre_hook(gate(kept.float())))
            handles += family.masking_hooks(layer, slices)
        yield
    finally:
        for h in handles:
            h.remove()

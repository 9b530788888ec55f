"""Pure allocation (docs/method.md section 3): unit scores in, sorted keep indices out.

Attention units are ranked only against attention units, neurons only against neurons. With
``c_a = 2(g+1)d`` and ``c_m = 3`` weight vectors (of length hidden) per attention unit and per
neuron, removing a fraction ``p_attn`` of the prunable attention units and ``gamma * p_attn`` of the
prunable neurons removes a fraction ``s`` of all block weights when

    p_attn = s (c_a N_a + c_m N_m) / (c_a N_a' + gamma c_m N_m')

where N are all current units and N' the prunable ones (layers not skipped). For a dense model
with nothing skipped this is docs/method.md's ``p_attn = s (A + M) / (A + gamma M)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch

from ..errors import ConfigError
from .settings import MODES, ROUND_TO_CHOICES, PruningTarget

_DEFAULT = PruningTarget()  # the defaults below are the typed settings' own


@dataclass(frozen=True)
class Allocation:
    """Keep indices per layer (sorted ascending) plus what the formula asked for."""

    attention_keep: list[torch.Tensor]  # per layer (n_kv_group_kept,) int64
    mlp_keep: list[torch.Tensor]  # per layer (mlp_dim_kept,) int64
    p_attn: float
    p_mlp: float
    n_attn_requested: int
    n_mlp_requested: int
    q_head_keep: list[torch.Tensor] | None = None  # per layer (n_head_kept,) int64, query_head granularity only
    #: allocation roles that take no share of the target because no unit of theirs is removable, with why
    unpruned: dict[str, str] = dataclasses.field(default_factory=dict)


def validate_targets(sparsity: float, gamma: float, round_to: int, mode: str = _DEFAULT.allocation) -> None:
    """Check target settings; raises :class:`ConfigError` naming the key."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0 \
            or math.isnan(sparsity):
        raise ConfigError("target.sparsity", sparsity, "a fraction in [0, 1)")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > 0 or math.isinf(gamma):
        raise ConfigError("target.gamma", gamma, "a finite number > 0 (1 gives uniform fractions)")
    if round_to not in ROUND_TO_CHOICES:
        raise ConfigError("target.round_to", round_to, ROUND_TO_CHOICES)
    if mode not in MODES:
        raise ConfigError("target.allocation", mode, MODES)


def compute_prune_fractions(
    sparsity: float, gamma: float, attn_cost: float, mlp_cost: float,
    n_attn: int, n_mlp: int, n_attn_prunable: int, n_mlp_prunable: int,
) -> tuple[float, float]:
    """``(p_attn, p_mlp)``: fractions of the prunable units of each type to remove.

    Raises:
        ConfigError: when the target cannot be met (a fraction above 1).
    """
    p_attn, p_mlp = _exact_prune_fractions(sparsity, gamma, attn_cost * n_attn + mlp_cost * n_mlp,
                                           attn_cost * n_attn_prunable, mlp_cost * n_mlp_prunable)
    return float(p_attn), float(p_mlp)


def _decimal(x: float) -> Fraction:
    """The number the user wrote (0.35 is 7/20, not the binary float just below it)."""
    return Fraction(repr(float(x)))


def _exact_prune_fractions(sparsity: float, gamma: float, total: int, attn_prunable: int,
                           mlp_prunable: int) -> tuple[Fraction, Fraction]:
    """``(p_attn, p_mlp)`` in exact rational arithmetic (so floors never lose a unit), from weight totals:
    ``total`` block weights, of which ``attn_prunable`` / ``mlp_prunable`` are owned by prunable attention units
    and neurons: ``p_attn = s * total / (attn_prunable + gamma * mlp_prunable)``, ``p_mlp = gamma * p_attn``."""
    s, g = _decimal(sparsity), _decimal(gamma)
    prunable = attn_prunable + g * mlp_prunable
    if s == 0:
        return Fraction(0), Fraction(0)
    if prunable == 0:
        raise ConfigError("target.sparsity", sparsity, "0 when every layer is skipped")
    p_attn = s * total / prunable
    p_mlp = g * p_attn
    if p_mlp > 1 or p_attn > 1:
        worst = "MLP neurons" if p_mlp >= p_attn else "attention units"
        raise ConfigError(
            "sparsity", sparsity,
            f"a feasible target: with gamma={gamma} it asks to remove {float(max(p_mlp, p_attn)):.1%} of the "
            f"prunable {worst}; lower sparsity or move gamma toward {'1' if gamma > 1 else 'a larger value'}",
        )
    return p_attn, p_mlp


@dataclass(frozen=True)
class UnitCosts:
    """Block weights per attention unit and per neuron, per layer, and the block weights no unit owns directly
    (the k/v rows of KV groups when query heads are the attention units; they go with a group's last head)."""

    attention: list  # int or Fraction per layer
    mlp: list
    fixed: int = 0

    @classmethod
    def of_query_heads(cls, head_costs: Sequence[int], group_costs: Sequence[int], heads_per_group: Sequence[int],
                       mlp_costs: Sequence[int]) -> UnitCosts:
        """Query heads as the attention units: a head's own q rows and o columns plus its share of its group's k/v
        rows (``group_cost / g``), which go with the group's last head; exact when whole groups go (and for plain
        multi-head attention), an overestimate of 1/g per head removed from a group that stays."""
        return cls([h + Fraction(c, g) for h, c, g in zip(head_costs, group_costs, heads_per_group)], list(mlp_costs))

    @classmethod
    def of_groups(cls, n_layer: int, n_query_per_kv: int, head_dim: int) -> UnitCosts:
        """KV groups (``2(g+1)d`` weight vectors) and neurons (3), in units of one hidden-sized vector."""
        return cls([2 * (n_query_per_kv + 1) * head_dim] * n_layer, [3] * n_layer)

    def fractions(self, sparsity: float, gamma: float, n_attn: Sequence[int], n_mlp: Sequence[int],
                  skip: set[int], unpruned: Sequence[str] = ()) -> tuple[Fraction, Fraction]:
        """``(p_attn, p_mlp)``; a role in ``unpruned`` (``attention`` / ``mlp``: none of its units is removable)
        takes no share: the whole target goes to the other role and gamma does not apply."""
        total = self.fixed + sum(a * c for a, c in zip(n_attn, self.attention)) + sum(
            m * c for m, c in zip(n_mlp, self.mlp))
        attn = sum(a * c for i, (a, c) in enumerate(zip(n_attn, self.attention)) if i not in skip)
        mlp = sum(m * c for i, (m, c) in enumerate(zip(n_mlp, self.mlp)) if i not in skip)
        if "attention" in unpruned:
            return Fraction(0), _exact_prune_fractions(sparsity, 1.0, total, 0, mlp)[1]
        if "mlp" in unpruned:
            return _exact_prune_fractions(sparsity, 1.0, total, attn, 0)[0], Fraction(0)
        return _exact_prune_fractions(sparsity, gamma, total, attn, mlp)


def _stable_order(scores: torch.Tensor) -> torch.Tensor:
    """Ascending order; ties keep index order (deterministic, never a threshold comparison)."""
    return torch.sort(scores.double(), stable=True).indices


def _select_lowest(scores: list[torch.Tensor], protected: list[torch.Tensor], n_remove: int,
                   kind: str) -> list[torch.Tensor]:
    """Boolean remove-masks per layer: the ``n_remove`` globally lowest unprotected units."""
    flat = torch.cat([s.double() for s in scores]) if scores else torch.zeros(0, dtype=torch.float64)
    blocked = torch.cat(protected) if protected else torch.zeros(0, dtype=torch.bool)
    candidates = (~blocked).nonzero().squeeze(1)
    if n_remove > candidates.numel():
        raise ConfigError("target.sparsity", f"a target removing {n_remove} {kind}",
                          f"at most {candidates.numel()} removable {kind} (the guards keep the rest)")
    order = candidates[_stable_order(flat[candidates])]
    remove = torch.zeros_like(blocked)
    remove[order[:n_remove]] = True
    return list(remove.split([s.numel() for s in scores]))


def _blame_guard(n_remove: int, protected: list[torch.Tensor], scores: list[torch.Tensor], skip: set[int],
                 key: str, value: int, kind: str, layer_of: Sequence[int] | None = None) -> None:
    """When a guard setting (round_to, tp_size), not the sparsity, makes the target unreachable, name that setting.
    ``layer_of``: the layer of each entry of ``scores`` (several attention blocks per layer), default the index."""
    removable = sum(int((~p).sum()) for p in protected)
    without_guard = sum(s.numel() - 1 for i, s in enumerate(scores) if i not in skip)
    if removable < n_remove <= without_guard:
        narrow = min((s.numel(), layer_of[i] if layer_of else i) for i, s in enumerate(scores) if i not in skip)
        raise ConfigError(key, value, f"a smaller value: it keeps at least {value} {kind} in every layer (the "
                                      f"narrowest has {narrow[0]}, layer {narrow[1]}), leaving {removable} removable "
                                      f"where the sparsity target needs {n_remove}")


def _protect_top(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Mask of the ``n_keep`` highest-scoring units (ties: lower index wins)."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    if n_keep > 0:
        # descending by score with ties to the lower index: sort the negated scores stably
        mask[torch.sort(-scores.double(), stable=True).indices[:n_keep]] = True
    return mask


def _round_up_keep(scores: torch.Tensor, remove: torch.Tensor, round_to: int) -> torch.Tensor:
    """Keep indices after rounding the kept count up to a multiple of ``round_to`` (capped at the width).

    The spared units are the highest-scoring among those selected for removal.
    """
    width = scores.numel()
    n_keep = int((~remove).sum())
    n_keep = min(width, math.ceil(n_keep / round_to) * round_to)
    keep = _protect_top(torch.where(remove, scores.double(), math.inf), n_keep)
    return keep.nonzero().squeeze(1)


def removal_counts(
    n_kv_group: Sequence[int],
    mlp_dim: Sequence[int],
    *,
    sparsity: float,
    gamma: float,
    n_query_per_kv: int,
    head_dim: int,
    skip_layers: Sequence[int] = (),
    costs: UnitCosts | None = None,
) -> tuple[int, int]:
    """How many attention units and MLP neurons global allocation removes from a model of these widths.

    The same exact-rational formula and floors as :func:`allocate`, without scores: iterative
    schedules use it on the DENSE widths to know how many units must be gone after each step.
    ``n_kv_group`` are the attention units per layer (query heads when ``costs`` says so).
    """
    skip = set(skip_layers)
    costs = costs or UnitCosts.of_groups(len(n_kv_group), n_query_per_kv, head_dim)
    # a layer keeps at least one attention unit: with one per layer, attention takes no share (as in allocate)
    unpruned = ["attention"] if all(a <= 1 for i, a in enumerate(n_kv_group) if i not in skip) else []
    p_attn, p_mlp = costs.fractions(sparsity, gamma, n_kv_group, mlp_dim, skip, unpruned)
    n_attn_prunable = sum(a for i, a in enumerate(n_kv_group) if i not in skip)
    n_mlp_prunable = sum(m for i, m in enumerate(mlp_dim) if i not in skip)
    return math.floor(n_attn_prunable * p_attn), math.floor(n_mlp_prunable * p_mlp)


def _protect_best_heads(scores: torch.Tensor, g: int, n_group: int) -> torch.Tensor:
    """Mask of the best query head of each of the ``n_group`` best KV groups (group score: the sum of its heads)."""
    per_group = scores.reshape(-1, g)
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    for grp in _protect_top(per_group.sum(1), n_group).nonzero().squeeze(1).tolist():
        mask[grp * g + int(_protect_top(per_group[grp], 1).nonzero()[0])] = True
    return mask


def _layout_heads(scores: torch.Tensor, remove: torch.Tensor, g: int, tp_size: int,
                  carry: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Turn a layer's selected query heads into a layout stock kernels run: ``(kept groups, kept heads, carry)``.

    A KV group all of whose heads were selected goes whole (its k/v rows too); the kept group count is rounded
    up to a multiple of ``tp_size`` (sparing the best-scoring removed groups). The kept groups lose the same
    number of heads each, ``k = floor((selected + carry - g * groups gone) / groups kept)`` (at most ``g - 1``),
    each keeping its best ``g - k``. ``carry`` is what earlier layers removed short of (or beyond) their
    selection, so the model as a whole loses as many heads as were selected, give or take one layer's rounding.
    """
    per_group = scores.double().reshape(-1, g)
    selected = remove.reshape(-1, g)
    gone = selected.all(1)
    n_group = per_group.shape[0]
    n_keep = min(n_group, math.ceil(int((~gone).sum()) / tp_size) * tp_size)
    kept = _protect_top(torch.where(gone, per_group.sum(1), math.inf), n_keep)
    want = int(selected.sum()) + carry
    k = max(0, min(g - 1, (want - g * (n_group - n_keep)) // n_keep))
    groups = kept.nonzero().squeeze(1)
    heads = torch.cat([_protect_top(per_group[grp], g - k).nonzero().squeeze(1) + grp * g
                       for grp in groups.tolist()])
    return groups, heads, want - g * (n_group - n_keep) - k * n_keep


def _count_by_weight(scores: list[torch.Tensor], protected: list[torch.Tensor], costs: Sequence,
                     target: Fraction) -> int:
    """How many of the lowest-scored unprotected units (the order :func:`_select_lowest` removes them in) fit in
    ``target`` block weights when units of different layers cost different amounts."""
    flat = torch.cat([s.double() for s in scores])
    unit_cost = torch.cat([torch.full((s.numel(),), float(c), dtype=torch.float64) for s, c in zip(scores, costs)])
    candidates = (~torch.cat(protected)).nonzero().squeeze(1)
    order = candidates[_stable_order(flat[candidates])]
    return int((unit_cost[order].cumsum(0) <= float(target) * (1 + 1e-12)).sum())


def allocate(
    attention_scores: Sequence[torch.Tensor],
    mlp_scores: Sequence[torch.Tensor],
    *,
    sparsity: float,
    gamma: float = _DEFAULT.gamma,
    n_query_per_kv: int,
    head_dim: int,
    round_to: int = _DEFAULT.round_to,
    skip_layers: Sequence[int] = (),
    mode: str = _DEFAULT.allocation,
    counts: tuple[int, int] | None = None,
    tp_size: int = _DEFAULT.tp_size,
    costs: UnitCosts | None = None,
    heads_per_group: Sequence[int] | None = None,
    attention_layers: Sequence[int] | None = None,
) -> Allocation:
    """Choose which units stay.

    Args:
        attention_scores: per layer ``(n_kv_group_l,)`` unit scores (``(n_head_l,)`` query-head scores when
            ``heads_per_group`` is given).
        mlp_scores: per layer ``(mlp_dim_l,)`` unit scores.
        sparsity: fraction of the current block linear weights to remove, in [0, 1).
        gamma: (fraction of neurons pruned) / (fraction of attention units pruned).
        n_query_per_kv: g, query heads per KV head.
        head_dim: d.
        round_to: kept MLP width per layer is rounded up to a multiple of this.
        skip_layers: layer indices left untouched.
        mode: ``global`` ranks units of all layers together; ``uniform`` removes the same fraction
            from every layer (ablation).
        counts: ``(n_attention_units, n_neurons)`` to remove instead of the counts the formula
            gives for ``sparsity`` (``global`` only; used by iterative schedules, which derive
            them from the dense model with :func:`removal_counts`).
        tp_size: tensor-parallel degree the pruned model must serve at: every layer keeps a multiple
            of ``tp_size`` KV groups (so query and KV heads split evenly over the ranks) and a
            multiple of ``lcm(round_to, tp_size)`` neurons. Kept counts are rounded up, sparing the
            best-scoring units selected for removal.
        costs: block weights per unit, per layer (the family's declaration); default: ``2(g+1)d`` per KV group
            and 3 per neuron (hidden-sized vectors).
        heads_per_group: ``query_head`` granularity: per layer, query heads per KV group. Query heads are ranked
            (``costs`` must then be the heads' own q/o weights, with the k/v rows as ``fixed``); each layer is
            then laid out by :func:`_layout_heads`: a group all of whose heads were selected goes whole, the
            others keep the same number of heads each. ``Allocation.q_head_keep`` holds the kept heads.
        attention_layers: the layer of each entry of ``attention_scores`` when a layer has several attention
            blocks (T5's decoder: self- and cross-attention heads): every entry is a block of its own (guards and
            keep indices per block), ranked with all the others; ``costs.attention`` stays per layer (the blocks of
            a layer cost the same per unit). Default: one block per layer.

    Returns:
        :class:`Allocation` with sorted keep indices per layer.
    """
    validate_targets(sparsity, gamma, round_to, mode)
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise ConfigError("target.tp_size", tp_size, "a tensor-parallel degree >= 1")
    n_layer = len(mlp_scores)
    if attention_layers is None and len(attention_scores) != n_layer:
        raise ValueError(f"{len(attention_scores)} layers of attention scores but {n_layer} of MLP scores")
    layer_of = list(range(len(attention_scores))) if attention_layers is None else list(attention_layers)
    if len(layer_of) != len(attention_scores) or any(not 0 <= i < n_layer for i in layer_of):
        raise ValueError(f"{len(attention_scores)} attention score segments for layers {layer_of} of {n_layer} "
                         "layers of MLP scores")
    skip = set(skip_layers)
    for i in skip:
        if not 0 <= i < n_layer:
            raise ConfigError("target.skip_layers", i, f"layer indices in [0, {n_layer})")
    attn_skip = {s for s, i in enumerate(layer_of) if i in skip}  # attention segments of skipped layers
    attention_scores = [s.detach().cpu().double() for s in attention_scores]
    mlp_scores = [s.detach().cpu().double() for s in mlp_scores]
    heads = list(heads_per_group) if heads_per_group is not None else None
    n_groups = [s.numel() // heads[i] for i, s in enumerate(attention_scores)] if heads else \
        [s.numel() for s in attention_scores]
    mlp_round = math.lcm(round_to, tp_size)
    if tp_size > 1:
        for what, widths in (("KV groups", zip(layer_of, n_groups)), ("neurons", enumerate(s.numel() for s in mlp_scores))):
            for i, n in widths:
                if n % tp_size:
                    raise ConfigError("target.tp_size", tp_size, f"a degree dividing every layer's KV groups and MLP "
                                                                 f"width (layer {i} has {n} {what})")
    # Guards: the best `tp_size` attention groups of every attention block (with query heads: the best head of each)
    # and the best `round_to` neurons stay; so do skipped layers.
    attn_protect = [torch.ones(s.numel(), dtype=torch.bool) if i in attn_skip else
                    _protect_best_heads(s, heads[i], tp_size) if heads else _protect_top(s, tp_size)
                    for i, s in enumerate(attention_scores)]
    mlp_protect = [torch.ones(s.numel(), dtype=torch.bool) if i in skip else _protect_top(s, min(mlp_round, s.numel()))
                   for i, s in enumerate(mlp_scores)]
    n_attn_prunable = sum(s.numel() for i, s in enumerate(attention_scores) if i not in attn_skip)
    n_mlp_prunable = sum(s.numel() for i, s in enumerate(mlp_scores) if i not in skip)
    costs = costs or UnitCosts.of_groups(n_layer, n_query_per_kv, head_dim)
    n_attn_per_layer = [0] * n_layer
    for s, i in zip(attention_scores, layer_of):
        n_attn_per_layer[i] += s.numel()
    kind = "query heads" if heads else "attention groups"
    # a role with no removable unit by construction takes no share (Gemma-3-270M: one KV group per layer, and every
    # layer keeps one); a guard setting that leaves none removable (tp_size, round_to) is named by the checks below
    unpruned = {}
    attn_widths = [s.numel() for i, s in enumerate(attention_scores) if i not in attn_skip]
    if sparsity > 0 and counts is None and attn_widths and max(attn_widths) <= 1:
        unpruned["attention"] = (f"no removable {kind}: every layer has one and keeps at least one; the target goes "
                                 "to the MLP neurons alone (gamma does not apply)")
    mlp_widths = [s.numel() for i, s in enumerate(mlp_scores) if i not in skip]
    if sparsity > 0 and counts is None and mlp_widths and max(mlp_widths) <= 1 and not unpruned:
        unpruned["mlp"] = (f"no removable MLP neurons: every layer has one and keeps at least one; the target goes to "
                           f"the {kind} alone (gamma does not apply)")
    p_attn, p_mlp = costs.fractions(sparsity, gamma, n_attn_per_layer, [s.numel() for s in mlp_scores], skip,
                                    list(unpruned))
    segment_costs = [costs.attention[i] for i in layer_of]
    if counts is not None and mode != "global":
        raise ConfigError("target.allocation", mode, "'global' when explicit removal counts are given (iterative schedules)")
    if mode == "global":
        n_attn_remove = math.floor(n_attn_prunable * p_attn)
        n_mlp_remove = math.floor(n_mlp_prunable * p_mlp)
        attn_costs = [c for i, c in enumerate(segment_costs) if i not in attn_skip]
        if counts is None and len(set(attn_costs)) > 1:  # layers differ in unit cost: count removed weight
            prunable_weight = sum(s.numel() * c for i, (s, c) in enumerate(zip(attention_scores, segment_costs))
                                  if i not in attn_skip)
            n_attn_remove = _count_by_weight(attention_scores, attn_protect, segment_costs, p_attn * prunable_weight)
        if counts is not None:
            n_attn_remove, n_mlp_remove = (int(c) for c in counts)
            if n_attn_remove < 0 or n_mlp_remove < 0:
                raise ValueError(f"removal counts must be >= 0, got {counts}")
            p_attn = Fraction(n_attn_remove, max(1, n_attn_prunable))
            p_mlp = Fraction(n_mlp_remove, max(1, n_mlp_prunable))
        _blame_guard(n_attn_remove, attn_protect, attention_scores, attn_skip, "target.tp_size", tp_size, kind, layer_of)
        _blame_guard(n_mlp_remove, mlp_protect, mlp_scores, skip, "target.round_to", round_to, "MLP neurons")
        attn_remove = _select_lowest(attention_scores, attn_protect, n_attn_remove, kind)
        mlp_remove = _select_lowest(mlp_scores, mlp_protect, n_mlp_remove, "MLP neurons")
    else:
        attn_remove, mlp_remove, n_attn_remove, n_mlp_remove = [], [], 0, 0
        for s, i in enumerate(layer_of):
            na = 0 if s in attn_skip else math.floor(attention_scores[s].numel() * p_attn)
            attn_remove += _select_lowest([attention_scores[s]], [attn_protect[s]], na, f"{kind} in layer {i}")
            n_attn_remove += na
        for i in range(n_layer):
            nm = 0 if i in skip else math.floor(mlp_scores[i].numel() * p_mlp)
            mlp_remove += _select_lowest([mlp_scores[i]], [mlp_protect[i]], nm, f"MLP neurons in layer {i}")
            n_mlp_remove += nm
    mlp_keep = [_round_up_keep(s, r, mlp_round) for s, r in zip(mlp_scores, mlp_remove)]
    if heads:
        groups, kept_heads, carry = [], [], 0
        for i, (s, r, g) in enumerate(zip(attention_scores, attn_remove, heads)):
            if i in attn_skip:
                groups.append(torch.arange(s.numel() // g))
                kept_heads.append(torch.arange(s.numel()))
                continue
            grp, head, carry = _layout_heads(s, r, g, tp_size, carry)
            groups.append(grp)
            kept_heads.append(head)
        return Allocation(groups, mlp_keep, float(p_attn), float(p_mlp), n_attn_remove, n_mlp_remove,
                          q_head_keep=kept_heads, unpruned=unpruned)
    attention_keep = [_round_up_keep(s, r, tp_size) for s, r in zip(attention_scores, attn_remove)]
    return Allocation(attention_keep, mlp_keep, float(p_attn), float(p_mlp), n_attn_remove, n_mlp_remove,
                      unpruned=unpruned)


def sparsity_for_param_budget(n_param_total: int, n_param_block: int, budget: int) -> float:
    """Block-weight sparsity that brings a model of ``n_param_total`` parameters down to ``budget``.

    Only block linear weights are pruned, so the budget must exceed the non-block parameters.
    """
    fixed = n_param_total - n_param_block
    if not fixed < budget <= n_param_total:
        raise ConfigError("target.param_budget", budget,
                          f"a parameter count in ({fixed:,}, {n_param_total:,}] (embeddings, norms and head are kept)")
    return (n_param_total - budget) / n_param_block

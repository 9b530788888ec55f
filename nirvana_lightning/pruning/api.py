"""``prune``: score, allocate, plan, cut, in one call (the public entry point)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from ..devices import resolve_device
from ..errors import ConfigError
from ..families import GRANULARITIES, ModelFamily, get_family, unwrap_model
from .allocation import UnitCosts, allocate, sparsity_for_param_budget
from .gamma import search_gamma
from .gradients import UnitScores, as_batches, check_token_ids, compute_unit_scores, fingerprint
from .plan import PruningPlan, library_versions
from .saliency import check_finite
from .settings import PruningTarget, Scoring, from_flat
from .surgery import cut_model, model_identity  # noqa: F401 - api's name since 0.2


def count_parameters(model: nn.Module, family: ModelFamily | None = None) -> dict[str, int]:
    """Total parameters, block linear weights and the rest (embeddings, norms, head, biases)."""
    model = unwrap_model(model)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    block = sum(lin.weight.numel() for _, _, lin in (family or get_family(model)).block_linears())
    return {"total": total, "block": block, "other": total - block}


@dataclasses.dataclass(frozen=True)
class UnitLayout:
    """What the family declares for allocation, read from its unit kinds: per layer its kinds; the unit costs
    (weights) the formula reads; the attention units allocation ranks, as ``(layer, kind)`` segments (one per
    layer, two in a T5 decoder layer: self- and cross-attention heads); at ``query_head`` granularity (a nested
    attention kind) the parent kind and the children per parent unit of each layer; and the MLP kind."""

    kinds: list[dict]
    costs: UnitCosts
    segments: list[tuple[int, str]]
    mlp: str
    parent: str | None = None
    heads: list[int] | None = None

    def attention_widths(self) -> list[int]:
        """Attention units per layer (every attention block of the layer)."""
        out = [0] * len(self.kinds)
        for i, kind in self.segments:
            out[i] += self.kinds[i][kind].n_units
        return out

    def mlp_widths(self) -> list[int]:
        return [k[self.mlp].n_units if self.mlp in k else 0 for k in self.kinds]

    def allocation_args(self) -> dict:
        return {"costs": self.costs, "heads_per_group": self.heads,
                "attention_layers": [i for i, _ in self.segments]}

    def specs(self) -> dict[str, dict]:
        """Every kind's declaration, attention kinds first (the plan's order)."""
        specs = {name: kind.spec() for k in self.kinds for name, kind in k.items()}
        return dict(sorted(specs.items(), key=lambda item: item[1]["allocation"] == "mlp"))


def unit_layout(family: ModelFamily, granularity: str = GRANULARITIES[0]) -> UnitLayout:
    """The family's declaration, read once for allocation (see :class:`UnitLayout`)."""
    kinds = [family.unit_kinds(layer, granularity) for layer in family.layers()]
    names = list(dict.fromkeys(name for k in kinds for name in k))
    spec = {name: next(k[name] for k in kinds if name in k) for name in names}
    mlp = [n for n in names if spec[n].allocation == "mlp"]
    nested = [n for n in names if spec[n].allocation == "attention" and spec[n].parent]
    if len(mlp) != 1 or len(nested) > 1 or any(spec[n].parent for n in mlp):
        raise ValueError(f"{type(family).__name__} declares unit kinds {names}: allocation ranks one MLP kind and "
                         "attention kinds, at most one of them nested")
    if not nested:
        ranked = [n for n in names if spec[n].allocation == "attention"]
        segments = [(i, name) for i, k in enumerate(kinds) for name in ranked if name in k]
        attn_cost = []
        for i, k in enumerate(kinds):
            costs = {k[name].cost for name in ranked if name in k}
            if len(costs) > 1:
                raise ValueError(f"layer {i}: attention blocks with different unit costs {sorted(costs)} cannot share "
                                 "one per-layer cost")
            attn_cost.append(costs.pop() if costs else 0)
        return UnitLayout(kinds, UnitCosts(attn_cost, [k[mlp[0]].cost for k in kinds]), segments, mlp[0])
    head, parent = nested[0], spec[nested[0]].parent
    heads = [k[head].n_units // k[parent].n_units for k in kinds]
    costs = UnitCosts.of_query_heads([k[head].cost for k in kinds], [k[parent].cost for k in kinds], heads,
                                     [k[mlp[0]].cost for k in kinds])
    return UnitLayout(kinds, costs, [(i, head) for i in range(len(kinds))], mlp[0], parent, heads)


def plan_from_scores(
    model: nn.Module,
    scores: UnitScores,
    target: PruningTarget | None = None,
    *,
    provenance: dict | None = None,
    counts: tuple[int, int] | None = None,
    family: ModelFamily | None = None,
    **flat,
) -> PruningPlan:
    """Allocate from unit scores and wrap the result as a :class:`PruningPlan` for ``model``.

    ``target`` (or 0.1-style keywords: ``sparsity=``, ``gamma=``, ``round_to=`` ...) says how much; a numeric
    gamma is required here (``auto`` searches over plans made by this function, in :func:`make_plan`).
    """
    target, _ = from_flat(target, None, flat, "plan_from_scores")
    if target.sparsity is None:
        raise ConfigError("target.sparsity", None, "a fraction here (resolve param_budget with make_plan)")
    if scores.granularity != target.attention_granularity:
        raise ConfigError("target.attention_granularity", target.attention_granularity,
                          f"{scores.granularity!r}, the granularity the scores were computed at")
    family = family or get_family(model)
    for kind, per_layer in scores.by_kind.items():
        check_finite(per_layer, kind)
    layout = unit_layout(family, target.attention_granularity)
    kinds = layout.kinds
    result = allocate([scores.by_kind[name][i] for i, name in layout.segments], scores.by_kind[layout.mlp],
                      sparsity=target.sparsity, gamma=target.gamma, n_query_per_kv=family.n_query_per_kv,
                      head_dim=family.head_dim, round_to=target.round_to, skip_layers=target.skip_layers,
                      mode=target.allocation, counts=counts, tp_size=target.tp_size, **layout.allocation_args())
    keep: dict[str, list[list[int]]] = {}
    if layout.parent is not None:
        keep[layout.parent] = [k.tolist() for k in result.attention_keep]
        keep[layout.segments[0][1]] = [k.tolist() for k in result.q_head_keep]
    else:  # one entry per attention block: scattered back to (kind, layer); a kind a layer lacks keeps nothing
        for name in dict.fromkeys(name for _, name in layout.segments):
            keep[name] = [[] for _ in kinds]
        for (i, name), kept in zip(layout.segments, result.attention_keep):
            keep[name][i] = kept.tolist()
    keep[layout.mlp] = [k.tolist() for k in result.mlp_keep]
    keep = {name: keep[name] for name in layout.specs()}  # the family's order
    plan = PruningPlan(
        keep=keep,
        width_before={name: [k[name].n_units if name in k else 0 for k in kinds] for name in keep},
        unit_cost={name: [k[name].cost if name in k else 0 for k in kinds] for name in keep},
        n_head_before=[family.layer_widths(layer)[1] for layer in family.layers()],
        n_query_per_kv=family.n_query_per_kv,
        head_dim=family.head_dim,
        hidden_dim=family.hidden_dim,
        kinds=layout.specs(),
    )
    plan.provenance = {
        **(provenance or {}),
        "sparsity": target.sparsity, "gamma": target.gamma, "round_to": target.round_to, "tp_size": target.tp_size,
        "allocation": target.allocation, "attention_granularity": target.attention_granularity,
        "skip_layers": sorted(target.skip_layers), "p_attn": result.p_attn, "p_mlp": result.p_mlp,
        "n_attn_removed_requested": result.n_attn_requested, "n_mlp_removed_requested": result.n_mlp_requested,
        "realised_sparsity": plan.realised_sparsity, **({"unpruned": result.unpruned} if result.unpruned else {}),
        "model_type": family.config.model_type,
        "model_identity": model_identity(model),
        "model_source": getattr(family.config, "_name_or_path", "") or "",
        "versions": library_versions(),
    }
    for role, why in result.unpruned.items():
        rank_zero_info(f"note: {role} units take no share of the target: {why}")
    if counts is None and target.sparsity > 0 and abs(plan.realised_sparsity - target.sparsity) > 0.02:
        rank_zero_info(f"note: realised block-weight sparsity {plan.realised_sparsity:.4f} vs target "
                       f"{target.sparsity} ({target.allocation} allocation floors per-unit counts and rounds MLP "
                       f"widths up to {target.round_to})")
    return plan


def _passes(check, *args) -> bool:
    try:
        check(*args)
        return True
    except ConfigError:
        return False


def make_plan(
    model: nn.Module,
    calibration: torch.Tensor | Iterable[torch.Tensor] | None,
    target: PruningTarget | None = None,
    scoring: Scoring | None = None,
    *,
    probe: torch.Tensor | None = None,
    counts: tuple[int, int] | None = None,
    family: ModelFamily | None = None,
    **flat,
) -> PruningPlan:
    """Score and allocate without cutting (see :func:`prune` for the arguments; ``family``: the model's family
    spec when the caller holds it, so one call of :func:`prune` asks for it once).

    Scoring runs where the model is (move it first to score on an accelerator), or on
    ``scoring.device`` one layer at a time with the model left where it is. ``counts``
    (attention groups, neurons) to remove overrides the counts ``target.sparsity`` gives (global
    allocation; iterative schedules pass them).
    """
    target, scoring = from_flat(target, scoring, flat, "make_plan")
    model = unwrap_model(model)
    family = family or get_family(model)  # unsupported families fail here, before any work
    if scoring.device is not None and str(scoring.device).startswith("+"):  # +N: N devices after the model's own
        home = next(model.parameters()).device
        scoring = dataclasses.replace(scoring, device=str(resolve_device(scoring.device, home, 1, key="scoring.device")))
    sparsity = target.sparsity
    if target.param_budget is not None:
        n_param = count_parameters(model, family)
        sparsity = sparsity_for_param_budget(n_param["total"], n_param["block"], target.param_budget)
        target = dataclasses.replace(target, sparsity=sparsity, param_budget=None)
    auto = target.gamma == "auto"
    if auto:
        grid = list(target.grid)
        if counts is not None:
            raise ConfigError("target.gamma", "auto", "a number with explicit removal counts (iterative schedules fix "
                              "the counts from gamma before scoring)")
        if probe is None:
            raise ConfigError("probe", None, "held-out token windows (N, T) for gamma 'auto': each grid gamma's "
                              "masked model is compared with the dense model on them, never on the calibration")
    # Feasibility (fractions <= 1, guards, skip_layers) depends only on the geometry: check it on
    # placeholder scores now rather than after minutes of scoring.
    layout = unit_layout(family, target.attention_granularity)

    def allocation_check(g: float) -> None:
        allocate([torch.zeros(layout.kinds[i][name].n_units) for i, name in layout.segments],
                 [torch.zeros(n) for n in layout.mlp_widths()],
                 sparsity=sparsity, gamma=g, n_query_per_kv=family.n_query_per_kv, head_dim=family.head_dim,
                 round_to=target.round_to, skip_layers=target.skip_layers, mode=target.allocation, counts=counts,
                 tp_size=target.tp_size, **layout.allocation_args())

    if not auto:
        allocation_check(target.gamma)
    elif not any(_passes(allocation_check, g) for g in grid):  # the search skips infeasible gammas itself
        allocation_check(grid[0])  # none can reach the target: raise the first gamma's reason
    batches: list[torch.Tensor] = []
    if scoring.needs_data:
        if calibration is None:
            raise ConfigError("calibration", None, f"token ids for criterion {scoring.criterion!r}")
        batches = as_batches(calibration, scoring.micro_batch_size)
        check_token_ids(batches, int(model.get_input_embeddings().num_embeddings))
    if auto:
        from .probe import check_disjoint

        if probe.dim() != 2 or probe.dtype not in (torch.int64, torch.int32) or probe.numel() == 0:
            raise ConfigError("probe", f"tensor {tuple(probe.shape)} {probe.dtype}", "a LongTensor (N, T) of token ids")
        if probe.shape[1] < 2:  # the KL is over next-token predictions: a 1-token window predicts nothing
            raise ConfigError("probe", f"tensor {tuple(probe.shape)}", "token windows of at least 2 tokens (N, T >= 2) "
                              "for gamma 'auto'")
        check_token_ids([probe], int(model.get_input_embeddings().num_embeddings))
        if batches:
            check_disjoint([torch.cat(batches)] if len({b.shape[1] for b in batches}) == 1 else batches, probe)
    start = time.perf_counter()
    # float32 scoring of a half-precision model: one module at a time, the model is never converted
    compute_dtype = torch.float32 if scoring.dtype == "float32" else None
    activation_baseline = scoring.criterion in ("wanda_sp", "flap")
    scores = compute_unit_scores(model, batches, criterion=scoring.criterion, functional=scoring.functional,
                                 accumulate=scoring.accumulate, checkpointing=scoring.checkpointing,
                                 seed=scoring.seed, compute_dtype=compute_dtype, compute_device=scoring.device,
                                 granularity=target.attention_granularity, family=family)
    provenance = {
        "criterion": scoring.criterion, "functional": scoring.functional if scoring.criterion == "nirvana" else None,
        "calibration_fingerprint": fingerprint(batches) if batches else None,
        "calibration_shape": [sum(b.shape[0] for b in batches), batches[0].shape[1]] if batches else None,
        "micro_batches": len(batches), "accumulate": scoring.accumulate, "checkpointing": scoring.checkpointing,
        "seed": scoring.seed,
        # wanda_sp / flap: one forward pass in the model's dtype where the model is (float64 statistics)
        "scoring_dtype": "model" if activation_baseline else scoring.dtype,
        "scoring_device": None if scoring.device is None or activation_baseline else str(scoring.device),
        "scoring_seconds": round(time.perf_counter() - start, 3),
    }

    def plan_for(g: float) -> PruningPlan:
        return plan_from_scores(model, scores, dataclasses.replace(target, gamma=g), provenance=provenance,
                                counts=counts, family=family)

    if not auto:
        return plan_for(target.gamma)
    plan, search = search_gamma(model, plan_for, probe, grid)
    rank_zero_info("gamma 'auto': KL to the dense model on the probe per gamma\n" + search.table())
    return plan


def prune(
    model: nn.Module,
    calibration: torch.Tensor | Iterable[torch.Tensor] | None,
    target: PruningTarget | None = None,
    scoring: Scoring | None = None,
    *,
    probe: torch.Tensor | None = None,
    bias_compensation: bool = False,
    **flat,
) -> PruningPlan:
    """Structurally prune ``model`` in place with NIRVANA (or a baseline criterion): score, plan, cut.

    Args:
        model: a supported causal LM (Llama, Mistral, Qwen2, Qwen3).
        calibration: LongTensor ``(N, T)`` of token ids or an iterable of ``(B, T)`` batches
            (not needed for ``magnitude``/``random``).
        target: how much to remove (:class:`~nirvana_lightning.pruning.settings.PruningTarget`: sparsity or
            param_budget, gamma or ``"auto"``, round_to, tp_size, skip_layers, allocation).
        scoring: how units are scored (:class:`~nirvana_lightning.pruning.settings.Scoring`: criterion, functional,
            dtype, micro-batching, checkpointing, device, seed).
        probe: held-out token windows ``(N, T)`` for ``gamma="auto"``, sharing no text with the calibration
            (checked: no common 32-token run). Required then: this function has no corpus to draw them from
            (the callback draws them from held-out documents).
        bias_compensation: FLAP's compensation, for any criterion: each removed unit's mean contribution on the
            calibration is added to the bias of o_proj / down_proj (:mod:`nirvana_lightning.pruning.compensation`;
            Llama-family configs only).
        **flat: 0.1's keywords, each folded into ``target`` or ``scoring`` (``sparsity=``, ``gamma=``,
            ``criterion=``, ``round_to=``, ``scoring_dtype=``, ``scoring_device=`` ...: see
            :data:`~nirvana_lightning.pruning.settings.FLAT_KEYWORDS`); a keyword overrides the same field of an
            object also passed.

    Returns:
        The applied :class:`PruningPlan`. On any error the model is untouched.
    """
    target, scoring = from_flat(target, scoring, flat, "prune")
    family = get_family(model)  # the one family spec scoring, allocation and the cut read
    plan = make_plan(model, calibration, target, scoring, probe=probe, family=family)
    if not bias_compensation:
        return cut(model, plan, family)
    if calibration is None:
        raise ConfigError("calibration", None, "token ids for bias_compensation (the removed units' input means)")
    from .compensation import add_biases, bias_deltas

    deltas = bias_deltas(model, plan, as_batches(calibration, scoring.micro_batch_size))  # from the dense columns
    cut(model, plan)
    plan.provenance["bias_compensation"] = add_biases(model, deltas)
    return plan


def cut(model: nn.Module, plan: PruningPlan, family: ModelFamily | None = None) -> PruningPlan:
    """Apply ``plan`` and record the parameter counts before and after in its provenance."""
    family = family or get_family(model)
    before = count_parameters(model, family)["total"]
    cut_model(model, plan, family)
    after = count_parameters(model, family)["total"]
    plan.provenance.update({"params_before": before, "params_after": after})
    p = plan.provenance
    rank_zero_info(f"pruned ({p.get('criterion', 'saved plan')}, s={p.get('sparsity')}, gamma={p.get('gamma')}): "
                   f"params {before:,} -> {after:,}; block-weight sparsity {plan.realised_sparsity:.4f}")
    return plan


def apply_plan(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """Deprecated 0.1 name of :func:`cut` (which returns the plan); returns the model, as 0.1 did."""
    import warnings

    warnings.warn("apply_plan is deprecated: use cut(model, plan) (one verb for applying a plan)", DeprecationWarning,
                  stacklevel=2)
    cut(model, plan)
    return model

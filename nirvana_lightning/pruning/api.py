"""``prune``: score, allocate, plan, cut, in one call (the public entry point)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from ..adapters import get_adapter, unwrap_model
from ..errors import ConfigError, check_choice
from .allocation import MODES, allocate, sparsity_for_param_budget, validate_targets
from .gamma import GAMMA_GRID, check_grid, search_gamma
from .gradients import ACCUMULATE, UnitScores, as_batches, check_token_ids, compute_unit_scores, fingerprint
from .plan import PruningPlan, library_versions
from .saliency import CRITERIA, DATA_CRITERIA, FUNCTIONALS, check_finite
from .surgery import apply_plan

SCORING_DTYPES = ("float32", "model")


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total parameters, block linear weights and the rest (embeddings, norms, head, biases)."""
    model = unwrap_model(model)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    block = sum(lin.weight.numel() for _, _, lin in get_adapter(model).block_linears())
    return {"total": total, "block": block, "other": total - block}


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


def plan_from_scores(
    model: nn.Module,
    scores: UnitScores,
    *,
    sparsity: float,
    gamma: float = 1.0,
    round_to: int = 8,
    skip_layers: Sequence[int] = (),
    allocation: str = "global",
    provenance: dict | None = None,
    counts: tuple[int, int] | None = None,
    tp_size: int = 1,
) -> PruningPlan:
    """Allocate from unit scores and wrap the result as a :class:`PruningPlan` for ``model``."""
    adapter = get_adapter(model)
    check_finite(scores.attention, "attention")
    check_finite(scores.mlp, "MLP")
    geometry = [adapter.layer_geometry(layer) for layer in adapter.layers()]
    result = allocate(scores.attention, scores.mlp, sparsity=sparsity, gamma=gamma,
                      n_query_per_kv=adapter.n_query_per_kv, head_dim=adapter.head_dim, round_to=round_to,
                      skip_layers=skip_layers, mode=allocation, counts=counts, tp_size=tp_size)
    plan = PruningPlan(
        attention_keep=[k.tolist() for k in result.attention_keep],
        mlp_keep=[k.tolist() for k in result.mlp_keep],
        n_kv_group_before=[a for a, _ in geometry],
        mlp_dim_before=[m for _, m in geometry],
        n_query_per_kv=adapter.n_query_per_kv,
        head_dim=adapter.head_dim,
        hidden_dim=adapter.hidden_dim,
    )
    plan.provenance = {
        **(provenance or {}),
        "sparsity": sparsity, "gamma": gamma, "round_to": round_to, "tp_size": tp_size, "allocation": allocation,
        "skip_layers": sorted(skip_layers), "p_attn": result.p_attn, "p_mlp": result.p_mlp,
        "n_attn_removed_requested": result.n_attn_requested, "n_mlp_removed_requested": result.n_mlp_requested,
        "realised_sparsity": plan.realised_sparsity,
        "model_type": adapter.config.model_type,
        "model_identity": model_identity(model),
        "model_source": getattr(adapter.config, "_name_or_path", "") or "",
        "versions": library_versions(),
    }
    if counts is None and sparsity > 0 and abs(plan.realised_sparsity - sparsity) > 0.02:
        rank_zero_info(f"note: realised block-weight sparsity {plan.realised_sparsity:.4f} vs target {sparsity} "
                       f"({allocation} allocation floors per-unit counts and rounds MLP widths up to {round_to})")
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
    *,
    sparsity: float | None = None,
    param_budget: int | None = None,
    gamma: float | str = 1.0,
    criterion: str = "nirvana",
    functional: str = "max_over_seq",
    round_to: int = 8,
    skip_layers: Sequence[int] = (),
    allocation: str = "global",
    micro_batch_size: int | None = None,
    accumulate: str = "gradient",
    checkpointing: bool = True,
    scoring_dtype: str = "float32",
    seed: int = 0,
    counts: tuple[int, int] | None = None,
    tp_size: int = 1,
    scoring_device: str | None = None,
    probe: torch.Tensor | None = None,
    gamma_grid: Sequence[float] = GAMMA_GRID,
) -> PruningPlan:
    """Score and allocate without cutting (see :func:`prune` for the arguments).

    Scoring runs where the model is (move it first to score on an accelerator), or on
    ``scoring_device`` one layer at a time with the model left where it is. ``counts``
    (attention groups, neurons) to remove overrides the counts ``sparsity`` gives (global
    allocation; iterative schedules pass them).
    """
    check_choice("criterion", criterion, CRITERIA)
    check_choice("functional", functional, FUNCTIONALS)
    check_choice("allocation", allocation, MODES)
    check_choice("accumulate", accumulate, ACCUMULATE)
    check_choice("scoring_dtype", scoring_dtype, SCORING_DTYPES)
    model = unwrap_model(model)
    get_adapter(model)  # unsupported families fail here, before any work
    if (sparsity is None) == (param_budget is None):
        raise ConfigError("sparsity", sparsity, "exactly one of sparsity and param_budget")
    if param_budget is not None:
        n_param = count_parameters(model)
        sparsity = sparsity_for_param_budget(n_param["total"], n_param["block"], param_budget)
    auto = isinstance(gamma, str)
    if auto:
        if gamma != "auto":
            raise ConfigError("gamma", gamma, "a finite number > 0 or 'auto'")
        grid = check_grid(gamma_grid)
        if counts is not None:
            raise ConfigError("gamma", "auto", "a number with explicit removal counts (iterative schedules fix the "
                              "counts from gamma before scoring)")
        if probe is None:
            raise ConfigError("probe", None, "held-out token windows (N, T) for gamma 'auto': each grid gamma's "
                              "masked model is compared with the dense model on them, never on the calibration")
    validate_targets(sparsity, 1.0 if auto else gamma, round_to, allocation)
    # Feasibility (fractions <= 1, guards, skip_layers) depends only on the geometry: check it on
    # placeholder scores now rather than after minutes of scoring.
    adapter = get_adapter(model)
    geometry = [adapter.layer_geometry(layer) for layer in adapter.layers()]

    def allocation_check(g: float) -> None:
        allocate([torch.zeros(a) for a, _ in geometry], [torch.zeros(m) for _, m in geometry], sparsity=sparsity,
                 gamma=g, n_query_per_kv=adapter.n_query_per_kv, head_dim=adapter.head_dim, round_to=round_to,
                 skip_layers=skip_layers, mode=allocation, counts=counts, tp_size=tp_size)

    if not auto:
        allocation_check(gamma)
    elif not any(_passes(allocation_check, g) for g in grid):  # the search skips infeasible gammas itself
        allocation_check(grid[0])  # none can reach the target: raise the first gamma's reason
    batches: list[torch.Tensor] = []
    if criterion in DATA_CRITERIA:
        if calibration is None:
            raise ConfigError("calibration", None, f"token ids for criterion {criterion!r}")
        batches = as_batches(calibration, micro_batch_size)
        check_token_ids(batches, int(model.get_input_embeddings().num_embeddings))
    if auto:
        from .selection import check_disjoint

        if probe.dim() != 2 or probe.dtype not in (torch.int64, torch.int32) or probe.numel() == 0:
            raise ConfigError("probe", f"tensor {tuple(probe.shape)} {probe.dtype}", "a LongTensor (N, T) of token ids")
        check_token_ids([probe], int(model.get_input_embeddings().num_embeddings))
        if batches:
            check_disjoint([torch.cat(batches)] if len({b.shape[1] for b in batches}) == 1 else batches, probe)
    start = time.perf_counter()
    # float32 scoring of a half-precision model: one module at a time, the model is never converted
    compute_dtype = torch.float32 if scoring_dtype == "float32" else None
    scores = compute_unit_scores(model, batches, criterion=criterion, functional=functional,
                                 accumulate=accumulate, checkpointing=checkpointing, seed=seed,
                                 compute_dtype=compute_dtype, compute_device=scoring_device)
    provenance = {
        "criterion": criterion, "functional": functional if criterion == "nirvana" else None,
        "calibration_fingerprint": fingerprint(batches) if batches else None,
        "calibration_shape": [sum(b.shape[0] for b in batches), batches[0].shape[1]] if batches else None,
        "micro_batches": len(batches), "accumulate": accumulate, "checkpointing": checkpointing, "seed": seed,
        # wanda_sp / flap: one forward pass in the model's dtype where the model is (float64 statistics)
        "scoring_dtype": "model" if criterion in ("wanda_sp", "flap") else scoring_dtype,
        "scoring_device": None if scoring_device is None or criterion in ("wanda_sp", "flap") else str(scoring_device),
        "scoring_seconds": round(time.perf_counter() - start, 3),
    }

    def plan_for(g: float) -> PruningPlan:
        return plan_from_scores(model, scores, sparsity=sparsity, gamma=g, round_to=round_to, skip_layers=skip_layers,
                                allocation=allocation, provenance=provenance, counts=counts, tp_size=tp_size)

    if not auto:
        return plan_for(gamma)
    plan, search = search_gamma(model, plan_for, probe, grid)
    rank_zero_info("gamma 'auto': KL to the dense model on the probe per gamma\n" + search.table())
    return plan


def prune(
    model: nn.Module,
    calibration: torch.Tensor | Iterable[torch.Tensor] | None,
    *,
    sparsity: float | None = None,
    param_budget: int | None = None,
    gamma: float | str = 1.0,
    criterion: str = "nirvana",
    functional: str = "max_over_seq",
    round_to: int = 8,
    skip_layers: Sequence[int] = (),
    allocation: str = "global",
    micro_batch_size: int | None = None,
    accumulate: str = "gradient",
    checkpointing: bool = True,
    scoring_dtype: str = "float32",
    seed: int = 0,
    tp_size: int = 1,
    scoring_device: str | None = None,
    probe: torch.Tensor | None = None,
    gamma_grid: Sequence[float] = GAMMA_GRID,
    bias_compensation: bool = False,
) -> PruningPlan:
    """Structurally prune ``model`` in place with NIRVANA (or a baseline criterion).

    Args:
        model: a supported causal LM (Llama, Mistral, Qwen2, Qwen3).
        calibration: LongTensor ``(N, T)`` of token ids or an iterable of ``(B, T)`` batches
            (not needed for ``magnitude``/``random``).
        sparsity: fraction of block linear weights to remove, in [0, 1).
        param_budget: alternatively, the total parameter count to reach.
        gamma: MLP-to-attention pruning-fraction ratio (1: uniform fractions), or ``"auto"``: the value of
            ``gamma_grid`` whose masked model has the lowest KL to the dense model on ``probe``
            (:mod:`nirvana_lightning.pruning.gamma`; the curve goes to ``provenance["gamma_search"]``).
        probe: held-out token windows ``(N, T)`` for ``gamma="auto"``, sharing no text with the calibration
            (checked: no common 32-token run). Required then: this function has no corpus to draw them from
            (the callback draws them from held-out documents, ``probe_samples`` x ``probe_seq_len``).
        gamma_grid: the gammas ``"auto"`` tries.
        bias_compensation: FLAP's compensation, for any criterion: each removed unit's mean contribution on the
            calibration is added to the bias of o_proj / down_proj (:mod:`nirvana_lightning.pruning.compensation`;
            Llama-family configs only).
        criterion: ``nirvana`` | ``magnitude`` | ``taylor`` | ``random`` | ``wanda_sp`` | ``flap`` (the last two:
            activation baselines from one forward pass, see :mod:`nirvana_lightning.pruning.saliency`).
        functional: NIRVANA output functional: ``max_over_seq`` | ``max_over_vocab`` | ``sum_logits``.
        round_to: kept MLP width per layer rounded up to a multiple of this (32 fits GGUF's q8_0/q4_0 blocks,
            256 its k-quants).
        tp_size: serve-time tensor-parallel degree; every layer keeps a multiple of it in KV groups
            (see :func:`~nirvana_lightning.pruning.allocation.allocate`).
        skip_layers: layers left untouched.
        allocation: ``global`` ranking or ``uniform`` per-layer fractions.
        micro_batch_size / accumulate: see :mod:`nirvana_lightning.pruning.gradients`.
        checkpointing: activation checkpointing during scoring.
        scoring_dtype: ``float32`` (a half-precision model is scored in float32 one layer at a time, never
            converted: see :mod:`nirvana_lightning.pruning.gradients`) or ``model``.
        seed: seed of the ``random`` criterion (recorded in the plan).
        scoring_device: score on this device one layer at a time while the model stays where it is (e.g. a
            70B model in host memory scored on one GPU); default: where the model is.

    Returns:
        The applied :class:`PruningPlan`. On any error the model is untouched.
    """
    plan = make_plan(model, calibration, sparsity=sparsity, param_budget=param_budget, gamma=gamma,
                     criterion=criterion, functional=functional, round_to=round_to, skip_layers=skip_layers,
                     allocation=allocation, micro_batch_size=micro_batch_size, accumulate=accumulate,
                     checkpointing=checkpointing, scoring_dtype=scoring_dtype, seed=seed, tp_size=tp_size,
                     scoring_device=scoring_device, probe=probe, gamma_grid=gamma_grid)
    if not bias_compensation:
        return cut(model, plan)
    if calibration is None:
        raise ConfigError("calibration", None, "token ids for bias_compensation (the removed units' input means)")
    from .compensation import add_biases, bias_deltas

    deltas = bias_deltas(model, plan, as_batches(calibration, micro_batch_size))  # from the dense columns
    cut(model, plan)
    plan.provenance["bias_compensation"] = add_biases(model, deltas)
    return plan


def cut(model: nn.Module, plan: PruningPlan) -> PruningPlan:
    """Apply ``plan`` and record the parameter counts before and after in its provenance."""
    before = count_parameters(model)["total"]
    apply_plan(model, plan)
    after = count_parameters(model)["total"]
    plan.provenance.update({"params_before": before, "params_after": after})
    p = plan.provenance
    rank_zero_info(f"pruned ({p.get('criterion', 'saved plan')}, s={p.get('sparsity')}, gamma={p.get('gamma')}): "
                   f"params {before:,} -> {after:,}; block-weight sparsity {plan.realised_sparsity:.4f}")
    return plan

"""Invariants of plan-then-cut, for every family: prune equals mask, zero sparsity is identity, ..."""

import copy

import pytest
import torch
from projections import projections

from nirvana_lightning import PruningPlan, apply_plan, count_parameters, cut, make_plan, masked_units, prune
from nirvana_lightning.errors import ConfigError
from nirvana_lightning.families import get_family
from nirvana_lightning.pruning import UnitScores, plan_from_scores


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_pruned_logits_equal_masked_dense_logits(tiny, calib, granularity):
    plan = make_plan(tiny, calib, sparsity=0.45, gamma=1.5, round_to=8, attention_granularity=granularity)
    assert plan.realised_sparsity > 0.2 and plan.granularity == granularity
    if granularity == "query_head":  # a layer keeps fewer heads per group than g, or loses whole groups
        assert any(h < n * get_family(tiny).n_query_per_kv for h, n in zip(plan.n_head_after, plan.n_kv_group_after)) \
            or plan.n_kv_group_after != plan.n_kv_group_before
    dense = _logits(tiny, calib)
    with masked_units(tiny, plan):
        masked = _logits(tiny, calib)
    assert not torch.allclose(dense, masked)
    cut(tiny, plan)
    pruned = _logits(tiny, calib)
    assert (pruned - masked).abs().max().item() <= 1e-5


def test_masking_restores_the_model(tiny, calib):
    plan = make_plan(tiny, calib, sparsity=0.45, gamma=1.5)
    dense = _logits(tiny, calib)
    with masked_units(tiny, plan):
        pass
    assert torch.equal(_logits(tiny, calib), dense)


def test_zero_sparsity_is_identity(tiny, calib, granularity):
    dense = _logits(tiny, calib)
    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    plan = prune(tiny, calib, sparsity=0.0, gamma=3.0, attention_granularity=granularity)
    assert plan.realised_sparsity == 0.0
    assert torch.equal(_logits(tiny, calib), dense)
    assert all(torch.equal(v, state[k]) for k, v in tiny.state_dict().items())


def test_realised_parameters_match_plan_and_formula(tiny, calib, granularity):
    before = count_parameters(tiny)
    plan = prune(tiny, calib, sparsity=0.4, gamma=2.0, round_to=8, attention_granularity=granularity)
    after = count_parameters(tiny)
    assert before["block"] == plan.block_params_before
    assert after["block"] == plan.block_params_after
    removed_other = before["other"] - after["other"]  # only Qwen2 q/k/v biases leave with their rows
    family = get_family(tiny)
    if getattr(tiny.config, "attention_bias", False):
        d = family.head_dim
        removed_groups = sum(plan.n_kv_group_before) - sum(plan.n_kv_group_after)
        removed_heads = sum(plan.n_head_before) - sum(plan.n_head_after)
        assert removed_other == removed_heads * d + removed_groups * 2 * d
    else:
        assert removed_other == 0
    if granularity == "query_head":  # the heads the formula asked for, before the per-layer layout rounds them
        assert plan.provenance["n_attn_removed_requested"] > 0
        return
    # the formula: removed units as requested, minus what the multiple-of-8 rounding spared
    p = plan.provenance
    removed_neurons = sum(plan.mlp_dim_before) - sum(plan.mlp_dim_after)
    assert removed_neurons <= p["n_mlp_removed_requested"] < removed_neurons + 8 * plan.n_layer
    assert sum(plan.n_kv_group_before) - sum(plan.n_kv_group_after) == p["n_attn_removed_requested"]


def test_slices_move_in_whole_group_blocks(tiny, calib):
    family = get_family(tiny)
    g, d = family.n_query_per_kv, family.head_dim
    dense = copy.deepcopy(tiny)
    # force group 0 out of layer 0 by giving it the lowest score
    n_group, _, mlp_dim = family.layer_widths(family.layers()[0])
    scores = UnitScores({"kv_group": [torch.tensor([0.0] + [1.0] * (n_group - 1)), torch.ones(n_group)],
                         "neuron": [torch.rand(mlp_dim), torch.rand(mlp_dim)]},
                        {"kv_group": {"allocation": "attention", "label": "KV groups", "parent": None},
                         "neuron": {"allocation": "mlp", "label": "MLP neurons", "parent": None}})
    plan = plan_from_scores(tiny, scores, sparsity=0.3, gamma=1.0, round_to=8)
    assert 0 not in plan.attention_keep[0]
    cut(tiny, plan)
    kept = plan.attention_keep[0]
    (a_new, _), (a_old, _) = projections(family.layers()[0]), projections(get_family(dense).layers()[0])
    for j, h in enumerate(kept):
        assert torch.equal(a_new.q.weight[j * g * d:(j + 1) * g * d], a_old.q.weight[h * g * d:(h + 1) * g * d])
        assert torch.equal(a_new.k.weight[j * d:(j + 1) * d], a_old.k.weight[h * d:(h + 1) * d])
        assert torch.equal(a_new.v.weight[j * d:(j + 1) * d], a_old.v.weight[h * d:(h + 1) * d])
        assert torch.equal(a_new.o.weight[:, j * g * d:(j + 1) * g * d], a_old.o.weight[:, h * g * d:(h + 1) * g * d])
        if a_old.q.bias is not None:
            assert torch.equal(a_new.q.bias[j * g * d:(j + 1) * g * d], a_old.q.bias[h * g * d:(h + 1) * g * d])
            assert torch.equal(a_new.k.bias[j * d:(j + 1) * d], a_old.k.bias[h * d:(h + 1) * d])


def test_modules_config_and_tensors_agree_and_generate_works(tiny, calib, granularity):
    plan = prune(tiny, calib, sparsity=0.45, gamma=1.5, round_to=8, attention_granularity=granularity)
    family = get_family(tiny)
    widths = tiny.config.nirvana_layer_widths
    assert tiny.config.head_dim == family.head_dim
    for i, layer in enumerate(family.layers()):
        a, m = projections(layer)
        n_group = plan.n_kv_group_after[i]
        assert widths["num_key_value_heads"][i] == n_group
        assert a.k.out_features == a.k.weight.shape[0] == n_group * family.head_dim == a.v.out_features
        assert widths["num_attention_heads"][i] == plan.n_head_after[i]
        assert widths["num_attention_heads"][i] * family.head_dim == a.q.out_features == a.o.in_features
        if hasattr(layer.self_attn, "num_key_value_groups"):
            assert layer.self_attn.num_key_value_groups == plan.n_head_after[i] // n_group
        assert widths["intermediate_size"][i] == plan.mlp_dim_after[i] == m.gate.out_features == m.down.in_features
        if hasattr(layer.mlp, "intermediate_size"):
            assert layer.mlp.intermediate_size == plan.mlp_dim_after[i]
    prompt = calib[:1, :5]
    out_cache = tiny.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    out_plain = tiny.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert out_cache.shape == (1, 11) and torch.equal(out_cache, out_plain)


def test_same_seed_same_plan(family, calib):
    from nirvana_lightning.debug_models import build_tiny_model

    plans = [make_plan(build_tiny_model(family), calib, sparsity=0.4, gamma=2.0) for _ in range(2)]
    assert plans[0].fingerprint() == plans[1].fingerprint()
    r = [make_plan(build_tiny_model(family), None, sparsity=0.4, criterion="random", seed=s) for s in (1, 1, 2)]
    assert r[0].fingerprint() == r[1].fingerprint() != r[2].fingerprint()


def test_plan_json_round_trip_and_reapply(tiny, calib, family, granularity):
    from nirvana_lightning.debug_models import build_tiny_model

    plan = make_plan(tiny, calib, sparsity=0.45, gamma=1.5, attention_granularity=granularity)
    text = plan.to_json()
    again = PruningPlan.from_json(text)
    assert again == plan
    other = build_tiny_model(family)
    cut(tiny, plan)
    cut(other, again)
    assert torch.equal(_logits(tiny, calib), _logits(other, calib))


def test_apply_plan_is_the_deprecated_name_of_cut(tiny, calib, family):
    """0.1's apply_plan still cuts, warns, and returns the model (cut returns the plan)."""
    from nirvana_lightning.debug_models import build_tiny_model

    plan = make_plan(tiny, calib, sparsity=0.45, gamma=1.5)
    other = build_tiny_model(family)
    with pytest.warns(DeprecationWarning, match=r"apply_plan is deprecated: use cut\(model, plan\)"):
        assert apply_plan(tiny, plan) is tiny
    assert cut(other, PruningPlan.from_dict(plan.to_dict())).fingerprint() == plan.fingerprint()
    assert torch.equal(_logits(tiny, calib), _logits(other, calib))


def test_mismatched_plan_names_the_layer_and_leaves_model_untouched(tiny, calib):
    plan = make_plan(tiny, calib, sparsity=0.45, gamma=1.5)
    data = plan.to_dict()
    data["keep"]["neuron"][1] = [0, 500]
    with pytest.raises(ValueError, match="layer 1"):
        PruningPlan.from_dict(data)
    data = plan.to_dict()
    data["width_before"]["neuron"] = [plan.mlp_dim_before[0], 999]
    bad = PruningPlan.from_dict(data)
    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    with pytest.raises(ValueError, match="plan layer 1"):
        cut(tiny, bad)
    assert all(torch.equal(v, state[k]) for k, v in tiny.state_dict().items())


@pytest.mark.parametrize("kw,match", [
    ({"sparsity": 1.0}, "sparsity=1.0"), ({"sparsity": -0.2}, "sparsity=-0.2"),
    ({"sparsity": 0.3, "gamma": 0.0}, "gamma=0.0"), ({"sparsity": 0.3, "gamma": -2}, "gamma=-2"),
    ({"sparsity": 0.3, "criterion": "wanda"}, "criterion='wanda'"),
    ({"sparsity": None}, r"exactly one of target\.sparsity and target\.param_budget"),
])
def test_bad_input_leaves_model_untouched(tiny, calib, kw, match):
    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    with pytest.raises(ConfigError, match=match):
        prune(tiny, calib, **kw)
    assert all(torch.equal(v, state[k]) for k, v in tiny.state_dict().items())


def test_nan_saliency_is_rejected_before_any_cut(tiny, calib):
    _, mlp = projections(get_family(tiny).layers()[1])
    with torch.no_grad():
        mlp.up.weight[3, 0] = float("nan")
    shapes = {k: v.shape for k, v in tiny.state_dict().items()}
    with pytest.raises(FloatingPointError, match="layer"):
        prune(tiny, None, sparsity=0.3, criterion="magnitude")
    assert {k: v.shape for k, v in tiny.state_dict().items()} == shapes


def test_param_budget_target(tiny, calib):
    total = count_parameters(tiny)["total"]
    budget = total - count_parameters(tiny)["block"] // 3
    plan = prune(tiny, calib, param_budget=budget, gamma=1.0, round_to=1)
    assert count_parameters(tiny)["total"] >= budget  # flooring removes at most the requested amount
    assert plan.provenance["sparsity"] == pytest.approx(1 / 3, rel=1e-6)


def test_bf16_model_is_scored_in_float32_and_stays_bf16(family, calib):
    """float32 scoring of a bf16 model equals scoring an fp32 copy exactly, and never converts the model."""
    from nirvana_lightning.debug_models import build_tiny_model
    from nirvana_lightning.families import get_family
    from nirvana_lightning.pruning.gradients import compute_unit_scores

    model = build_tiny_model(family).to(torch.bfloat16)
    reference = build_tiny_model(family).to(torch.bfloat16).float()
    seen = []  # parameter dtypes of the whole model at every layer call, forward and backward recompute
    hooks = [layer.register_forward_pre_hook(lambda *_: seen.append({p.dtype for p in model.parameters()}))
             for layer in get_family(model).layers()]
    for criterion in ("nirvana", "taylor"):
        for kwargs in ({}, {"micro_batch_size": 2}, {"micro_batch_size": 2, "accumulate": "saliency"},
                       {"lean": False, "checkpointing": False, "head_chunk": None}):
            got = compute_unit_scores(model, calib, criterion=criterion, compute_dtype=torch.float32, **kwargs)
            want = compute_unit_scores(reference, calib, criterion=criterion, **kwargs)
            for a, b in zip(got.by_kind["kv_group"] + got.by_kind["neuron"], want.by_kind["kv_group"] + want.by_kind["neuron"]):
                assert torch.equal(a, b), (criterion, kwargs)
    for h in hooks:
        h.remove()
    assert seen and all(s == {torch.bfloat16} for s in seen)
    plan = prune(model, calib, sparsity=0.3, gamma=1.0)
    assert plan.provenance["scoring_dtype"] == "float32"
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert plan.fingerprint() == make_plan(build_tiny_model(family).to(torch.bfloat16).float(), calib,
                                           sparsity=0.3, gamma=1.0).fingerprint()


def test_out_of_memory_half_way_leaves_the_model_untouched(family, calib):
    """An error in the middle of float32 scoring (e.g. CUDA OOM in layer 1) leaves weights, dtypes and hooks as before."""
    from nirvana_lightning.debug_models import build_tiny_model
    from nirvana_lightning.families import get_family

    model = build_tiny_model(family).to(torch.bfloat16)
    before = {n: (p.clone(), p.requires_grad) for n, p in model.named_parameters()}

    def explode(*_):  # the last layer, after the others have made their float32 copies
        raise torch.OutOfMemoryError("injected: CUDA out of memory")

    handle = get_family(model).layers()[-1].register_forward_pre_hook(explode)
    with pytest.raises(torch.OutOfMemoryError, match="injected"):
        prune(model, calib, sparsity=0.3, gamma=1.0)
    handle.remove()
    for n, p in model.named_parameters():
        assert p.dtype == torch.bfloat16 and p.grad is None and p.requires_grad == before[n][1], n
        assert torch.equal(p, before[n][0]), n
    assert not any("forward" in m.__dict__ for m in model.modules())  # every wrapper removed
    assert torch.equal(model(input_ids=calib).logits,
                       build_tiny_model(family).to(torch.bfloat16)(input_ids=calib).logits)


def test_scoring_upcast_leaves_buffers_alone(family, calib):
    from nirvana_lightning.loading import load_model

    model, _ = load_model(family, dtype="bfloat16")
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    assert any(b.dtype == torch.float32 for b in buffers.values())  # RoPE inv_freq stays fp32 in a bf16 model
    prune(model, calib, sparsity=0.3, gamma=1.0)
    for n, b in model.named_buffers():
        assert b.dtype == buffers[n].dtype and torch.equal(b, buffers[n]), n


def test_offloaded_scoring_equals_scoring_in_place(family, calib):
    """compute_device runs every module on per-layer copies (the offload path); on the model's own device it must
    give exactly the scores of the ordinary pass, for every criterion and accumulation mode."""
    from nirvana_lightning.debug_models import build_tiny_model
    from nirvana_lightning.pruning.gradients import compute_unit_scores

    model = build_tiny_model(family)
    for criterion in ("nirvana", "taylor", "magnitude"):
        for kwargs in ({}, {"micro_batch_size": 2, "accumulate": "saliency"}, {"micro_batch_size": 2},
                       {"lean": False, "checkpointing": False, "head_chunk": None}, {"functional": "max_over_vocab"}):
            if criterion != "nirvana" and "functional" in kwargs:
                continue
            want = compute_unit_scores(model, calib, criterion=criterion, **kwargs)
            got = compute_unit_scores(model, calib, criterion=criterion, compute_device="cpu:0", **kwargs)
            for a, b in zip(got.by_kind["kv_group"] + got.by_kind["neuron"], want.by_kind["kv_group"] + want.by_kind["neuron"]):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=0), (criterion, kwargs)
    plan = prune(model, calib, sparsity=0.3, gamma=1.0, scoring_device="cpu:0")
    assert plan.provenance["scoring_device"] == "cpu:0"

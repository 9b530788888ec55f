"""Saliency: pure functions on small tensors, and the scoring pass against a straightforward computation."""

import pytest
import torch
from conftest import build_tiny_model
from projections import projections

from nirvana_lightning.errors import ConfigError
from nirvana_lightning.families import get_family
from nirvana_lightning.pruning import (
    compute_output_functional,
    compute_unit_scores,
    compute_weight_saliency,
    reduce_attention_scores,
    reduce_mlp_scores,
)
from nirvana_lightning.pruning.saliency import check_finite


def test_functionals_on_a_small_tensor():
    z = torch.tensor([[[1.0, 5.0], [3.0, 2.0]]])  # (B=1, T=2, V=2)
    assert compute_output_functional(z, "max_over_seq").item() == pytest.approx((3.0 + 5.0) / 2)
    assert compute_output_functional(z, "max_over_vocab").item() == pytest.approx((5.0 + 3.0) / 2)
    assert compute_output_functional(z, "sum_logits").item() == pytest.approx(11.0)
    with pytest.raises(ValueError, match="functional"):
        compute_output_functional(z, "nope")


def test_weight_saliency_is_abs_product_in_float32():
    w = torch.tensor([1.0, -2.0, 3.0, 0.5, -1.0], dtype=torch.bfloat16)
    g = torch.tensor([-1.0, 1.0, 0.0, 2.0, 4.0], dtype=torch.bfloat16)
    s = compute_weight_saliency(w, g)
    assert s.dtype == torch.float32 and s.tolist() == [1.0, 2.0, 0.0, 1.0, 4.0]
    assert compute_weight_saliency(w, None).tolist() == [1.0, 2.0, 3.0, 0.5, 1.0]


def test_group_and_neuron_reduction_layout():
    # 2 KV groups, g=2, d=1, hidden 3: q rows [0,1] belong to group 0, rows [2,3] to group 1
    q = torch.tensor([[1.0] * 3, [1.0] * 3, [2.0] * 3, [2.0] * 3])
    k = torch.tensor([[1.0] * 3, [5.0] * 3])
    v = torch.zeros(2, 3)
    o = torch.tensor([[1.0, 1.0, 0.0, 0.0]] * 3)  # columns of group 0
    scores = reduce_attention_scores(q, k, v, o, n_kv_group=2)
    assert scores.tolist() == [6 + 3 + 6, 12 + 15]
    gate, up = torch.eye(2), 2 * torch.eye(2)
    down = torch.tensor([[1.0, 0.0], [1.0, 4.0]])  # (hidden, mlp): column j is neuron j
    assert reduce_mlp_scores(gate, up, down).tolist() == [1 + 2 + 2, 1 + 2 + 4]


def test_non_finite_scores_name_the_layer():
    with pytest.raises(FloatingPointError, match="layer 1"):
        check_finite([torch.ones(2), torch.tensor([1.0, float("nan")])], "MLP")


def _straightforward_scores(model, ids, loss_fn):
    """Independent reference: autograd on the full model, then sum |w * grad| over each unit by hand."""
    family = get_family(model)
    model.zero_grad(set_to_none=True)
    loss_fn(model, ids).backward()
    g, d = family.n_query_per_kv, family.head_dim
    attn, mlp = [], []
    for layer in family.layers():
        a, m = projections(layer)
        sal = {n: (p.weight * p.grad).abs() for n, p in
               (("q", a.q), ("k", a.k), ("v", a.v), ("o", a.o), ("gate", m.gate), ("up", m.up), ("down", m.down))}
        n_group = a.k.weight.shape[0] // d
        attn.append(torch.stack([
            sal["q"][h * g * d:(h + 1) * g * d].sum() + sal["k"][h * d:(h + 1) * d].sum()
            + sal["v"][h * d:(h + 1) * d].sum() + sal["o"][:, h * g * d:(h + 1) * g * d].sum()
            for h in range(n_group)]))
        mlp.append(torch.stack([sal["gate"][j].sum() + sal["up"][j].sum() + sal["down"][:, j].sum()
                                for j in range(m.gate.weight.shape[0])]))
    model.zero_grad(set_to_none=True)
    return attn, mlp


def _straightforward_head_scores(model, ids, loss_fn):
    """Independent reference at query_head granularity: a query head owns its d q rows and d o columns, a KV group
    its k and v rows."""
    family = get_family(model)
    model.zero_grad(set_to_none=True)
    loss_fn(model, ids).backward()
    d = family.head_dim
    groups, heads = [], []
    for layer in family.layers():
        a, _ = projections(layer)
        sal = {n: (p.weight * p.grad).abs() for n, p in (("q", a.q), ("k", a.k), ("v", a.v), ("o", a.o))}
        groups.append(torch.stack([sal["k"][h * d:(h + 1) * d].sum() + sal["v"][h * d:(h + 1) * d].sum()
                                   for h in range(a.k.weight.shape[0] // d)]))
        heads.append(torch.stack([sal["q"][j * d:(j + 1) * d].sum() + sal["o"][:, j * d:(j + 1) * d].sum()
                                  for j in range(a.q.weight.shape[0] // d)]))
    model.zero_grad(set_to_none=True)
    return groups, heads


def _assert_close(got, want, rtol=1e-5):
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b.detach().float(), rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("functional", ["max_over_seq", "max_over_vocab", "sum_logits"])
def test_unit_scores_equal_straightforward_computation(tiny, calib, functional):
    ref = _straightforward_scores(tiny, calib,
                                  lambda m, x: compute_output_functional(m(input_ids=x).logits, functional))
    for lean, ckpt, chunk in ((True, True, 100), (False, False, None), (True, False, None)):
        got = compute_unit_scores(tiny, calib, functional=functional, lean=lean, checkpointing=ckpt, head_chunk=chunk)
        _assert_close(got.by_kind["kv_group"], ref[0])
        _assert_close(got.by_kind["neuron"], ref[1])


def test_taylor_uses_the_loss_gradient(tiny, calib):
    ref = _straightforward_scores(tiny, calib, lambda m, x: m(input_ids=x, labels=x).loss)
    got = compute_unit_scores(tiny, calib, criterion="taylor")
    _assert_close(got.by_kind["neuron"], ref[1])
    _assert_close(got.by_kind["kv_group"], ref[0])


def test_micro_batches_gradient_mode_is_exact_and_saliency_mode_bounds_it(tiny, calib):
    whole = compute_unit_scores(tiny, calib)
    exact = compute_unit_scores(tiny, calib, micro_batch_size=2, accumulate="gradient")
    _assert_close(exact.by_kind["neuron"], whole.by_kind["neuron"])
    _assert_close(exact.by_kind["kv_group"], whole.by_kind["kv_group"])
    upper = compute_unit_scores(tiny, calib, micro_batch_size=2, accumulate="saliency")
    for u, w in zip(upper.by_kind["neuron"] + upper.by_kind["kv_group"], whole.by_kind["neuron"] + whole.by_kind["kv_group"]):
        assert (u >= w * (1 - 1e-5)).all()  # triangle inequality: |sum| <= sum |.|


def test_scoring_leaves_model_state_alone(tiny, calib):
    before = {n: p.detach().clone() for n, p in tiny.named_parameters()}
    flags = {n: p.requires_grad for n, p in tiny.named_parameters()}
    compute_unit_scores(tiny, calib)
    for n, p in tiny.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None and p.requires_grad == flags[n]


def test_magnitude_and_random(tiny):
    mag = compute_unit_scores(tiny, None, criterion="magnitude")
    layer = get_family(tiny).layers()[0]
    _, m = projections(layer)
    expected = m.gate.weight.abs().sum(1) + m.up.weight.abs().sum(1) + m.down.weight.abs().sum(0)
    torch.testing.assert_close(mag.by_kind["neuron"][0], expected.detach())
    r1 = compute_unit_scores(tiny, None, criterion="random", seed=3)
    r2 = compute_unit_scores(tiny, None, criterion="random", seed=3)
    assert all(torch.equal(a, b) for a, b in zip(r1.by_kind["neuron"], r2.by_kind["neuron"]))


def test_bad_calibration_input(tiny):
    with pytest.raises(ConfigError, match="calibration"):
        compute_unit_scores(tiny, torch.rand(2, 8))
    with pytest.raises(ConfigError, match="criterion"):
        compute_unit_scores(tiny, torch.zeros(2, 8, dtype=torch.long), criterion="fisher")


def test_checkpointing_restores_an_existing_instance_forward(tiny, calib):
    layer = get_family(tiny).layers()[0]
    calls = []
    original = layer.forward

    def wrapped(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    layer.forward = wrapped  # as accelerate's hooks do
    compute_unit_scores(tiny, calib, checkpointing=True)
    assert layer.__dict__["forward"] is wrapped
    n = len(calls)
    tiny(input_ids=calib)
    assert len(calls) == n + 1


def _captured_inputs(model, calib):
    """Every block linear's input over all calibration tokens, (tokens, in_features) in float64."""
    family = get_family(model)
    seen = {}
    handles = [lin.register_forward_hook(lambda m, i, o, _k=(li, role): seen.setdefault(_k, []).append(i[0].detach()))
               for li, role, lin in family.block_linears()]
    with torch.no_grad():
        model(input_ids=calib)
    for h in handles:
        h.remove()
    return {k: torch.cat([x.reshape(-1, x.shape[-1]) for x in v]).double() for k, v in seen.items()}


@pytest.mark.parametrize("criterion", ["wanda_sp", "flap"])
def test_activation_baselines_equal_a_straightforward_computation(family, calib, criterion):
    """Over a unit's input channels of o_proj / down_proj (q/k/v/gate/up add nothing, as in FLAP's code): wanda_sp
    sums |W_ij| * ||X_j||, flap sums Var(X_j) * W_ij^2. Loops over units, no reshapes."""
    from nirvana_lightning.debug_models import build_tiny_model

    model = build_tiny_model(family)
    family = get_family(model)
    inputs = _captured_inputs(model, calib)
    got = compute_unit_scores(model, calib, criterion=criterion, micro_batch_size=3)
    g, d = family.n_query_per_kv, family.head_dim
    for li, layer in enumerate(family.layers()):
        attn, mlp = projections(layer)
        n_group, _, n_neuron = family.layer_widths(layer)

        def w_score(role, lin, rows=None, cols=None, _li=li):
            if role not in ("o", "down"):
                return 0.0
            x = inputs[(_li, role)]
            w = lin.weight.detach().double()
            if criterion == "wanda_sp":
                s = w.abs() * x.pow(2).sum(0).sqrt()[None, :]
            else:
                s = w.pow(2) * x.var(0, unbiased=False)[None, :]
            s = s[rows] if rows is not None else s
            s = s[:, cols] if cols is not None else s
            return float(s.sum())

        for h in range(n_group):
            q_rows, kv_rows = slice(h * g * d, (h + 1) * g * d), slice(h * d, (h + 1) * d)
            want = (w_score("q", attn.q, rows=q_rows) + w_score("k", attn.k, rows=kv_rows)
                    + w_score("v", attn.v, rows=kv_rows) + w_score("o", attn.o, cols=q_rows))
            assert float(got.by_kind["kv_group"][li][h]) == pytest.approx(want, rel=1e-5), (li, h)
        for j in range(n_neuron):
            want = (w_score("gate", mlp.gate, rows=[j]) + w_score("up", mlp.up, rows=[j])
                    + w_score("down", mlp.down, cols=[j]))
            assert float(got.by_kind["neuron"][li][j]) == pytest.approx(want, rel=1e-5, abs=1e-12), (li, j)


def test_activation_baselines_prune_through_the_same_allocation(calib):
    from nirvana_lightning import prune
    from nirvana_lightning.debug_models import build_tiny_model

    for criterion in ("wanda_sp", "flap"):
        model = build_tiny_model("tiny-llama")
        plan = prune(model, calib, sparsity=0.4, gamma=2.0, criterion=criterion)
        assert plan.provenance["criterion"] == criterion and plan.realised_sparsity > 0.25
        with pytest.raises(ConfigError, match="calibration"):
            prune(build_tiny_model("tiny-llama"), None, sparsity=0.4, criterion=criterion)


def test_gemma3_soft_capping_is_in_the_scored_logits(calib):
    """The lean scorer applies the head itself, chunk by chunk: it must apply Gemma's final-logit soft-cap as the
    model's forward does (equal to autograd through the model's own logits), and the cap changes the scores."""
    model = build_tiny_model("tiny-gemma3")
    assert model.config.final_logit_softcapping == 5.0
    ref = _straightforward_scores(model, calib, lambda m, x: compute_output_functional(m(input_ids=x).logits,
                                                                                       "max_over_seq"))
    capped = compute_unit_scores(model, calib, head_chunk=100)
    _assert_close(capped.by_kind["kv_group"], ref[0])
    _assert_close(capped.by_kind["neuron"], ref[1])
    model.config.final_logit_softcapping = None
    uncapped = compute_unit_scores(model, calib, head_chunk=100)
    assert not all(torch.allclose(a, b, rtol=1e-3) for a, b in zip(uncapped.by_kind["neuron"], capped.by_kind["neuron"]))


@pytest.mark.parametrize("functional", ["max_over_seq", "max_over_vocab"])
def test_query_head_scores_equal_straightforward_computation(tiny, calib, functional):
    """query_head granularity (soft-capped Gemma 3 included): head scores are the q rows + o columns of one head,
    group scores the k + v rows, neurons as before; the chunked head equals autograd through the full logits."""
    ref = _straightforward_head_scores(tiny, calib,
                                       lambda m, x: compute_output_functional(m(input_ids=x).logits, functional))
    got = compute_unit_scores(tiny, calib, functional=functional, head_chunk=100, granularity="query_head")
    assert got.granularity == "query_head"
    _assert_close(got.by_kind["kv_group"], ref[0])
    _assert_close(got.by_kind["q_head"], ref[1])
    group = compute_unit_scores(tiny, calib, functional=functional, head_chunk=100)
    _assert_close(got.by_kind["neuron"], group.by_kind["neuron"])
    for layer_groups, layer_heads, whole in zip(got.by_kind["kv_group"], got.by_kind["q_head"], group.by_kind["kv_group"]):  # the parts add up
        g = layer_heads.numel() // layer_groups.numel()
        torch.testing.assert_close(layer_groups + layer_heads.reshape(-1, g).sum(1), whole, rtol=1e-5, atol=1e-6)

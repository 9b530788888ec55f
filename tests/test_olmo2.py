"""OLMo-2: q/k norms over the full projection width own rows too, and masking renormalises over the kept rows, so
pruned equals masked exactly. The family also runs every family-parametrised test (tiny-olmo2 is in CAUSAL_TINY): the
contract, LoRA targets, prune == mask at both granularities, parameter counts, scores against a by-hand computation,
and the fresh-process export round trip with and without the package (tests/test_export.py)."""

import json

import pytest
import torch

from nirvana_lightning import ConfigError, count_parameters, make_plan, masked_units, prune
from nirvana_lightning.debug_models import build_tiny_model
from nirvana_lightning.export import load_pruned, save_pruned
from nirvana_lightning.families import get_family
from nirvana_lightning.pruning.surgery import kept_inputs

CALIB = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("granularity", ["group", "query_head"])
def test_norm_rows_go_with_their_heads_and_pruned_equals_masked(granularity):
    model = build_tiny_model("tiny-olmo2")
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    plan = make_plan(model, CALIB, sparsity=0.4, gamma=1.0, round_to=8, attention_granularity=granularity)
    assert len(set(plan.n_head_after)) > 1  # per-layer widths differ
    with torch.no_grad(), masked_units(model, plan):
        masked = model(input_ids=IDS).logits
    # zeroing the removed heads' o inputs alone is not the cut: the kept heads' norm statistic changes
    family = get_family(model)
    handles = []
    for i, layer in enumerate(family.layers()):
        for role, kept in kept_inputs(family, layer, plan, i).items():
            mask = kept.float()
            handles.append(family.projection(layer, role).register_forward_pre_hook(
                lambda _m, args, _mask=mask: (args[0] * _mask, *args[1:])))
    with torch.no_grad():
        zeroed_only = model(input_ids=IDS).logits
    for h in handles:
        h.remove()
    prune(model, CALIB, sparsity=0.4, gamma=1.0, round_to=8, attention_granularity=granularity)
    with torch.no_grad():
        pruned = model(input_ids=IDS).logits
    torch.testing.assert_close(pruned, masked, rtol=1e-5, atol=1e-5)
    assert (pruned - zeroed_only).abs().max() > 1e-3
    assert count_parameters(model)["block"] == plan.block_params_after
    d = 16
    for i, layer in enumerate(family.layers()):
        heads, groups = torch.tensor(plan.head_keep()[i]), torch.tensor(plan.attention_keep[i])
        rows = lambda units: (units[:, None] * d + torch.arange(d)).reshape(-1)  # noqa: E731
        assert torch.equal(layer.self_attn.q_norm.weight, dense[f"model.layers.{i}.self_attn.q_norm.weight"][rows(heads)])
        assert torch.equal(layer.self_attn.k_norm.weight, dense[f"model.layers.{i}.self_attn.k_norm.weight"][rows(groups)])
        assert layer.self_attn.q_norm.weight.numel() == layer.self_attn.q_proj.out_features


def test_export_reloads_and_serving_refuses_clearly(tmp_path):
    """Reload (in process here; tests/test_export.py reloads every family in a fresh one, with and without the
    package) rebuilds the norms at their cut widths; vLLM and llama.cpp have no per-layer-width OLMo-2 graph."""
    from nirvana_lightning.serving.gguf_export import save_gguf

    model = build_tiny_model("tiny-olmo2")
    plan = prune(model, CALIB, sparsity=0.4, gamma=1.0, round_to=8)
    save_pruned(model, None, tmp_path / "olmo2", plan)
    reloaded, _ = load_pruned(tmp_path / "olmo2")
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=IDS).logits, model(input_ids=IDS).logits)
    serving = json.loads((tmp_path / "olmo2" / "serving.json").read_text())
    assert serving["vllm"] is False and any("olmo2" in b and "vLLM" in b for b in serving["broken"])
    with pytest.raises(ConfigError, match="olmo2"):
        save_gguf(model, None, tmp_path / "olmo2.gguf", plan)

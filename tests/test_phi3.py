"""Phi-3: units own slices inside the fused qkv_proj and gate_up_proj (offsets), and each cut layer splits its qkv
at its own width. The family also runs every family-parametrised test (tiny-phi3 is in CAUSAL_TINY): the contract,
LoRA targets, prune == mask at both granularities, parameter counts, scores against a by-hand computation, and the
fresh-process export round trip with and without the package (tests/test_export.py)."""

import json

import pytest
import torch

from nirvana_lightning import ConfigError, count_parameters, make_plan, masked_units, prune
from nirvana_lightning.debug_models import build_tiny_model
from nirvana_lightning.export import load_pruned, save_pruned
from nirvana_lightning.families import get_family

CALIB = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))


def test_units_own_offsets_inside_the_fused_weights():
    model = build_tiny_model("tiny-phi3")
    family = get_family(model)
    kinds = family.unit_kinds(family.layers()[0], "group")
    d, n_q, n_kv, n_mlp = 16, 4, 2, 128
    assert [(o.role, o.block, o.offset) for o in kinds["kv_group"].owns] == [
        ("qkv", 2 * d, 0), ("qkv", d, n_q * d), ("qkv", d, (n_q + n_kv) * d), ("o", 2 * d, 0)]
    assert [(o.role, o.offset) for o in kinds["neuron"].owns] == [("gate_up", 0), ("gate_up", n_mlp), ("down", 0)]
    assert family.lora_target_modules() == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    # every block weight is counted once (q, k and v share one module)
    assert count_parameters(model)["block"] == 2 * 64 * (4 * 16 + 2 * 2 * 16 + 4 * 16 + 3 * 128)


@pytest.mark.parametrize("granularity", ["group", "query_head"])
def test_pruned_equals_masked_and_rows_come_from_each_part(granularity):
    """The cut keeps, inside qkv, the q rows of the kept heads, then the k and the v rows of the kept groups; inside
    gate_up the gate and the up rows of the kept neurons; the pruned model computes what the masked one does."""
    model = build_tiny_model("tiny-phi3")
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    plan = make_plan(model, CALIB, sparsity=0.4, gamma=1.0, round_to=8, attention_granularity=granularity)
    with torch.no_grad(), masked_units(model, plan):
        masked = model(input_ids=IDS).logits
    prune(model, CALIB, sparsity=0.4, gamma=1.0, round_to=8, attention_granularity=granularity)
    assert plan.n_head_after != [4, 4] and len(set(plan.n_head_after)) > 1  # per-layer widths differ
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, masked, rtol=1e-5, atol=1e-5)
    assert count_parameters(model)["block"] == plan.block_params_after
    d = 16
    for i, layer in enumerate(get_family(model).layers()):
        qkv, gate_up = dense[f"model.layers.{i}.self_attn.qkv_proj.weight"], dense[f"model.layers.{i}.mlp.gate_up_proj.weight"]
        heads = torch.tensor(plan.head_keep()[i])
        groups = torch.tensor(plan.attention_keep[i])
        rows = lambda units, start: (start + units[:, None] * d + torch.arange(d)).reshape(-1)  # noqa: E731
        want = torch.cat([qkv[rows(heads, 0)], qkv[rows(groups, 4 * d)], qkv[rows(groups, 6 * d)]])
        assert torch.equal(layer.self_attn.qkv_proj.weight, want)
        neurons = torch.tensor(plan.mlp_keep[i])
        assert torch.equal(layer.mlp.gate_up_proj.weight, torch.cat([gate_up[neurons], gate_up[128 + neurons]]))
        # the layer's attention splits qkv at its own query width; the model's config is untouched
        assert layer.self_attn.config.num_attention_heads == plan.n_head_after[i]
        assert layer.self_attn.config is not model.config
    assert model.config.nirvana_layer_widths["num_attention_heads"] == plan.n_head_after


def test_export_reloads_and_serving_refuses_clearly(tmp_path):
    """Reload (in process here; tests/test_export.py reloads every family in a fresh one, with and without the
    package); vLLM and llama.cpp have no per-layer-width Phi-3 graph: serving.json says so, save_gguf refuses."""
    from nirvana_lightning.serving.gguf_export import save_gguf

    model = build_tiny_model("tiny-phi3")
    plan = prune(model, CALIB, sparsity=0.4, gamma=1.0, round_to=8)
    save_pruned(model, None, tmp_path / "phi3", plan)
    reloaded, _ = load_pruned(tmp_path / "phi3")
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=IDS).logits, model(input_ids=IDS).logits)
    serving = json.loads((tmp_path / "phi3" / "serving.json").read_text())
    assert serving["vllm"] is False and any("phi3" in b and "vLLM" in b for b in serving["broken"])
    with pytest.raises(ConfigError, match="phi3"):
        save_gguf(model, None, tmp_path / "phi3.gguf", plan)

"""Files written by nirvana-lightning 0.1 and 0.2 still load and cut the same units.

``tests/data/v0.1`` was written by the 0.1 code (commit d3605f2) from ``configs/debug/tiny.yaml`` of that commit,
with LoRA recovery (r=4), sparsity 0.4, gamma 2 and 2 training steps:
``plan.json`` (format ``nirvana-lightning/plan/v1``) and ``tiny-llama-lora.ckpt`` (``last.ckpt``: the plan and the
LoRA adapters, the frozen base omitted).
"""

import json
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model

from nirvana_lightning import NirvanaModule, PruningPlan, cut, masked_units
from nirvana_lightning.families import get_family
from nirvana_lightning.io import load_checkpoint
from nirvana_lightning.pruning.surgery import model_identity

DATA = Path(__file__).resolve().parent / "data" / "v0.1"


def _v1_plan() -> PruningPlan:
    """The v1 file, read into a v2 plan with the same units and 0.1's parameter arithmetic."""
    raw = json.loads((DATA / "plan.json").read_text(encoding="utf-8"))
    assert raw["format"] == "nirvana-lightning/plan/v1" and raw["provenance"]["versions"]["nirvana-lightning"] == "0.1.0"
    plan = PruningPlan.from_dict(raw)
    assert plan.format == "nirvana-lightning/plan/v3" and plan.granularity == "group"
    assert plan.attention_keep == raw["attention_keep"] and plan.mlp_keep == raw["mlp_keep"]
    g, d, hidden = raw["n_query_per_kv"], raw["head_dim"], raw["hidden_dim"]
    v1_params = sum(2 * (g + 1) * d * hidden * len(a) + 3 * hidden * len(m)
                    for a, m in zip(raw["attention_keep"], raw["mlp_keep"]))
    assert plan.block_params_after == v1_params
    assert abs(plan.realised_sparsity - raw["provenance"]["realised_sparsity"]) < 1e-12
    return plan


def test_a_v1_plan_cuts_the_units_it_names():
    plan = _v1_plan()
    dense = build_tiny_model("tiny-llama", vocab_size=49152)  # the debug model as 0.1 built it (seed 0)
    probe = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), masked_units(dense, plan):
        masked = dense(input_ids=probe).logits
    d, g = plan.head_dim, plan.n_query_per_kv
    before = {n: p.detach().clone() for n, p in dense.named_parameters()}
    cut(dense, plan)
    for i, (groups, neurons) in enumerate(zip(plan.attention_keep, plan.mlp_keep)):
        layer = dense.model.layers[i]
        rows = torch.cat([torch.arange(k * d, (k + 1) * d) for k in groups])
        q_rows = torch.cat([torch.arange(k * g * d, (k + 1) * g * d) for k in groups])
        prefix = f"model.layers.{i}."
        assert torch.equal(layer.self_attn.k_proj.weight, before[prefix + "self_attn.k_proj.weight"][rows])
        assert torch.equal(layer.self_attn.q_proj.weight, before[prefix + "self_attn.q_proj.weight"][q_rows])
        assert torch.equal(layer.mlp.down_proj.weight, before[prefix + "mlp.down_proj.weight"][:, neurons])
    with torch.no_grad():
        assert torch.equal(dense(input_ids=probe).logits, masked)


def test_a_v1_lora_checkpoint_loads_with_its_plan_and_adapters():
    """The 0.1 checkpoint (plan + adapters, base omitted) rebuilds the pruned model with its trained adapters."""
    plan = _v1_plan()
    saved = load_checkpoint(DATA / "tiny-llama-lora.ckpt")
    assert PruningPlan.from_dict(saved[NirvanaModule.PLAN_KEY]).fingerprint() == plan.fingerprint()
    assert saved[NirvanaModule.BASE_OMITTED_KEY] > 0
    module = NirvanaModule.load_from_checkpoint(DATA / "tiny-llama-lora.ckpt", weights_only=True)
    assert module.pruning_plan.fingerprint() == plan.fingerprint()
    state = module.state_dict()
    lora = [k for k in saved["state_dict"] if "lora_" in k]
    assert lora and all(torch.equal(state[k], saved["state_dict"][k]) for k in lora)
    base = module.base_model
    assert [layer.self_attn.k_proj.weight.shape[0] // plan.head_dim for layer in base.model.layers] \
        == plan.n_kv_group_after
    assert [layer.mlp.gate_proj.weight.shape[0] for layer in base.model.layers] == plan.mlp_dim_after


@pytest.mark.parametrize("fixture", sorted(p.name for p in (Path(__file__).parent / "data" / "v0.2").glob("plan-*.json")))
def test_a_v2_plan_reads_as_v3_and_cuts_the_units_it_names(fixture):
    """0.2's plans (kinds named self_attn / q_head / cross_attn / mlp, written by 0.2 at 1f15740 for the tiny models)
    load under the new kind names, keep the fingerprint they had, cut exactly the units they list, and the cut model
    equals the masked one."""
    raw = json.loads((Path(__file__).parent / "data" / "v0.2" / fixture).read_text())
    assert raw["format"] == "nirvana-lightning/plan/v2"
    plan = PruningPlan.from_dict(raw)
    renamed = {"self_attn": "kv_group", "q_head": "q_head", "cross_attn": "cross_head", "mlp": "neuron"}
    assert plan.format == "nirvana-lightning/plan/v3"
    assert plan.keep == {renamed[k]: v for k, v in raw["keep"].items()}
    assert plan.granularity == raw["provenance"]["attention_granularity"]
    name = fixture.split("-", 1)[1].rsplit("-", 1)[0]
    model = build_tiny_model(name)
    assert model_identity(model) == raw["provenance"]["model_identity"]
    spec = get_family(model)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    kwargs, _ = spec.model_inputs(ids)
    with torch.no_grad(), masked_units(model, plan):
        masked = model(**kwargs).logits
    cut(model, plan)
    for i, layer in enumerate(spec.layers()):
        kinds = spec.unit_kinds(layer, plan.granularity)
        assert {k: kinds[k].n_units for k in kinds} == {k: len(plan.keep[k][i]) for k in kinds}
    assert plan.realised_sparsity == pytest.approx(raw["provenance"]["realised_sparsity"])
    with torch.no_grad():
        torch.testing.assert_close(model(**kwargs).logits, masked, rtol=1e-4, atol=1e-4)

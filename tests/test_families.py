"""The family spec, checked against a tiny random model of every family."""

import pytest
import torch
from projections import projections

from nirvana_lightning.errors import ConfigError
from nirvana_lightning.families import FAMILIES, ROLES, get_family
from nirvana_lightning.recovery import apply_recovery


def test_contract(tiny):
    family = get_family(tiny)
    cfg = tiny.config
    assert cfg.num_hidden_layers == len(family.layers())
    assert family.head_dim == cfg.head_dim  # read from the config, never hidden/heads
    assert family.n_kv_head < family.n_head  # GQA on in every fixture
    g, d, hidden = family.n_query_per_kv, family.head_dim, family.hidden_dim
    for layer in family.layers():
        a, m = projections(layer)
        assert a.q.weight.shape == (family.n_head * d, hidden)
        assert a.k.weight.shape == a.v.weight.shape == (family.n_kv_head * d, hidden)
        assert a.o.weight.shape == (hidden, family.n_kv_head * g * d)
        assert m.gate.weight.shape == m.up.weight.shape == (cfg.intermediate_size, hidden)
        assert m.down.weight.shape == (hidden, cfg.intermediate_size)
        assert family.layer_widths(layer) == (family.n_kv_head, family.n_head, cfg.intermediate_size)
    # every block weight once (a fused module counts once)
    parts = [p.weight.numel() for layer in family.layers() for ns in projections(layer) for p in vars(ns).values()]
    assert sum(lin.weight.numel() for _, _, lin in family.block_linears()) == sum(parts)
    assert family.lm_head().weight.shape[0] == cfg.vocab_size
    assert family.body()(input_ids=torch.zeros(1, 3, dtype=torch.long)).last_hidden_state.shape == (1, 3, hidden)


def test_qwen3_head_dim_differs_from_hidden_over_heads():
    from nirvana_lightning.debug_models import build_tiny_model

    family = get_family(build_tiny_model("tiny-qwen3"))
    assert family.head_dim == 32 != family.hidden_dim // family.n_head


def test_lora_targets_exist_for_each_family(tiny):
    names = get_family(tiny).lora_target_modules(ROLES)
    leaf_names = {n.rsplit(".", 1)[-1] for n, _ in tiny.named_modules()}
    assert set(names) <= leaf_names
    wrapped = apply_recovery(tiny, "lora", lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_targets=list(ROLES))
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    for role_name in names:
        assert any(f"{role_name}.lora_A" in n for n in trainable), role_name


def test_recovery_modes(tiny):
    full = apply_recovery(tiny, "full")
    assert all(p.requires_grad for p in full.parameters())
    none = apply_recovery(tiny, "none")
    assert not any(p.requires_grad for p in none.parameters())
    with pytest.raises(ConfigError, match="model.recovery='qlora'"):
        apply_recovery(tiny, "qlora")
    with pytest.raises(ConfigError, match="recovery.lora_targets='attn'"):
        get_family(tiny).lora_target_modules(["attn"])


def test_unknown_family_lists_supported():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(ConfigError, match="model_type='gpt2'.*'llama'.*'mistral'.*'qwen2'.*'qwen3'"):
        get_family(model)
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma3_text", "t5"} <= set(FAMILIES)  # a new family is a new file
    assert all(name.startswith("tiny-") for cls in FAMILIES.values() for name in cls.tiny_models)


def test_a_llama_like_family_is_one_file(tmp_path, granularity):
    """What a new family's file holds (here SmolLM3: Llama layout, RoPE skipped in some layers) is all it takes:
    the class registers itself, its debug model builds, it prunes at both granularities (pruned = masked,
    parameters = plan), and its export reloads through the pruned class made from the stock one."""
    from nirvana_lightning import cut, load_pruned, make_plan, masked_units, save_pruned
    from nirvana_lightning.debug_models import build_tiny_model
    from nirvana_lightning.families.base import ModelFamily

    class SmolLM3Family(ModelFamily):  # the whole file: nirvana_lightning/families/smollm3.py
        model_types = ("smollm3",)
        tiny_models = {"tiny-smollm3": {"no_rope_layers": [1, 0], "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}}

    try:
        model = build_tiny_model("tiny-smollm3")
        assert isinstance(get_family(model), SmolLM3Family)
        ids = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(0))
        plan = make_plan(model, ids, sparsity=0.4, gamma=1.5, attention_granularity=granularity)
        with torch.no_grad(), masked_units(model, plan):
            masked = model(input_ids=ids).logits
        block = sum(lin.weight.numel() for _, _, lin in get_family(model).block_linears())
        cut(model, plan)
        assert sum(lin.weight.numel() for _, _, lin in get_family(model).block_linears()) == plan.block_params_after < block
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, masked, rtol=0, atol=1e-5)
        save_pruned(model, None, tmp_path / "export", plan)
        reloaded, _ = load_pruned(tmp_path / "export")
        assert type(reloaded).__name__ == "NirvanaSmolLM3ForCausalLM"
        with torch.no_grad():
            assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
    finally:
        del ModelFamily.registry["smollm3"]


def test_prune_asks_the_family_spec_once(monkeypatch, granularity):
    """From the calibration to the cut (scoring, allocation, plan, surgery, counts), prune() builds the family spec
    once and every step reads that one."""
    from nirvana_lightning import prune
    from nirvana_lightning.debug_models import build_tiny_model
    from nirvana_lightning.families.base import ModelFamily

    model = build_tiny_model("tiny-gemma3")
    built = []
    original = ModelFamily.__init__
    monkeypatch.setattr(ModelFamily, "__init__", lambda self, m: (built.append(type(self)), original(self, m))[1])
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    plan = prune(model, ids, sparsity=0.3, gamma=1.5, attention_granularity=granularity)
    assert plan.realised_sparsity > 0.1 and len(built) == 1, built

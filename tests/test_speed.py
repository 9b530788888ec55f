"""Parameter counts, analytic FLOPs and throughput measurement (eval/speed.py) on tiny models."""

from __future__ import annotations

import math

import pytest
import torch

from nirvana_lightning import count_parameters, prune
from nirvana_lightning.debug_models import build_tiny_model
from nirvana_lightning.eval.speed import (
    _decode_greedy,
    count_parameters_detailed,
    flops_per_token,
    kv_cache_bytes,
    measure_throughput,
)
from nirvana_lightning.recovery.setup import apply_recovery

ROLE_SUFFIXES = tuple(f"{r}_proj.weight" for r in ("q", "k", "v", "o", "gate", "up", "down"))


def hand_counts(model) -> dict[str, int]:
    """Counts from named_parameters (which yields a tied tensor once, under its first name)."""
    named = dict(model.named_parameters())
    total = sum(p.numel() for p in named.values())
    embeddings = sum(p.numel() for n, p in named.items() if "embed_tokens" in n or n.startswith("lm_head"))
    block = sum(p.numel() for n, p in named.items() if n.endswith(ROLE_SUFFIXES))
    return {"total": total, "embeddings": embeddings, "non_embedding": total - embeddings, "block": block}


@pytest.mark.parametrize("tied", [False, True])
def test_counts_match_hand_sum(family, tied):
    model = build_tiny_model(family, tie_word_embeddings=tied)
    counts = count_parameters_detailed(model)
    assert counts == hand_counts(model)
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    assert counts["embeddings"] == vocab * hidden * (1 if tied else 2)
    assert counts["total"] == count_parameters(model)["total"]


def dense_attention_flops(model, seq_len: int) -> float:
    c = model.config
    return c.num_hidden_layers * 4 * c.num_attention_heads * c.head_dim * (seq_len + 1) / 2


def test_flops_identities_and_pruning_drop(tiny):
    seq_len = 32
    vocab, hidden = tiny.config.vocab_size, tiny.config.hidden_size
    before = flops_per_token(tiny, seq_len)
    block_before = count_parameters(tiny)["block"]
    assert before["linear"] == 2 * block_before
    assert before["lm_head"] == 2 * vocab * hidden
    assert before["attention"] == dense_attention_flops(tiny, seq_len)
    assert before["total"] == before["linear"] + before["attention"] + before["lm_head"]

    plan = prune(tiny, None, sparsity=0.5, criterion="magnitude")
    after = flops_per_token(tiny, seq_len)
    block_after = count_parameters(tiny)["block"]
    assert block_after == plan.block_params_after < block_before
    # linear FLOPs drop by exactly 2 x the removed block weights; the head is untouched
    assert before["linear"] - after["linear"] == 2 * (block_before - block_after)
    assert after["lm_head"] == before["lm_head"]
    g, head_dim = plan.n_query_per_kv, plan.head_dim
    assert after["attention"] == sum(4 * n * g * head_dim * (seq_len + 1) / 2 for n in plan.n_kv_group_after)
    counts = count_parameters_detailed(tiny)
    assert counts == hand_counts(tiny)
    assert counts["block"] == plan.block_params_after


def test_peft_wrapped_counts_like_base(family):
    model = build_tiny_model(family)
    counts, flops = count_parameters_detailed(model), flops_per_token(model, 16)
    wrapped = apply_recovery(model, "lora", lora_r=4)
    n_lora = sum(p.numel() for n, p in wrapped.named_parameters() if "lora_" in n)
    assert n_lora > 0
    wrapped_counts = count_parameters_detailed(wrapped)
    assert wrapped_counts["block"] == counts["block"]
    assert wrapped_counts["embeddings"] == counts["embeddings"]
    assert wrapped_counts["total"] == counts["total"] + n_lora
    assert flops_per_token(wrapped, 16) == flops


def test_decode_loop_equals_greedy_generate_on_pruned_model(tiny):
    prune(tiny, None, sparsity=0.5, criterion="magnitude")  # layers of different widths
    prompt = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ours = _decode_greedy(tiny, prompt, new_tokens=4)
        reference = tiny.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5,
                                  min_new_tokens=5, do_sample=False)[:, prompt.shape[1]:]
    assert torch.equal(ours, reference)


@pytest.mark.parametrize("pruned", [False, True])
def test_throughput_positive_finite_and_restores_mode(pruned):
    model = build_tiny_model("tiny-llama")
    if pruned:
        prune(model, None, sparsity=0.5, criterion="magnitude")
    model.train()
    result = measure_throughput(model, batch_size=2, seq_len=8, new_tokens=3, warmup=1, repeats=2)
    assert model.training
    for key in ("prefill_tokens_per_s", "prefill_seconds", "decode_tokens_per_s", "decode_seconds"):
        assert math.isfinite(result[key]) and result[key] > 0, key
    for key in ("peak_memory_bytes", "prefill_peak_memory_bytes", "decode_peak_memory_bytes"):
        assert result[key] is None, key  # measured on CUDA only
    k_dims = sum(layer.self_attn.k_proj.weight.shape[0] for layer in model.model.layers)
    assert result["kv_cache_bytes"] == 2 * 2 * (8 + 3) * k_dims * 4 == kv_cache_bytes(model, 2, 11)
    assert result["weights_bytes"] == 4 * count_parameters(model)["total"]
    assert result["dtype"] == "float32" and result["device"] == "cpu"


def test_throughput_peft_wrapped_and_prefill_only():
    model = apply_recovery(build_tiny_model("tiny-qwen3"), "lora", lora_r=4)
    result = measure_throughput(model, batch_size=1, seq_len=6, new_tokens=2, warmup=0, repeats=1)
    assert result["prefill_tokens_per_s"] > 0 and result["decode_tokens_per_s"] > 0
    result = measure_throughput(model, batch_size=1, seq_len=6, new_tokens=0, warmup=0, repeats=1)
    assert result["prefill_tokens_per_s"] > 0
    assert result["decode_tokens_per_s"] is None and result["decode_seconds"] is None


def test_throughput_rejects_bad_settings():
    from nirvana_lightning import ConfigError

    model = build_tiny_model("tiny-llama")
    with pytest.raises(ConfigError, match="repeats"):
        measure_throughput(model, batch_size=1, seq_len=4, new_tokens=1, repeats=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_throughput_cuda_reports_measured_peaks():
    model = build_tiny_model("tiny-llama")
    prune(model, None, sparsity=0.5, criterion="magnitude")
    model.to("cuda", torch.bfloat16)
    result = measure_throughput(model, batch_size=2, seq_len=16, new_tokens=4, warmup=1, repeats=2)
    assert result["device"].startswith("cuda") and result["dtype"] == "bfloat16"
    for key in ("peak_memory_bytes", "prefill_peak_memory_bytes", "decode_peak_memory_bytes"):
        assert result[key] >= result["weights_bytes"], key


def test_peak_memory_counts_the_model_not_what_else_the_device_holds(monkeypatch):
    """On CUDA the reported peak is the weights plus what the measurement allocates, not the device's absolute
    peak (which would include optimizer state and reference models during a training run)."""
    from nirvana_lightning.eval import speed

    held = {"now": 10 * 2**30, "peak": 10 * 2**30}  # 10 GiB already allocated by something else
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: held["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: held["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: held.update(peak=held["now"]))
    monkeypatch.setattr(speed, "_synchronize", lambda device: None)

    def run():
        held["peak"] = held["now"] + 3 * 2**20  # the run needs 3 MiB at its peak

    assert speed._cuda_peak(torch.device("cuda", 0), run) == 3 * 2**20

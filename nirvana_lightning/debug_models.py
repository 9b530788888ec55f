"""Tiny random models of every supported family (2 layers, 64 dims, GQA on) for tests and debug configs."""

from __future__ import annotations

from typing import Any

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny-llama": {"model_type": "llama"},
    "tiny-mistral": {"model_type": "mistral", "sliding_window": 64},
    "tiny-qwen2": {"model_type": "qwen2", "attention_bias": True},
    # explicit head_dim different from hidden/heads, as in real Qwen3 checkpoints
    "tiny-qwen3": {"model_type": "qwen3", "head_dim": 32},
    # Gemma 3: per-head q/k norms, one sliding and one global layer, tied and scaled embeddings, and a final-logit
    # soft-cap low enough to bend the tiny model's logits (Gemma-3-270M has none; Gemma 2 used 30)
    "tiny-gemma3": {"model_type": "gemma3_text", "head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 16,
                    "layer_types": ["sliding_attention", "full_attention"], "final_logit_softcapping": 5.0,
                    "tie_word_embeddings": True},
}


def build_tiny_config(name: str, vocab_size: int = 256, **overrides: Any):
    """A transformers config for a tiny random model: 2 layers, hidden 64, 4 heads over 2 KV heads."""
    from transformers import AutoConfig

    spec = dict(TINY_CONFIGS[name])
    model_type = spec.pop("model_type")
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=False, head_dim=16,
    )
    kwargs.update(spec)
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def build_tiny_model(name: str, vocab_size: int = 256, seed: int = 0, **overrides: Any):
    """A tiny random causal LM in float32 eval mode; the same seed gives the same weights."""
    import torch
    from transformers import AutoModelForCausalLM

    config = build_tiny_config(name, vocab_size, **overrides)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        # transformers initialises with std 0.02; widen it so units differ meaningfully in tests
        for pname, p in model.named_parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, std=0.2)
            elif "bias" in pname:
                torch.nn.init.normal_(p, std=0.1)
    return model.eval()

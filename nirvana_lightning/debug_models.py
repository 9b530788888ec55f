"""Tiny random models of every supported family (2 layers, 64 dims, GQA on) for tests and debug configs."""

from __future__ import annotations

from typing import Any


def _tiny_configs() -> dict[str, dict[str, Any]]:
    from .families import FAMILIES

    return {name: {"model_type": model_type, **overrides} for model_type, cls in FAMILIES.items()
            for name, overrides in cls.tiny_models.items()}


#: debug model name -> model_type and the overrides each family declares (``ModelFamily.tiny_models``)
TINY_CONFIGS: dict[str, dict[str, Any]] = _tiny_configs()


def _causal(spec: dict[str, Any]) -> bool:
    from .families import FAMILIES

    return not FAMILIES[spec["model_type"]].is_encoder_decoder


#: the decoder-only debug models (the serving engines and GGUF export take these) and the encoder-decoders (T5)
CAUSAL_TINY: list[str] = sorted(n for n, spec in TINY_CONFIGS.items() if _causal(spec))
SEQ2SEQ_TINY: list[str] = sorted(n for n, spec in TINY_CONFIGS.items() if not _causal(spec))


def build_tiny_config(name: str, vocab_size: int = 256, **overrides: Any):
    """A transformers config for a tiny random model: 2 layers, hidden 64, 4 heads over 2 KV heads."""
    from transformers import AutoConfig

    from .families import FAMILIES

    spec = dict(TINY_CONFIGS[name] if name in TINY_CONFIGS else _tiny_configs()[name])  # a family added later
    model_type = spec.pop("model_type")
    kwargs: dict[str, Any] = {"vocab_size": vocab_size, **FAMILIES[model_type].tiny_shape}
    kwargs.update(spec)
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def build_tiny_model(name: str, vocab_size: int = 256, seed: int = 0, **overrides: Any):
    """A tiny random causal LM (or T5) in float32 eval mode; the same seed gives the same weights."""
    import torch

    from .families import auto_model_class

    config = build_tiny_config(name, vocab_size, **overrides)
    # real CPU tensors even where the caller's default device is "meta" (a sharded run's other ranks build
    # their model by shape: the cached weights they may write first must still be the seeded ones)
    with torch.random.fork_rng(), torch.device("cpu"):
        torch.manual_seed(seed)
        model = auto_model_class(config).from_config(config, dtype=torch.float32)
        # transformers initialises with std 0.02; widen it so units differ meaningfully in tests
        for pname, p in model.named_parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, std=0.2)
            elif "bias" in pname:
                torch.nn.init.normal_(p, std=0.1)
    return model.eval()

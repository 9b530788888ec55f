"""vLLM model classes for pruned exports: vLLM's own classes, each decoder layer built from its own widths.

A pruned ``config.json`` is a stock config plus ``nirvana_layer_widths`` (per-layer query heads,
KV heads and MLP widths) and an explicit ``head_dim``. vLLM's Llama/Mistral/Qwen2/Qwen3 decoder
layers read those three widths from the config they are given, so each class here hands every
layer a copy of the config carrying that layer's widths (the index comes from the layer's prefix,
``model.layers.<i>``). Everything else (attention kernels, KV cache, weight loading, tensor
parallelism, quantisation) is vLLM's unchanged code.

Imported by vLLM only, through the plugin in :mod:`.vllm_plugin`.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

from vllm.model_executor.models import llama, mistral, qwen3
from vllm.model_executor.models.utils import extract_layer_index

from ..families.remote_modeling import WIDTHS_KEY

_WIDTH_FIELDS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")


def layer_config(config, prefix: str):
    """``config`` with the widths of the layer named by ``prefix`` (the config itself when uniform)."""
    widths = getattr(config, WIDTHS_KEY, None)
    if not widths:
        return config
    index = extract_layer_index(prefix)
    n_layer = int(config.num_hidden_layers)
    for key in _WIDTH_FIELDS:
        if len(widths[key]) != n_layer:
            raise ValueError(f"config.{WIDTHS_KEY}[{key!r}] has {len(widths[key])} entries for {n_layer} layers")
    if not getattr(config, "head_dim", None):
        raise ValueError(f"a config with {WIDTHS_KEY} must pin head_dim (it cannot be derived from hidden/heads)")
    local = copy.copy(config)  # shallow: only the three ints below differ
    for key in _WIDTH_FIELDS:
        setattr(local, key, int(widths[key][index]))
    return local


class _PerLayerLlamaDecoderLayer(llama.LlamaDecoderLayer):
    def __init__(self, vllm_config, prefix: str = "", config=None, **kwargs) -> None:
        config = layer_config(config or vllm_config.model_config.hf_config, prefix)
        super().__init__(vllm_config=vllm_config, prefix=prefix, config=config, **kwargs)


class _PerLayerMistralDecoderLayer(mistral.MistralDecoderLayer):
    def __init__(self, vllm_config, prefix: str = "", config=None) -> None:
        config = layer_config(config or vllm_config.model_config.hf_config, prefix)
        super().__init__(vllm_config=vllm_config, prefix=prefix, config=config)


class _PerLayerQwen3DecoderLayer(qwen3.Qwen3DecoderLayer):
    def __init__(self, config, *args, prefix: str = "", **kwargs) -> None:
        super().__init__(layer_config(config, prefix), *args, prefix=prefix, **kwargs)


class NirvanaLlamaForCausalLM(llama.LlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "", layer_type=_PerLayerLlamaDecoderLayer) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)


class NirvanaMistralForCausalLM(mistral.MistralForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "", layer_type=_PerLayerMistralDecoderLayer) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)


class _PerLayerQwen3Model(qwen3.Qwen3Model):
    decoder_layer_type = _PerLayerQwen3DecoderLayer


@contextmanager
def _model_class(module, name: str, cls):
    """Qwen3ForCausalLM builds its body by the module-level name: point it at ``cls`` meanwhile."""
    original = getattr(module, name)
    setattr(module, name, cls)
    try:
        yield
    finally:
        setattr(module, name, original)


class _PerLayerQwen2DecoderLayer(llama.LlamaDecoderLayer):
    """A Qwen2 layer built by vLLM's Llama layer: Qwen2 is Llama with q/k/v biases (none on o_proj).

    vLLM's own ``Qwen2Attention`` derives head_dim as hidden / heads, which is wrong once a layer has
    lost heads; the Llama attention reads the pinned ``head_dim`` from the config.
    """

    def __init__(self, vllm_config, prefix: str = "", config=None, **kwargs) -> None:
        config = copy.copy(layer_config(config or vllm_config.model_config.hf_config, prefix))
        config.attention_bias, config.qkv_bias = False, True
        super().__init__(vllm_config=vllm_config, prefix=prefix, config=config, **kwargs)


class NirvanaQwen2ForCausalLM(llama.LlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "", layer_type=_PerLayerQwen2DecoderLayer) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)


class NirvanaQwen3ForCausalLM(qwen3.Qwen3ForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        with _model_class(qwen3, "Qwen3Model", _PerLayerQwen3Model):
            super().__init__(vllm_config=vllm_config, prefix=prefix)

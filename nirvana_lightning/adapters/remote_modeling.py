"""Stock transformers classes that honour per-layer widths of a pruned model.

This file is STANDALONE (it imports only torch and transformers): ``save_pruned`` copies it
verbatim into every exported directory as ``modeling_nirvana.py`` and points the config's
``auto_map`` at it, so ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``
works without nirvana-lightning installed; ``load_pruned`` imports the same classes from the
package, so no code from the directory is executed.

A pruned config is a stock config plus ``nirvana_layer_widths``:
``{"num_key_value_heads": [...], "num_attention_heads": [...], "intermediate_size": [...]}`` (one
entry per layer) and an explicit ``head_dim``. Each class builds the stock model, then replaces
every layer's projections by linears of that layer's width before weights are loaded.
"""

from __future__ import annotations

import transformers
from torch import nn

WIDTHS_KEY = "nirvana_layer_widths"


def _linear(template: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=template.bias is not None,
                     device=template.weight.device, dtype=template.weight.dtype)


def resize_layers_(model: nn.Module, config) -> None:
    """Give every decoder layer the widths recorded in ``config.nirvana_layer_widths`` (in place)."""
    widths = getattr(config, WIDTHS_KEY, None)
    if not widths:
        return
    layers = model.model.layers
    for key in ("num_key_value_heads", "num_attention_heads", "intermediate_size"):
        if len(widths[key]) != len(layers):
            raise ValueError(f"{WIDTHS_KEY}[{key!r}] has {len(widths[key])} entries for {len(layers)} layers")
    d = config.head_dim
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        n_q, n_kv, n_mlp = (widths[k][i] for k in ("num_attention_heads", "num_key_value_heads", "intermediate_size"))
        hidden = attn.q_proj.in_features
        attn.q_proj = _linear(attn.q_proj, hidden, n_q * d)
        attn.k_proj = _linear(attn.k_proj, hidden, n_kv * d)
        attn.v_proj = _linear(attn.v_proj, hidden, n_kv * d)
        attn.o_proj = _linear(attn.o_proj, n_q * d, hidden)
        mlp.gate_proj = _linear(mlp.gate_proj, hidden, n_mlp)
        mlp.up_proj = _linear(mlp.up_proj, hidden, n_mlp)
        mlp.down_proj = _linear(mlp.down_proj, n_mlp, hidden)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = n_mlp


class NirvanaLlamaForCausalLM(transformers.LlamaForCausalLM):
    def __init__(self, config) -> None:
        super().__init__(config)
        resize_layers_(self, config)


class NirvanaMistralForCausalLM(transformers.MistralForCausalLM):
    def __init__(self, config) -> None:
        super().__init__(config)
        resize_layers_(self, config)


class NirvanaQwen2ForCausalLM(transformers.Qwen2ForCausalLM):
    def __init__(self, config) -> None:
        super().__init__(config)
        resize_layers_(self, config)


class NirvanaQwen3ForCausalLM(transformers.Qwen3ForCausalLM):
    def __init__(self, config) -> None:
        super().__init__(config)
        resize_layers_(self, config)


class NirvanaGemma3ForCausalLM(transformers.Gemma3ForCausalLM):
    def __init__(self, config) -> None:
        super().__init__(config)
        resize_layers_(self, config)


PRUNED_CLASSES = {
    "llama": NirvanaLlamaForCausalLM,
    "mistral": NirvanaMistralForCausalLM,
    "qwen2": NirvanaQwen2ForCausalLM,
    "qwen3": NirvanaQwen3ForCausalLM,
    "gemma3_text": NirvanaGemma3ForCausalLM,
}

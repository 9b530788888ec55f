"""Stock transformers classes that honour per-layer widths of a pruned model.

This file is STANDALONE (it imports only torch and transformers): ``save_pruned`` copies it
verbatim into every exported directory as ``modeling_nirvana.py`` and points the config's
``auto_map`` at it, so ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``
works without nirvana-lightning installed; ``load_pruned`` imports the same classes from the
package, so no code from the directory is executed.

A pruned config is a stock config plus ``nirvana_layer_widths``:
``{"num_key_value_heads": [...], "num_attention_heads": [...], "intermediate_size": [...]}`` (one
entry per layer) and an explicit ``head_dim``. Each class (``Nirvana<Stock>``, made from the stock
transformers class of any family with the Llama layout on first use) builds the stock model, then replaces
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
        if hasattr(attn, "num_key_value_groups"):  # repeat_kv: query heads per KV head of THIS layer
            attn.num_key_value_groups = n_q // n_kv


_PRUNED: dict[str, type] = {}


def pruned_class_of(stock: type) -> type:
    """``Nirvana<Stock>``: the stock transformers class, its layers resized to the config's per-layer widths."""
    if stock.__name__ not in _PRUNED:
        def __init__(self, config) -> None:
            stock.__init__(self, config)
            resize_layers_(self, config)

        name = f"Nirvana{stock.__name__}"
        _PRUNED[stock.__name__] = type(name, (stock,), {"__init__": __init__, "__module__": __name__,
                                                        "__qualname__": name})
    return _PRUNED[stock.__name__]


def pruned_class(model_type: str) -> type:
    """The pruned class of a ``model_type`` (its stock causal-LM class, resized per layer)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return pruned_class_of(getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]))


def __getattr__(name: str) -> type:
    """``NirvanaLlamaForCausalLM``, ``NirvanaGemma3ForCausalLM``, ...: the names an export's ``auto_map`` gives
    (PEP 562: built on first use from the stock class of the same name)."""
    stock = getattr(transformers, name[len("Nirvana"):], None) if name.startswith("Nirvana") else None
    if isinstance(stock, type) and name.endswith("ForCausalLM"):
        return pruned_class_of(stock)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

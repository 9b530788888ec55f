"""Stock transformers classes that honour per-layer widths of a pruned model.

This file is STANDALONE (it imports only torch and transformers): ``save_pruned`` copies it
verbatim into every exported directory as ``modeling_nirvana.py`` and points the config's
``auto_map`` at it, so ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``
works without nirvana-lightning installed; ``load_pruned`` imports the same classes from the
package, so no code from the directory is executed.

A pruned config is a stock config plus ``nirvana_layer_widths``:
``{"num_key_value_heads": [...], "num_attention_heads": [...], "intermediate_size": [...]}`` (one
entry per layer; what serving engines read) and an explicit ``head_dim``, plus ``nirvana_layer_modules``, the
family's own description of what the cut changed, which is all this file reads for a decoder: ``layers`` (the
path of the layer list), per layer ``modules`` (module path -> weight shape: a linear ``[out, in]``, a norm
``[n]``) and ``attributes`` (attribute path -> value; an attribute under a module's ``config`` gives that module a
config of its own). Each class (``Nirvana<Stock>``, made from the stock transformers class on first use) builds
the stock model, then gives every layer those shapes and attributes before weights are loaded; no family's
attribute names are written here. Exports of 0.2 (widths only, Llama layout) are read by the table
:data:`LEGACY_LAYOUT`.

T5 (``NirvanaT5ForConditionalGeneration``): ``nirvana_layer_widths`` holds, per stack (``encoder``, ``decoder``)
and block, ``num_heads``, ``head_index`` (the original indices of the kept self-attention heads), ``d_ff`` and, in
the decoder, ``cross_num_heads``. What changes in the stock class: every ``T5Attention`` becomes
:class:`NirvanaT5Attention` (the stock forward, called with its own heads' bias columns), every projection gets
its block's width; the relative-position bias table of block 0 keeps all of the dense model's heads.
"""

from __future__ import annotations

import copy

import torch
import transformers
from torch import nn

WIDTHS_KEY = "nirvana_layer_widths"
#: config key of the per-layer module shapes and attributes a cut leaves (written by the family)
MODULES_KEY = "nirvana_layer_modules"
#: how a 0.2 export (``nirvana_layer_widths`` only, every decoder with the Llama layout) maps widths to modules:
#: module path -> (width key of its output rows or None for the hidden size, the same for its input columns)
LEGACY_LAYOUT = {"self_attn.q_proj": ("num_attention_heads", None), "self_attn.k_proj": ("num_key_value_heads", None),
                 "self_attn.v_proj": ("num_key_value_heads", None), "self_attn.o_proj": (None, "num_attention_heads"),
                 "mlp.gate_proj": ("intermediate_size", None), "mlp.up_proj": ("intermediate_size", None),
                 "mlp.down_proj": (None, "intermediate_size")}


def _linear(template: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=template.bias is not None,
                     device=template.weight.device, dtype=template.weight.dtype)


_T5_ATTENTION: dict[str, type] = {}
#: encoder-decoder model types whose ``Nirvana<Stock>ForConditionalGeneration`` this file builds
SEQ2SEQ_TYPES = ("t5",)


def _t5_attention_class() -> type:
    """:class:`NirvanaT5Attention`, made from transformers' ``T5Attention`` on first use (importable by name from
    this module, so a cut model pickles)."""
    if "cls" not in _T5_ATTENTION:
        from transformers.models.t5.modeling_t5 import T5Attention

        class NirvanaT5Attention(T5Attention):
            """A ``T5Attention`` holding a subset of the dense model's heads (``nirvana_head_index``: their original
            indices, a list; the config carries it, so it is no buffer a checkpoint would have to hold).

            Changes to the stock class, nothing else: in block 0, ``compute_bias`` computes the bias of ALL the
            dense model's heads from the full relative-bias table (whatever key length the stock forward asks
            for: dynamic or static cache) and hands the stock forward its own heads' columns; every
            self-attention passes the FULL bias on to the next block, and a later block adds the columns of its
            own original heads, so every block reads its heads' columns whatever block 0 kept. Cross-attention
            has no learned bias: it runs the stock forward without one (zeros of its own head count) and passes
            none on.
            """

            def compute_bias(self, query_length, key_length, device=None, past_seen_tokens=0):
                full = super().compute_bias(query_length, key_length, device=device,
                                            past_seen_tokens=past_seen_tokens)
                object.__setattr__(self, "_nirvana_full_bias", full)  # passed on by forward
                return full[:, self.nirvana_head_index]

            def forward(self, hidden_states, mask=None, key_value_states=None, position_bias=None, cache=None,
                        **kwargs):
                if key_value_states is not None:
                    out, _, weights = super().forward(hidden_states, mask=mask, key_value_states=key_value_states,
                                                      position_bias=None, cache=cache, **kwargs)
                    return out, None, weights
                if position_bias is not None:  # the full bias block 0 passed on: this block's own columns
                    out, _, weights = super().forward(hidden_states, mask=mask,
                                                      position_bias=position_bias[:, self.nirvana_head_index],
                                                      cache=cache, **kwargs)
                    return out, position_bias, weights
                out, _, weights = super().forward(hidden_states, mask=mask, position_bias=None, cache=cache, **kwargs)
                # block 0: the full bias compute_bias made; a block without a table passes none (zeros otherwise)
                return out, self.__dict__.pop("_nirvana_full_bias", None), weights

        NirvanaT5Attention.__module__ = __name__
        NirvanaT5Attention.__qualname__ = "NirvanaT5Attention"
        _T5_ATTENTION["cls"] = NirvanaT5Attention
    return _T5_ATTENTION["cls"]


def head_selecting(attn: nn.Module, head_index: list[int]) -> None:
    """Make a ``T5Attention`` (projections already of ``len(head_index)`` heads) compute with those heads."""
    attn.__class__ = _t5_attention_class()
    attn.nirvana_head_index = [int(j) for j in head_index]
    attn.n_heads = len(head_index)
    attn.inner_dim = attn.n_heads * attn.key_value_proj_dim


def _resize_t5_(model: nn.Module, widths: dict, config) -> None:
    for stack_name in ("encoder", "decoder"):
        blocks, entry = getattr(model, stack_name).block, widths[stack_name]
        keys = ("num_heads", "head_index", "d_ff") + (("cross_num_heads",) if stack_name == "decoder" else ())
        for key in keys:
            if len(entry[key]) != len(blocks):
                raise ValueError(f"{WIDTHS_KEY}[{stack_name!r}][{key!r}] has {len(entry[key])} entries for "
                                 f"{len(blocks)} blocks")
        for i, block in enumerate(blocks):
            heads = entry["head_index"][i]
            if len(heads) != entry["num_heads"][i] or not heads or list(heads) != sorted(set(heads)) \
                    or heads[0] < 0 or heads[-1] >= config.num_heads:
                raise ValueError(f"{WIDTHS_KEY}[{stack_name!r}] block {i}: head_index {heads} is not "
                                 f"{entry['num_heads'][i]} sorted, distinct heads of the dense model's "
                                 f"{config.num_heads}")
            attentions = [(block.layer[0].SelfAttention, heads)]
            if stack_name == "decoder":
                attentions.append((block.layer[1].EncDecAttention, list(range(entry["cross_num_heads"][i]))))
            for attn, index in attentions:
                inner, hidden = len(index) * attn.key_value_proj_dim, attn.q.in_features
                for name in ("q", "k", "v"):
                    setattr(attn, name, _linear(getattr(attn, name), hidden, inner))
                attn.o = _linear(attn.o, inner, hidden)
                head_selecting(attn, index)
            ffn = block.layer[-1].DenseReluDense
            for name in ("wi", "wi_0", "wi_1"):
                if hasattr(ffn, name):
                    setattr(ffn, name, _linear(getattr(ffn, name), ffn.wo.out_features, entry["d_ff"][i]))
            ffn.wo = _linear(ffn.wo, entry["d_ff"][i], ffn.wo.out_features)


def _resolve(root, path: str):
    """``(parent, name)`` of a dotted attribute path under ``root``."""
    *parents, name = path.split(".")
    for part in parents:
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root, name


def set_layer_attribute_(layer: nn.Module, path: str, value) -> None:
    """Set ``layer.<path>``; a path through a module's ``config`` first gives that module a config of its own (a
    shallow copy), so one layer's widths never change the model's config or another layer's."""
    *head, name = path.split(".")
    if "config" in head:
        at = head.index("config")
        owner, _ = _resolve(layer, ".".join(head[:at + 1]))
        if not getattr(owner, "_nirvana_own_config", False):
            owner.config = copy.copy(owner.config)
            owner._nirvana_own_config = True
    parent, name = _resolve(layer, path)
    setattr(parent, name, value)


def _resized(module: nn.Module, shape: list[int]) -> nn.Module:
    """``module`` with a weight of ``shape``: a new linear ``[out, in]``, or a norm whose 1-D weight is replaced."""
    if isinstance(module, nn.Linear):
        return _linear(module, shape[1], shape[0])
    weight = module.weight
    module.weight = nn.Parameter(torch.empty(shape, device=weight.device, dtype=weight.dtype),
                                 requires_grad=weight.requires_grad)
    return module


def _legacy_table(model: nn.Module, widths: dict, config) -> dict:
    """The modules table of a 0.2 export (Llama layout, widths only)."""
    n_layer = len(model.model.layers)
    for key in ("num_key_value_heads", "num_attention_heads", "intermediate_size"):
        if len(widths[key]) != n_layer:
            raise ValueError(f"{WIDTHS_KEY}[{key!r}] has {len(widths[key])} entries for {n_layer} layers")
    d, hidden = config.head_dim, config.hidden_size
    width = {"num_attention_heads": d, "num_key_value_heads": d, "intermediate_size": 1}
    modules, attributes = [], []
    for i in range(n_layer):
        size = {key: widths[key][i] * width[key] for key in width}
        modules.append({path: [size[out] if out else hidden, size[inp] if inp else hidden]
                        for path, (out, inp) in LEGACY_LAYOUT.items()})
        attributes.append({"self_attn.num_key_value_groups": widths["num_attention_heads"][i]
                           // widths["num_key_value_heads"][i], "mlp.intermediate_size": widths["intermediate_size"][i]})
    return {"layers": "model.layers", "modules": modules, "attributes": attributes}


def resize_layers_(model: nn.Module, config) -> None:
    """Give every layer the shapes and attributes the config records (in place): ``nirvana_layer_modules``, or a
    0.2 export's widths (:data:`LEGACY_LAYOUT`), or T5's table."""
    table = getattr(config, MODULES_KEY, None)
    widths = getattr(config, WIDTHS_KEY, None)
    if not table and not widths:
        return
    if not table and getattr(config, "model_type", None) in SEQ2SEQ_TYPES:
        _resize_t5_(model, widths, config)
        return
    table = table or _legacy_table(model, widths, config)
    parent, name = _resolve(model, table["layers"])
    layers = getattr(parent, name)
    for key in ("modules", "attributes"):
        if len(table[key]) != len(layers):
            raise ValueError(f"{MODULES_KEY}[{key!r}] has {len(table[key])} entries for {len(layers)} layers")
    for layer, modules, attributes in zip(layers, table["modules"], table["attributes"]):
        for path, shape in modules.items():
            owner, name = _resolve(layer, path)
            setattr(owner, name, _resized(getattr(owner, name), shape))
        for path, value in attributes.items():
            set_layer_attribute_(layer, path, value)


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
    """The pruned class of a ``model_type`` (its stock causal-LM class, or seq2seq-LM class for T5, resized per
    layer)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )

    names = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES \
        else MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES
    return pruned_class_of(getattr(transformers, names[model_type]))


def __getattr__(name: str) -> type:
    """``NirvanaLlamaForCausalLM``, ``NirvanaGemma3ForCausalLM``, ...: the names an export's ``auto_map`` gives
    (PEP 562: built on first use from the stock class of the same name)."""
    if name == "NirvanaT5Attention":
        return _t5_attention_class()
    stock = getattr(transformers, name[len("Nirvana"):], None) if name.startswith("Nirvana") else None
    seq2seq = isinstance(stock, type) and name.endswith("ForConditionalGeneration") and \
        getattr(getattr(stock, "config_class", None), "model_type", None) in SEQ2SEQ_TYPES
    if isinstance(stock, type) and (name.endswith("ForCausalLM") or seq2seq):
        return pruned_class_of(stock)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

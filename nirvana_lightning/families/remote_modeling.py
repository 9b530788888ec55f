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

T5 (``NirvanaT5ForConditionalGeneration``): ``nirvana_layer_widths`` holds, per stack (``encoder``, ``decoder``)
and block, ``num_heads``, ``head_index`` (the original indices of the kept self-attention heads), ``d_ff`` and, in
the decoder, ``cross_num_heads``. What changes in the stock class: every ``T5Attention`` becomes
:class:`NirvanaT5Attention` (the stock forward, called with its own heads' bias columns), every projection gets
its block's width; the relative-position bias table of block 0 keeps all of the dense model's heads.
"""

from __future__ import annotations

import transformers
from torch import nn

WIDTHS_KEY = "nirvana_layer_widths"


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


#: the Llama layout (llama, mistral, qwen2, qwen3, gemma3_text): where the decoder layers are, the attention and MLP
#: modules of a layer, and each role's projection (the families' ``role_names``; tests/test_family_seam.py checks
#: they agree: this file cannot import them)
LLAMA_LAYOUT: dict[str, str] = {"layers": "model.layers", "attention": "self_attn", "mlp": "mlp",
                                "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                                "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
#: the per-layer widths table's keys of the Llama layout: query heads, KV groups, MLP neurons
LLAMA_WIDTH_KEYS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")


def _resize_llama_layout_(model: nn.Module, widths: dict, config) -> None:
    """Give every decoder layer of a Llama-layout model its widths from the table (:data:`LLAMA_LAYOUT`)."""
    names = LLAMA_LAYOUT
    layers = model
    for part in names["layers"].split("."):
        layers = getattr(layers, part)
    for key in LLAMA_WIDTH_KEYS:
        if len(widths[key]) != len(layers):
            raise ValueError(f"{WIDTHS_KEY}[{key!r}] has {len(widths[key])} entries for {len(layers)} layers")
    d = config.head_dim
    for i, layer in enumerate(layers):
        attn, mlp = getattr(layer, names["attention"]), getattr(layer, names["mlp"])
        n_q, n_kv, n_mlp = (widths[k][i] for k in LLAMA_WIDTH_KEYS)
        hidden = getattr(attn, names["q"]).in_features
        shapes = {"q": (hidden, n_q * d), "k": (hidden, n_kv * d), "v": (hidden, n_kv * d), "o": (n_q * d, hidden),
                  "gate": (hidden, n_mlp), "up": (hidden, n_mlp), "down": (n_mlp, hidden)}
        for role, (n_in, n_out) in shapes.items():
            owner = attn if role in ("q", "k", "v", "o") else mlp
            setattr(owner, names[role], _linear(getattr(owner, names[role]), n_in, n_out))
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = n_mlp
        if hasattr(attn, "num_key_value_groups"):  # repeat_kv: query heads per KV head of THIS layer
            attn.num_key_value_groups = n_q // n_kv


#: model_type -> how a stock model of that type takes its per-layer widths; any other type: the Llama layout
RESIZERS = {"t5": _resize_t5_}


def resize_layers_(model: nn.Module, config) -> None:
    """Give every layer the widths recorded in ``config.nirvana_layer_widths`` (in place)."""
    widths = getattr(config, WIDTHS_KEY, None)
    if not widths:
        return
    RESIZERS.get(getattr(config, "model_type", None), _resize_llama_layout_)(model, widths, config)


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

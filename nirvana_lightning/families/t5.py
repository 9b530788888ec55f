"""T5 (v1.0 with a ReLU FFN, v1.1 / flan-t5 with a gated-GELU FFN): an encoder-decoder.

Pruning layers are the encoder blocks followed by the decoder blocks. Unit kinds, in plain multi-head attention
(a unit is one head: its q/k/v rows and o columns, ``d_kv`` each; no biases, no attention scaling):

* ``kv_group``: the self-attention heads of an encoder or a decoder block (multi-head: a group is one head);
* ``cross_head``: the decoder's cross-attention heads (their k/v read the encoder output, so a removed head also
  shrinks the cross-attention cache); encoder blocks have none (width 0 in a plan);
* ``neuron``: FFN neurons (``wi_0`` row + ``wi_1`` row + ``wo`` column gated; ``wi`` row + ``wo`` column in v1.0).

Relative position bias: block 0 of each stack owns ``relative_attention_bias`` (one column per head) and every
later block reuses block 0's bias. The full table is kept; every self-attention records the original indices of
the heads it keeps (``head_index``) and reads those bias columns (``remote_modeling.NirvanaT5Attention``).

Scoring and every loss read teacher-forced pairs made from the same ``(N, T)`` token windows as a decoder-only
model: **prefix -> continuation** (:meth:`T5Family.model_inputs`): the encoder reads the first
``encoder_fraction`` of each window (``config.nirvana_encoder_fraction``, default 0.5), the decoder predicts the
rest after the decoder start token. Chosen over span corruption because it needs no sentinel tokens (any
tokenizer's windows work, and flan-t5 was instruction-tuned on prefix -> answer pairs, not on spans), scores
and trains every window token once (as a target or as context), and gives a perplexity of the continuation that
means the same thing before and after pruning.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from .base import GRANULARITIES, ModelFamily, Owned, UnitKind

ATTENTION_ROLES = ("q", "k", "v", "o")
#: encoder fraction of a calibration window when the config does not set ``nirvana_encoder_fraction``
ENCODER_FRACTION = 0.5
#: the shared tiny shape of the T5 debug models (three blocks per stack, so a middle block exists)
_TINY = {"d_model": 64, "d_ff": 128, "d_kv": 16, "num_heads": 4, "num_layers": 3, "num_decoder_layers": 3,
         "relative_attention_num_buckets": 8, "relative_attention_max_distance": 32, "dropout_rate": 0.0,
         "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1}


class T5Family(ModelFamily):
    model_types = ("t5",)
    is_encoder_decoder = True
    tiny_shape = _TINY
    # v1.1 / flan-t5: gated-GELU FFN, unscaled decoder output; v1.0: ReLU FFN, decoder output scaled by d_model^-1/2
    tiny_models = {"tiny-t5": {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False},
                   "tiny-t5-v1": {"feed_forward_proj": "relu"}}

    role_names: ClassVar[dict[str, str]] = {"q": "q", "k": "k", "v": "v", "o": "o", "gate": "wi_0", "up": "wi_1",
                                            "down": "wo"}

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        if not self.config.is_gated_act:  # v1.0: one input projection `wi` (LoRA's gate and up both name it)
            self.role_names = {**self.role_names, "gate": "wi", "up": "wi"}

    # ----------------------------------------------------------------- structure
    def layers(self) -> list[nn.Module]:
        """Encoder blocks, then decoder blocks."""
        return [*self.model.encoder.block, *self.model.decoder.block]

    @staticmethod
    def is_decoder_layer(layer: nn.Module) -> bool:
        return len(layer.layer) == 3

    def body(self) -> nn.Module:
        return self.model.decoder

    def lm_head(self) -> nn.Linear:
        return self.model.lm_head

    def _roles(self, layer: nn.Module) -> tuple[str, ...]:
        ffn = ("gate", "up", "down") if self.config.is_gated_act else ("up", "down")
        cross = tuple(f"cross_{r}" for r in ATTENTION_ROLES) if self.is_decoder_layer(layer) else ()
        return (*ATTENTION_ROLES, *cross, *ffn)

    def projection(self, layer: nn.Module, role: str) -> nn.Linear:
        if role.startswith("cross_"):
            if not self.is_decoder_layer(layer):
                raise KeyError(f"role {role!r}: an encoder block has no cross-attention")
            return getattr(layer.layer[1].EncDecAttention, role[len("cross_"):])
        if role in ATTENTION_ROLES:
            return getattr(layer.layer[0].SelfAttention, role)
        return getattr(layer.layer[-1].DenseReluDense, self.role_names[role])

    def block_linears(self):
        for i, layer in enumerate(self.layers()):
            for role in self._roles(layer):
                yield i, role, self.projection(layer, role)

    def attention_modules(self, layer: nn.Module) -> dict[str, nn.Module]:
        """The T5Attention modules of a block by unit kind."""
        out = {"kv_group": layer.layer[0].SelfAttention}
        if self.is_decoder_layer(layer):
            out["cross_head"] = layer.layer[1].EncDecAttention
        return out

    # ------------------------------------------------------------------- spec
    def unit_kinds(self, layer: nn.Module, granularity: str = GRANULARITIES[0]) -> dict[str, UnitKind]:
        if granularity != "group":
            raise ConfigError("target.attention_granularity", granularity,
                              "'group' for t5: its attention is multi-head, one head is already one unit")
        d = self.head_dim
        hidden = self.hidden_dim
        kinds = {}
        for name, prefix, label in (("kv_group", "", "self-attention heads"),
                                    ("cross_head", "cross_", "cross-attention heads")):
            if name == "cross_head" and not self.is_decoder_layer(layer):
                continue
            n = self.projection(layer, f"{prefix}q").weight.shape[0] // d
            kinds[name] = UnitKind(name, n, (Owned(f"{prefix}q", 0, d), Owned(f"{prefix}k", 0, d),
                                             Owned(f"{prefix}v", 0, d), Owned(f"{prefix}o", 1, d)), 4 * d * hidden,
                                   "attention", label)
        ffn = (("gate", 0), ("up", 0), ("down", 1)) if self.config.is_gated_act else (("up", 0), ("down", 1))
        n_mlp = self.projection(layer, "down").weight.shape[1]
        kinds["neuron"] = UnitKind("neuron", n_mlp, tuple(Owned(r, a, 1) for r, a in ffn), len(ffn) * hidden, "mlp",
                                   "FFN neurons")
        return kinds

    def layer_widths(self, layer: nn.Module) -> tuple[int, int, int]:
        """(self-attention heads, self-attention heads, FFN neurons): multi-head, one head per group."""
        kinds = self.unit_kinds(layer)
        return kinds["kv_group"].n_units, kinds["kv_group"].n_units, kinds["neuron"].n_units

    def attention_widths(self, layer: nn.Module) -> list[tuple[int, int]]:
        """Self-attention heads, and the decoder's cross-attention heads (multi-head: as many KV heads)."""
        return [(attn.n_heads, attn.n_heads) for attn in self.attention_modules(layer).values()]

    def after_cut(self, layer: nn.Module, keep: dict[str, list[int]]) -> None:
        """Every attention of the block computes with its kept heads only; self-attention keeps reading the bias
        columns of its original heads (``head_index`` composes over successive cuts)."""
        from .remote_modeling import head_selecting

        for name, attn in self.attention_modules(layer).items():
            before = getattr(attn, "nirvana_head_index", None)
            before = list(range(attn.n_heads)) if before is None else before
            head_selecting(attn, [before[j] for j in keep[name]])

    def record_layer_widths(self) -> None:
        """Per stack and block: self-attention heads and their original indices, cross-attention heads (decoder),
        and FFN neurons, in ``config.nirvana_layer_widths`` (the dense globals stay: the table is authoritative)."""
        table = {}
        for stack in ("encoder", "decoder"):
            blocks = getattr(self.model, stack).block
            entry = {"num_heads": [], "head_index": [], "d_ff": []}
            if stack == "decoder":
                entry["cross_num_heads"] = []
            for block in blocks:
                attn = self.attention_modules(block)
                index = getattr(attn["kv_group"], "nirvana_head_index", None)
                entry["num_heads"].append(attn["kv_group"].n_heads)
                entry["head_index"].append(list(range(attn["kv_group"].n_heads)) if index is None else list(index))
                entry["d_ff"].append(self.unit_kinds(block)["neuron"].n_units)
                if stack == "decoder":
                    entry["cross_num_heads"].append(attn["cross_head"].n_heads)
            table[stack] = entry
        setattr(self.config, self.LAYER_WIDTHS_KEY, table)

    # ------------------------------------------------------------ scoring forward
    @property
    def encoder_fraction(self) -> float:
        value = getattr(self.config, "nirvana_encoder_fraction", None)
        value = ENCODER_FRACTION if value is None else value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise ConfigError("config.nirvana_encoder_fraction", value, "a fraction in (0, 1) of each window the "
                              "encoder reads")
        return float(value)

    def split(self, length: int) -> int:
        """Encoder tokens of a window of ``length`` tokens (at least one on each side)."""
        if length < 2:
            raise ConfigError("calibration", f"windows of {length} token", "windows of at least 2 tokens for t5 "
                              "(an encoder prefix and a decoder continuation)")
        return min(length - 1, max(1, round(length * self.encoder_fraction)))

    def model_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     labels: torch.Tensor | None = None) -> tuple[dict, torch.Tensor | None]:
        """Prefix -> continuation: the encoder reads ``input_ids[:, :P]``, the decoder reads the continuation
        shifted right after the decoder start token and predicts it; the aligned labels are ``labels[:, P:]``."""
        if labels is not None and bool((labels == -100).any()):
            raise ConfigError("data.task", "sft", "'lm' for an encoder-decoder (t5): its pairs split packed windows "
                              "at a fixed fraction, and instruction examples (prompt masked with -100) would need a "
                              "split at each response instead (not implemented)")
        p = self.split(input_ids.shape[1])
        target = input_ids[:, p:]
        start = torch.full_like(target[:, :1], int(self.config.decoder_start_token_id))
        kwargs = {"input_ids": input_ids[:, :p].contiguous(), "decoder_input_ids": torch.cat([start, target[:, :-1]], 1)}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask[:, :p].contiguous()
            kwargs["decoder_attention_mask"] = torch.cat([torch.ones_like(attention_mask[:, :1]),
                                                          attention_mask[:, p:-1]], 1)
        return kwargs, (None if labels is None else labels[:, p:].contiguous())

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        kwargs, _ = self.model_inputs(input_ids)
        encoded = self.model.encoder(input_ids=kwargs["input_ids"]).last_hidden_state
        hidden = self.model.decoder(input_ids=kwargs["decoder_input_ids"], encoder_hidden_states=encoded,
                                    use_cache=False).last_hidden_state
        if self.config.scale_decoder_outputs:  # as T5ForConditionalGeneration.forward does before its head
            hidden = hidden * (self.hidden_dim ** -0.5)
        return hidden

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        kwargs, _ = self.model_inputs(input_ids)
        return self.model(**kwargs, use_cache=False).logits

    def lm_loss(self, input_ids: torch.Tensor) -> torch.Tensor:
        kwargs, labels = self.model_inputs(input_ids, labels=input_ids)
        return self.model(**kwargs, labels=labels, use_cache=False).loss

    # ------------------------------------------------------------- capabilities
    sft_data = False
    lm_eval_backend = "seq2seq"
    measures_throughput = False
    auto_class_name = "AutoModelForSeq2SeqLM"
    pruned_units_text = ("attention heads (encoder and decoder self-attention, decoder cross-attention) and FFN "
                         "neurons removed.")
    servable = False

    @classmethod
    def check_plan_widths(cls, plan, widths: dict) -> None:
        """The plan's kept heads and neurons per block against ``config.json``'s per-stack table."""
        try:
            rows = [("encoder", i, widths["encoder"]["num_heads"][i], 0, widths["encoder"]["d_ff"][i])
                    for i in range(len(widths["encoder"]["num_heads"]))]
            rows += [("decoder", i, widths["decoder"]["num_heads"][i], widths["decoder"]["cross_num_heads"][i],
                      widths["decoder"]["d_ff"][i]) for i in range(len(widths["decoder"]["num_heads"]))]
        except (KeyError, TypeError, IndexError) as err:
            raise ValueError(f"config.json {cls.LAYER_WIDTHS_KEY} is not a T5 table: {err!r}") from None
        if len(rows) != plan.n_layer or set(plan.keep) != {"kv_group", "cross_head", "neuron"}:
            raise ValueError(f"plan.json has {plan.n_layer} layers ({sorted(plan.keep)}), config.json {len(rows)} "
                             "T5 blocks")
        for i, (stack, block, heads, cross, ffn) in enumerate(rows):
            have = tuple(len(plan.keep[kind][i]) for kind in ("kv_group", "cross_head", "neuron"))
            if have != (heads, cross, ffn):
                raise ValueError(f"plan.json and config.json disagree at {stack} block {block}: plan keeps {have[0]} "
                                 f"self-attention heads, {have[1]} cross-attention heads and {have[2]} neurons, "
                                 f"config says {heads}, {cross} and {ffn}")

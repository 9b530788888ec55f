"""The family spec: what one architecture can prune, and the only place that knows Hugging Face attribute names.

A family declares, per decoder layer, its **unit kinds** (:class:`UnitKind`): how many units of each kind the
layer has, the weight count one unit costs, and exactly which rows (axis 0, with the bias entries) or columns
(axis 1) of which projection a unit owns. Scoring, allocation, masking, surgery, parameter and FLOP counts and
the plan read these declarations; they never name a module. The family also owns the scoring forward (calibration
ids to hidden states, hidden states to the logits the functional reads) and writes new widths into the config.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .remote_modeling import MODULES_KEY, WIDTHS_KEY, set_layer_attribute_


@dataclass(frozen=True)
class AttentionParts:
    """The projections of one attention block, weights stored [out, in]."""

    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear


@dataclass(frozen=True)
class MLPParts:
    """The projections of one gated MLP block."""

    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear


ROLES = ("q", "k", "v", "o", "gate", "up", "down")
#: attention granularities (the first is the default): whole KV groups (the paper), or single query heads inside each
#: group as well
GRANULARITIES = ("group", "query_head")


#: allocation roles: attention-like units and MLP-like units are ranked apart, gamma sets their ratio
ALLOCATIONS = ("attention", "mlp")


@dataclass(frozen=True)
class Owned:
    """A unit owns ``block`` consecutive rows (``axis`` 0, bias entries included) or columns (``axis`` 1) of the
    weight of projection ``role``, starting at ``offset``: unit j owns ``[offset + j * block, offset + (j + 1) *
    block)``. ``offset`` places a kind inside a fused weight (Phi-3's ``qkv``: the k rows start after the q rows);
    rows or columns no unit owns are kept by every cut. A 1-D weight (a norm over the full width) has rows only."""

    role: str
    axis: int
    block: int
    offset: int = 0

    def index(self, units: list[int] | torch.Tensor) -> torch.Tensor:
        """Rows or columns owned by ``units``: units [0, 2], block 3, offset 10 -> [10, 11, 12, 16, 17, 18]."""
        units = torch.as_tensor(units, dtype=torch.long)
        return (units[:, None] * self.block + torch.arange(self.block)).reshape(-1) + self.offset

    def span(self, n_units: int) -> tuple[int, int]:
        """``[start, stop)`` of the rows or columns ``n_units`` units own."""
        return self.offset, self.offset + n_units * self.block


@dataclass(frozen=True)
class UnitKind:
    """One kind of prunable unit in one layer, as the family declares it: the only description of a unit that
    scoring, allocation, masking, the cut, parameter counts, plans and reports read.

    Attributes:
        name: our name of the kind (never a Hugging Face attribute name): ``kv_group`` (a KV group and its query
            heads), ``q_head`` (one query head, at ``query_head`` granularity), ``neuron`` (one MLP neuron), or
            whatever a family declares (T5: ``cross_head``).
        n_units: units of this kind the layer has now.
        owns: the slices of the projections one unit owns; kinds of a layer own disjoint slices.
        cost: block weights one unit owns (the sum of its rows' and columns' lengths), biases and norms excluded.
        allocation: ``attention`` or ``mlp``: the units allocation ranks together and gamma weighs against each
            other.
        label: how reports and errors name the units (``KV groups``).
        parent: kind whose units contain this kind's units (``q_head`` in ``kv_group``: unit j belongs to
            parent unit ``j // (n_units / n_parent)``); a parent unit goes exactly when all its children go,
            and every kept parent keeps the same number of children.
    """

    name: str
    n_units: int
    owns: tuple[Owned, ...]
    cost: int
    allocation: str
    label: str
    parent: str | None = None

    def __post_init__(self) -> None:
        assert self.allocation in ALLOCATIONS, self.allocation

    @property
    def gate(self) -> Owned | None:
        """The columns whose inputs masking zeroes (the output projection this kind feeds), if any."""
        return next((o for o in self.owns if o.axis == 1), None)

    def spec(self) -> dict:
        """What a plan records of the kind (layer-independent): allocation role, label, parent."""
        return {"allocation": self.allocation, "label": self.label, "parent": self.parent}


class ModelFamily:
    """Maps one model family's modules to roles and keeps module, config and tensors in agreement.

    Subclasses set ``model_types`` and the attribute names; everything outside ``families/``
    talks in roles (``q``, ``k``, ``v``, ``o``, ``gate``, ``up``, ``down``).
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    #: encoder-decoder families (T5) score and train on prefix -> continuation pairs (:meth:`model_inputs`)
    is_encoder_decoder: ClassVar[bool] = False
    #: the shared shape of the family's debug models (``debug_models``), before each model's overrides
    tiny_shape: ClassVar[dict] = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                  "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
                                  "tie_word_embeddings": False, "head_dim": 16}
    #: debug models of the family: name -> config overrides of the shared tiny shape (``debug_models``)
    tiny_models: ClassVar[dict[str, dict]] = {}
    #: every family class with ``model_types``, registered when its module is imported (``families/__init__``
    #: imports every module of the package): a new family is one file
    registry: ClassVar[dict[str, type[ModelFamily]]] = {}

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        for model_type in cls.model_types:
            ModelFamily.registry[model_type] = cls
    #: HF module attribute name for each role (used for LoRA target names and for lookup).
    role_names: ClassVar[dict[str, str]] = {
        "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
        "gate": "gate_proj", "up": "up_proj", "down": "down_proj",
    }

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config

    # ----------------------------------------------------------------- structure
    def layers(self) -> list[nn.Module]:
        """The decoder layers, in order."""
        return list(self._base_model().layers)

    def attention(self, layer: nn.Module) -> AttentionParts:
        attn = layer.self_attn
        n = self.role_names
        return AttentionParts(getattr(attn, n["q"]), getattr(attn, n["k"]), getattr(attn, n["v"]), getattr(attn, n["o"]))

    def mlp(self, layer: nn.Module) -> MLPParts:
        mlp = layer.mlp
        n = self.role_names
        return MLPParts(getattr(mlp, n["gate"]), getattr(mlp, n["up"]), getattr(mlp, n["down"]))

    def _base_model(self) -> nn.Module:
        return self.model.model

    def body(self) -> nn.Module:
        """The decoder stack without the LM head; its output has ``last_hidden_state`` (B, T, hidden)."""
        return self._base_model()

    def lm_head(self) -> nn.Linear:
        return self.model.lm_head

    # ------------------------------------------------------- hidden states -> logits
    @property
    def logit_softcap(self) -> float | None:
        """Final-logit soft-capping (Gemma 2/3: ``cap * tanh(logits / cap)``), None when the family has none."""
        return None

    def finalize_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """What the family's forward applies to ``lm_head(hidden)``: scorers and losses that apply the head
        themselves, chunk by chunk, call this so they see the model's own logits."""
        cap = self.logit_softcap
        return logits if not cap else cap * torch.tanh(logits / cap)

    @contextmanager
    def raw_logits(self) -> Iterator[None]:
        """The forward returns ``lm_head(hidden)`` unchanged (no soft-capping) inside the block."""
        yield

    def block_linears(self) -> Iterator[tuple[int, str, nn.Linear]]:
        """``(layer_index, role, module)`` for every prunable projection, layer-major, roles in ROLES order."""
        for i, layer in enumerate(self.layers()):
            attn, mlp = self.attention(layer), self.mlp(layer)
            for role in ROLES:
                yield i, role, getattr(attn if role in ("q", "k", "v", "o") else mlp, role)

    @contextmanager
    def checkpointed_layers(self) -> Iterator[None]:
        """Recompute each decoder layer's activations in backward (non-reentrant), restoring after.

        Independent of the HF ``gradient_checkpointing`` flag, which only acts in train mode.
        """
        layers = self.layers()
        # a layer may already carry an instance-level forward (accelerate hooks): put it back after
        saved = [layer.__dict__.get("forward") for layer in layers]
        for layer in layers:
            forward = layer.forward

            def run(*args, _forward=forward, **kwargs):
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

            layer.forward = run
        try:
            yield
        finally:
            for layer, previous in zip(layers, saved):
                if previous is None:
                    del layer.forward  # the class method is visible again
                else:
                    layer.forward = previous

    # ------------------------------------------------------------------ geometry
    @property
    def n_head(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def n_kv_head(self) -> int:
        return int(getattr(self.config, "num_key_value_heads", None) or self.n_head)

    @property
    def head_dim(self) -> int:
        """Per-head width; read from the config when present, never assumed to be hidden/heads."""
        hd = getattr(self.config, "head_dim", None)
        return int(hd) if hd else int(self.config.hidden_size) // self.n_head

    @property
    def hidden_dim(self) -> int:
        return int(self.config.hidden_size)

    @property
    def n_query_per_kv(self) -> int:
        """g: query heads per KV head of the dense config (a ``query_head`` cut changes it per layer)."""
        return self.n_head // self.n_kv_head

    # ------------------------------------------------------------------- spec
    def projection(self, layer: nn.Module, role: str) -> nn.Linear:
        """The linear of ``role`` in ``layer``."""
        return getattr(self.attention(layer) if role in ("q", "k", "v", "o") else self.mlp(layer), role)

    def unit_kinds(self, layer: nn.Module, granularity: str = GRANULARITIES[0]) -> dict[str, UnitKind]:
        """The prunable unit kinds of ``layer`` as its tensors are now (layers differ after pruning).

        ``group``: a KV group owns its g query heads (q rows, o columns) and its k/v rows; ``query_head``: a KV
        group owns its k/v rows and each query head its own q rows and o columns (``q_head``, nested in the group).
        An MLP neuron owns a gate row, an up row and a down column.
        """
        from ..errors import check_choice

        check_choice("target.attention_granularity", granularity, GRANULARITIES)
        a = self.attention(layer)
        d = self.head_dim
        n_kv, n_q = a.k.weight.shape[0] // d, a.q.weight.shape[0] // d
        g = n_q // n_kv
        hidden = a.q.weight.shape[1]
        n_mlp = self.mlp(layer).gate.weight.shape[0]
        neuron = UnitKind("neuron", n_mlp, (Owned("gate", 0, 1), Owned("up", 0, 1), Owned("down", 1, 1)), 3 * hidden,
                          "mlp", "MLP neurons")
        if granularity == "group":
            group = UnitKind("kv_group", n_kv, (Owned("q", 0, g * d), Owned("k", 0, d), Owned("v", 0, d),
                                                Owned("o", 1, g * d)), 2 * (g + 1) * d * hidden, "attention", "KV groups")
            return {"kv_group": group, "neuron": neuron}
        group = UnitKind("kv_group", n_kv, (Owned("k", 0, d), Owned("v", 0, d)), 2 * d * hidden, "attention",
                         "KV groups")
        head = UnitKind("q_head", n_q, (Owned("q", 0, d), Owned("o", 1, d)), 2 * d * hidden, "attention",
                        "query heads", parent="kv_group")
        return {"kv_group": group, "q_head": head, "neuron": neuron}

    def after_cut(self, layer: nn.Module, keep: dict[str, list[int]]) -> None:
        """Called by the cut after a layer's projections were sliced, with the kept units per kind: module
        attributes follow the new tensors (families whose modules must know which units they kept, e.g. T5's
        relative-bias columns, override this)."""
        self.set_layer_widths(layer, *self.layer_widths(layer))

    def layer_attributes(self, layer: nn.Module, n_kv_group: int, n_head: int, mlp_dim: int) -> dict:
        """Module attributes (paths under the layer) that must follow the layer's widths: stock attention in
        transformers 5.x infers head counts from tensor shapes, ``num_key_value_groups`` drives ``repeat_kv``, and
        the other counts are kept in agreement for code that reads them. A path under a module's ``config`` gives
        that module a config of its own (``remote_modeling.set_layer_attribute_``)."""
        attn, mlp = layer.self_attn, layer.mlp
        out = {f"self_attn.{name}": value for name, value in (
            ("num_heads", n_head), ("num_key_value_heads", n_kv_group), ("num_key_value_groups", n_head // n_kv_group))
            if hasattr(attn, name)}
        if hasattr(mlp, "intermediate_size"):
            out["mlp.intermediate_size"] = mlp_dim
        return out

    def masking_hooks(self, layer: nn.Module, kept: dict[tuple[str, int], torch.Tensor]) -> list:
        """Hooks (removable handles) that make ``layer`` compute as if cut, beyond zeroing the removed units'
        inputs to their output projections (``surgery.masked_units`` does that): for modules that mix units,
        e.g. a norm over the full width of a projection. ``kept``: per ``(role, axis)`` the indices the cut keeps.
        None by default: every unit of a Llama-layout layer is independent of the others."""
        return []

    def set_layer_widths(self, layer: nn.Module, n_kv_group: int, n_head: int, mlp_dim: int) -> None:
        """Update module attributes after the projections were sliced (:meth:`layer_attributes`)."""
        for path, value in self.layer_attributes(layer, n_kv_group, n_head, mlp_dim).items():
            set_layer_attribute_(layer, path, value)

    def layer_widths(self, layer: nn.Module) -> tuple[int, int, int]:
        """(KV groups, query heads, MLP neurons) of one layer as its tensors say."""
        kinds = self.unit_kinds(layer, "query_head")
        return kinds["kv_group"].n_units, kinds["q_head"].n_units, kinds["neuron"].n_units

    def attention_widths(self, layer: nn.Module) -> list[tuple[int, int]]:
        """``(query heads, KV heads)`` of every attention block of the layer, its self-attention first (what
        FLOP and cache estimates read)."""
        n_kv, n_head, _ = self.layer_widths(layer)
        return [(n_head, n_kv)]

    # ------------------------------------------------------------ scoring forward
    def model_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     labels: torch.Tensor | None = None) -> tuple[dict, torch.Tensor | None]:
        """The model's keyword arguments for ``(B, T)`` windows, and the labels aligned with its logits:
        ``logits[:, t]`` predicts ``aligned[:, t]`` (``-100`` where nothing is predicted). A causal LM predicts
        the next token (``labels`` shifted left, the last position unlabelled); an encoder-decoder family builds
        its pairs here. Losses, perplexity and KL read every family through this one view."""
        kwargs = {"input_ids": input_ids}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if labels is None:
            return kwargs, None
        # -100: data.sft.IGNORE_INDEX, the label losses skip (families stay importable without Lightning)
        return kwargs, torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Calibration ids ``(B, T)`` -> the final hidden states ``(B, T, hidden)`` the LM head reads."""
        return self.body()(input_ids=input_ids, use_cache=False).last_hidden_state

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The model's own logits ``(B, T, V)`` (soft-capping included)."""
        return self.model(input_ids=input_ids, use_cache=False).logits

    def lm_loss(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Next-token loss of the windows (the ``taylor`` criterion's f)."""
        return self.model(input_ids=input_ids, labels=input_ids, use_cache=False).loss

    # --------------------------------------------------------------- LoRA roles
    def lora_target_modules(self, roles: list[str] | tuple[str, ...] = ROLES) -> list[str]:
        """HF module names for the given roles, as peft's ``target_modules`` expects (each name once: T5 v1.0's
        gate and up are the same module)."""
        from ..errors import check_choice

        return list(dict.fromkeys(self.role_names[check_choice("recovery.lora_targets", r, ROLES)] for r in roles))

    # ------------------------------------------------------------------ surgery
    #: config attribute carrying per-layer widths after pruning (stock configs have one global value)
    LAYER_WIDTHS_KEY: ClassVar[str] = WIDTHS_KEY

    def record_layer_widths(self) -> None:
        """Write per-layer ``(KV groups, query heads, MLP neurons)``, as the tensors say, into the HF config so config
        and tensors agree.

        ``head_dim`` is pinned explicitly (it must never be re-derived from hidden/heads). When
        every layer has the same widths, the global fields are updated too, so a stock config
        describes the model; otherwise the globals keep the dense values and the per-layer
        lists in ``config.nirvana_layer_widths`` are authoritative.
        """
        self.config.head_dim = self.head_dim
        widths = [self.layer_widths(layer) for layer in self.layers()]
        setattr(self.config, MODULES_KEY, self.layer_modules_table(widths))
        n_kv, n_head, mlp = (list(x) for x in zip(*widths))
        table = {"num_key_value_heads": n_kv, "num_attention_heads": n_head, "intermediate_size": mlp}
        setattr(self.config, self.LAYER_WIDTHS_KEY, table)
        if all(len(set(v)) == 1 for v in table.values()):
            for key, values in table.items():
                setattr(self.config, key, values[0])

    #: path of the decoder layer list under the model (``remote_modeling`` reads it from the config)
    LAYERS_PATH: ClassVar[str] = "model.layers"

    def layer_modules_table(self, widths: list[tuple[int, int, int]]) -> dict:
        """What a reload needs to rebuild the cut layers (``config.nirvana_layer_modules``): per layer the weight
        shape of every module a unit kind owns slices of, and :meth:`layer_attributes`."""
        modules, attributes = [], []
        for layer, w in zip(self.layers(), widths):
            names = {id(m): name for name, m in layer.named_modules()}
            roles = dict.fromkeys(o.role for kind in self.unit_kinds(layer, "group").values() for o in kind.owns)
            modules.append({names[id(self.projection(layer, role))]: list(self.projection(layer, role).weight.shape)
                            for role in roles})
            attributes.append(self.layer_attributes(layer, *w))
        return {"layers": self.LAYERS_PATH, "modules": modules, "attributes": attributes}

    # ------------------------------------------------------------- capabilities
    # What code outside ``families/`` may ask instead of reading Hugging Face names (tests/test_family_seam.py).
    #: instruction (SFT) examples can train the family (an encoder-decoder's pairs split windows at a fixed fraction)
    sft_data: ClassVar[bool] = True
    #: lm-eval's model backend for the family (``causal`` or ``seq2seq``)
    lm_eval_backend: ClassVar[str] = "causal"
    #: throughput can be measured (a decoder-only generation loop)
    measures_throughput: ClassVar[bool] = True
    #: the transformers Auto class a reload of an export names
    auto_class_name: ClassVar[str] = "AutoModelForCausalLM"
    #: the export card's one-line description of what pruning removed
    pruned_units_text: ClassVar[str] = "whole GQA attention groups and MLP neurons removed."

    @classmethod
    def carries_output_biases(cls, config) -> bool:
        """Whether the family's config can switch on biases of every block linear (bias compensation needs them on
        o/down, and a stock reload must build them)."""
        return hasattr(config, "attention_bias") and hasattr(config, "mlp_bias")

    @classmethod
    def enable_output_biases(cls, config) -> None:
        """Record in ``config`` that every block linear has a bias (after :meth:`carries_output_biases`)."""
        config.attention_bias = True
        config.mlp_bias = True

    @property
    def has_mlp_biases(self) -> bool:
        """The model's MLP linears have biases (e.g. after bias compensation)."""
        return bool(getattr(self.config, "mlp_bias", False))

    @property
    def max_sequence_length(self) -> int | None:
        """Positions the model was trained on (None: no absolute limit, e.g. relative positions)."""
        return getattr(self.config, "max_position_embeddings", None)

    @property
    def n_vocab(self) -> int:
        """Rows of the LM head (the logits' last dimension)."""
        return int(self.config.vocab_size)

    @property
    def ties_head_to_embeddings(self) -> bool:
        """The LM head shares the input embedding's weight."""
        return bool(getattr(self.config, "tie_word_embeddings", False))

    def head_weight_name(self) -> str:
        """The LM head weight's key in the model's state dict."""
        head = self.model.get_output_embeddings()
        return next(name for name, m in self.model.named_modules() if m is head) + ".weight"

    #: an export of the family has a serving engine path (vLLM plugin, GGUF); else transformers only
    servable: ClassVar[bool] = True
    #: the vLLM plugin registers a per-layer-width class for the family (``serving/vllm_models.py``)
    vllm_served: ClassVar[bool] = False
    #: GGUF: (llama.cpp architecture when every layer is alike, architecture for per-layer widths or None), or None
    #: when ``save_gguf`` has no llama.cpp graph for the family
    gguf_architectures: ClassVar[tuple[str, str | None] | None] = None

    @classmethod
    def check_plan_widths(cls, plan, widths: dict) -> None:
        """Raise ``ValueError`` where an export's ``plan.json`` and its config's per-layer widths table
        (``config.nirvana_layer_widths``) disagree: KV groups, query heads and MLP neurons per layer."""
        n_layer = len(widths["intermediate_size"])
        for i in range(max(plan.n_layer, n_layer)):
            if i >= plan.n_layer or i >= n_layer:
                raise ValueError(f"plan.json has {plan.n_layer} layers, config.json {n_layer}")
            plan_widths = (plan.n_kv_group_after[i], plan.n_head_after[i], plan.mlp_dim_after[i])
            config_widths = tuple(widths[k][i] for k in ("num_key_value_heads", "num_attention_heads",
                                                         "intermediate_size"))
            if plan_widths != config_widths:
                raise ValueError(
                    f"plan.json and config.json disagree at layer {i}: plan keeps {plan_widths[0]} KV groups, "
                    f"{plan_widths[1]} query heads and {plan_widths[2]} neurons, config says {config_widths[0]}, "
                    f"{config_widths[1]} and {config_widths[2]}"
                )

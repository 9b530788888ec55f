"""Write a pruned (or dense) model as a GGUF file that llama.cpp and Ollama run, per-layer widths included.

llama.cpp reads ``feed_forward_length``, ``attention.head_count`` and ``attention.head_count_kv`` as
per-layer arrays, but its plain ``llama`` graph builds every layer with layer 0's values. Its ``deci``
graph (written for NVIDIA's Nemotron-NAS models) builds each layer with its own query heads, KV heads
and FFN width, with Llama's tensor names. So:

- every layer alike (a dense model, or a uniform plan): the family's own architecture
  (``llama`` for Llama and Mistral, ``qwen2``, ``qwen3``);
- widths that differ between layers: ``deci`` for Llama, Mistral and Qwen2 (q/k/v biases are read
  there too); Qwen3 is refused, since ``deci`` has no per-head q/k norms.

Tensor conventions follow llama.cpp's own converter: weights keep their ``[out, in]`` layout, q/k rows
are permuted to the interleaved rotary layout for the ``llama``/``deci`` graphs (each layer with its own
head count), norms and biases stay in float32. Quantised types (``q8_0``, ``q4_0``) need rows whose
length is a multiple of the 32-value block; a tensor whose rows do not fit is stored in F16 and listed
under ``nirvana.f16_fallback`` in the file (and in a warning).

The tokenizer (byte-level BPE: Llama 3, Qwen, SmolLM, Mistral's newer tokenizers) is written with its
pre-tokenizer name, merges, special tokens and chat template, so llama.cpp tokenizes like transformers.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..families import FAMILIES
from ..io import file_mode, remove_leftovers

GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
QUANT_BLOCK = 32
#: family (model_type) -> (architecture when all layers are alike, architecture for per-layer widths or None)
ARCHITECTURES: dict[str, tuple[str, str | None]] = {t: family.gguf_architectures for t, family in FAMILIES.items()
                                                    if family.gguf_architectures}
#: graphs that use the interleaved rotary layout (q/k rows permuted); qwen2/qwen3 use the NeoX layout
_PERMUTED = ("llama", "deci")
_ROPE_TYPES = ("default", "linear", "llama3")
#: llama.cpp pre-tokenizer names for the byte-level BPE pre-tokenizers of supported tokenizers
_SPLIT_PATTERNS = {
    # Llama 3 / 3.1 / 3.2
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    # Qwen2 / Qwen2.5 / Qwen3
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
}


def _gguf():
    try:
        import gguf
    except ImportError as err:  # pragma: no cover - gguf is a dependency
        raise ImportError("save_gguf needs the gguf package: pip install gguf") from err
    return gguf


# ----------------------------------------------------------------------------- structure
def _layer_widths(model: nn.Module) -> tuple[list[int], list[int], list[int], int]:
    """Per-layer (query heads, KV heads, FFN widths) read from the tensors, and head_dim."""
    from ..families import get_family

    family = get_family(model)
    kv_heads, heads, ffn = map(list, zip(*(family.layer_widths(layer) for layer in family.layers())))
    return heads, kv_heads, ffn, family.head_dim


def gguf_architecture(model: nn.Module) -> str:
    """The llama.cpp architecture :func:`save_gguf` writes for ``model``, or a :class:`ConfigError` saying why none."""
    model_type = model.config.model_type
    if model_type not in ARCHITECTURES:
        raise ConfigError("save_gguf: model_type", model_type, sorted(ARCHITECTURES))
    heads, kv_heads, ffn, _ = _layer_widths(model)
    uniform = len(set(heads)) == 1 and len(set(kv_heads)) == 1 and len(set(ffn)) == 1
    same, per_layer = ARCHITECTURES[model_type]
    if uniform:
        return same
    if per_layer is None:
        raise ConfigError(
            "save_gguf: model", f"{model_type} with per-layer widths",
            f"a uniform plan for {model_type} in GGUF: llama.cpp's only graph with per-layer head and FFN widths "
            f"(deci) has no per-head q/k norms, which {model_type} needs (export the Hugging Face directory and "
            "serve it with vLLM instead)",
        )
    return per_layer


def _rope(config) -> tuple[float, str, dict]:
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ValueError(f"{config.model_type} config has no rope_theta")
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in _ROPE_TYPES:
        raise ConfigError("save_gguf: rope_type", rope_type, f"one of {list(_ROPE_TYPES)} (GGUF export)")
    return float(theta), rope_type, params


def _llama3_rope_factors(params: dict, head_dim: int, theta: float) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1's rope scaling, as llama.cpp reads them from ``rope_freqs.weight``."""
    if "factor" not in params:
        raise ValueError(f"rope_parameters {params} of type llama3 have no 'factor'")
    factor = float(params["factor"])
    low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
    old_ctx = float(params.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of q/k (or their bias) from the rotate-half layout to llama.cpp's interleaved one."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------- tokenizer
def detect_tokenizer_pre(tokenizer) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer, read from its ``tokenizer.json``."""
    data = _tokenizer_json(tokenizer)
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = steps[0].get("pattern", {})
        name = _SPLIT_PATTERNS.get(pattern.get("Regex", pattern.get("String")))
        if name:
            return name
    raise ConfigError(
        "save_gguf: tokenizer_pre", f"unrecognised pre-tokenizer {json.dumps(pre)[:200]}",
        "pass tokenizer_pre= with llama.cpp's name for it (for example llama-bpe, qwen2, smollm, gpt-2)",
    )


def _tokenizer_json(tokenizer) -> dict:
    """The fast tokenizer's ``tokenizer.json``, refused unless it is a byte-level BPE (what save_gguf writes)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError("save_gguf: tokenizer", type(tokenizer).__name__,
                          "a fast (tokenizers-backed) transformers tokenizer: the GGUF file must carry the vocabulary")
    data = json.loads(backend.to_str())
    model = data.get("model", {})
    pre = json.dumps(data.get("pre_tokenizer") or {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or '"ByteLevel"' not in pre:
        kind = f"{model.get('type')}{' with byte_fallback' if model.get('byte_fallback') else ''}"
        raise ConfigError("save_gguf: tokenizer", kind,
                          "a byte-level BPE tokenizer (Llama 3, Qwen, SmolLM); SentencePiece-style tokenizers "
                          "(Llama 2, Mistral v0.1: BPE with byte fallback) are not written by save_gguf")
    return data


def _add_tokenizer(writer, tokenizer, n_vocab: int, pre: str | None) -> None:
    gguf = _gguf()
    data = _tokenizer_json(tokenizer)
    model = data["model"]
    added = {int(a["id"]): a for a in data.get("added_tokens", [])}
    by_id = {int(i): t for t, i in model["vocab"].items()}
    for i, a in added.items():
        by_id[i] = a["content"]
    if max(by_id) >= n_vocab:
        raise ValueError(f"tokenizer has token id {max(by_id)} beyond the model's vocabulary of {n_vocab}")
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre or detect_tokenizer_pre(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=n_vocab)
        special.add_to_gguf(writer, quiet=True)


# ----------------------------------------------------------------------------- tensors
def _tensors(model: nn.Module, arch: str) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) in llama.cpp's naming, q/k permuted where the graph wants it."""
    from ..families import get_family

    family = get_family(model)
    base = family.body()
    d = family.head_dim
    permute = arch in _PERMUTED
    out: list[tuple[str, torch.Tensor]] = [("token_embd.weight", model.get_input_embeddings().weight)]
    for i, layer in enumerate(family.layers()):
        attn, mlp = family.attention(layer), family.mlp(layer)
        n_q, n_kv = attn.q.weight.shape[0] // d, attn.k.weight.shape[0] // d
        out.append((f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight))
        for name, lin, heads in (("attn_q", attn.q, n_q), ("attn_k", attn.k, n_kv), ("attn_v", attn.v, None),
                                 ("attn_output", attn.o, None)):
            for kind in ("weight", "bias"):
                t = getattr(lin, kind)
                if t is None:
                    continue
                if permute and heads is not None:
                    t = torch.from_numpy(_permute(t.detach().float().cpu().numpy(), heads))
                out.append((f"blk.{i}.{name}.{kind}", t))
        for name, norm in (("attn_q_norm", "q_norm"), ("attn_k_norm", "k_norm")):
            if getattr(layer.self_attn, norm, None) is not None:
                out.append((f"blk.{i}.{name}.weight", getattr(layer.self_attn, norm).weight))
        out.append((f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight))
        for name, lin in (("ffn_gate", mlp.gate), ("ffn_up", mlp.up), ("ffn_down", mlp.down)):
            out.append((f"blk.{i}.{name}.weight", lin.weight))
            if lin.bias is not None:
                raise ConfigError("save_gguf: model", f"{model.config.model_type} with MLP biases",
                                  "MLPs without biases (llama.cpp's Llama-family graphs read none)")
    out.append(("output_norm.weight", base.norm.weight))
    if not family.ties_head_to_embeddings:
        out.append(("output.weight", family.lm_head().weight))
    return out


def _encode(name: str, t: torch.Tensor, dtype: str, fallback: list[str], is_head: bool = False):
    """(array, raw_shape, raw_dtype) for ``add_tensor``; 1-D tensors stay float32.

    ``is_head``: the tensor the logits are computed from (``output.weight``, or ``token_embd.weight`` when
    the embeddings are tied), kept in q8_0 when the rest is q4_0.
    """
    gguf = _gguf()
    array = t.detach().to(torch.float32).cpu().numpy()
    if not np.isfinite(array).all():
        raise ValueError(f"save_gguf: tensor {name} holds NaN or inf values; refusing to write a broken model")
    if array.ndim == 1 or dtype == "f32":
        return array, None, None
    if dtype == "f16":
        return array.astype(np.float16), None, None
    qtype = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
             "q4_0": gguf.GGMLQuantizationType.Q4_0}[dtype]
    if dtype == "q4_0" and is_head:
        qtype = gguf.GGMLQuantizationType.Q8_0  # the LM head in 8 bits, as llama.cpp's quantizer keeps it high
    if dtype != "bf16" and array.shape[-1] % QUANT_BLOCK:
        fallback.append(name)
        return array.astype(np.float16), None, None
    return gguf.quants.quantize(array, qtype), None, qtype  # byte rows; the writer derives the shape


_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
               "q4_0": "MOSTLY_Q4_0"}


def check_gguf_support(model: nn.Module, tokenizer, tokenizer_pre: str | None = None) -> str:
    """Everything :func:`save_gguf` would refuse, checked without writing: returns the architecture."""
    from ..families import unwrap_model

    model = unwrap_model(model)
    arch = gguf_architecture(model)
    _rope(model.config)
    if tokenizer is None:
        raise ConfigError("save_gguf: tokenizer", None, "the model's transformers tokenizer (GGUF files carry it)")
    _tokenizer_json(tokenizer)
    if tokenizer_pre is None:
        detect_tokenizer_pre(tokenizer)
    return arch


def check_plan_is_models(model: nn.Module, plan) -> None:
    """Refuse a plan the model was not cut with: its fingerprint would be recorded in the file as this model's.

    The plan's model type and hidden size against the config, its kept KV groups / query heads / neurons per
    layer against the model's widths.
    """
    config = model.config
    identity = plan.provenance.get("model_identity") or {}
    fingerprint = plan.fingerprint()
    for field, have in (("model_type", config.model_type), ("hidden_size", int(config.hidden_size))):
        if identity.get(field) not in (None, have):
            raise ConfigError("save_gguf: plan", fingerprint, f"the plan this model was cut with (the plan was made "
                              f"for {field}={identity[field]!r}, the model has {have!r})")
    heads, kv_heads, ffn, _ = _layer_widths(model)
    planned = {"KV groups": (plan.n_kv_group_after, kv_heads), "MLP neurons": (plan.mlp_dim_after, ffn),
               "query heads": (plan.n_head_after, heads)}
    for what, (want, have) in planned.items():
        if want and list(want) != list(have):
            raise ConfigError("save_gguf: plan", fingerprint, f"the plan this model was cut with (the plan keeps "
                              f"{what} per layer {want}, the model has {list(have)})")


def save_gguf(model: nn.Module, tokenizer, path: str | Path, plan=None, dtype: str = "f16", *,
              tokenizer_pre: str | None = None, modelfile: bool = True, overwrite: bool = False,
              name: str | None = None) -> Path:
    """Write ``model`` (pruned or dense; LoRA merged) as one GGUF file for llama.cpp / Ollama, atomically.

    Args:
        model: a supported causal LM (Llama, Mistral, Qwen2, Qwen3), plain or peft-wrapped.
        tokenizer: its transformers tokenizer (byte-level BPE), written into the file.
        path: the ``.gguf`` file to write.
        plan: the pruning plan (its fingerprint and sparsity go into the metadata).
        dtype: ``f32``, ``f16``, ``bf16``, ``q8_0`` or ``q4_0`` for the 2-D weights; norms and biases stay
            float32. With ``q4_0`` the LM head is stored in ``q8_0``. Rows that do not fit a 32-value block
            are stored in F16 (listed under ``nirvana.f16_fallback``).
        tokenizer_pre: llama.cpp's pre-tokenizer name, when it cannot be recognised from ``tokenizer.json``.
        modelfile: also write an Ollama ``<stem>.Modelfile`` beside the file.
        overwrite: replace an existing file.
        name: ``general.name`` (default: the model's source name).

    Returns:
        ``path``. The file is written under a temporary name and renamed, so ``path`` never holds half a file.

    Raises:
        ConfigError: a family, setting or tokenizer the format cannot express, naming it and the reason.
    """
    from ..errors import check_choice
    from ..families import get_family, unwrap_model

    gguf = _gguf()
    check_choice("save_gguf: dtype", dtype, GGUF_DTYPES)
    path = Path(path)
    if path.suffix != ".gguf":
        raise ConfigError("save_gguf: path", str(path), "a file name ending in .gguf")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    if unwrap_model(model) is not model:  # peft: merge the adapters into a copy of the weights
        import copy

        from ..recovery.lora import merge_into_base

        model = merge_into_base(copy.deepcopy(model))
    config = model.config
    arch = check_gguf_support(model, tokenizer, tokenizer_pre)
    heads, kv_heads, ffn, head_dim = _layer_widths(model)
    theta, rope_type, rope_params = _rope(config)
    family = get_family(model)
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < family.max_sequence_length:
        warnings.warn(f"{config.model_type} sliding_window={window}: llama.cpp attends over the whole context, so "
                      f"contexts longer than {window} tokens differ from transformers", stacklevel=2)

    if plan is not None:
        check_plan_is_models(model, plan)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path.parent, path.name)  # temporary files of a save_gguf that was killed
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    fallback: list[str] = []
    try:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_name(name or str(getattr(config, "_name_or_path", "") or config.model_type))
        writer.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES[dtype]))
        writer.add_context_length(int(family.max_sequence_length))
        writer.add_embedding_length(family.hidden_dim)
        writer.add_block_count(len(heads))
        per_layer = arch == "deci"
        writer.add_feed_forward_length(ffn if per_layer else ffn[0])
        writer.add_head_count(heads if per_layer else heads[0])
        writer.add_head_count_kv(kv_heads if per_layer else kv_heads[0])
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(theta)
        if rope_type == "linear":
            if "factor" not in rope_params:
                raise ValueError(f"rope_parameters {rope_params} of type linear have no 'factor'")
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(rope_params["factor"]))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_vocab_size(family.n_vocab)
        if plan is not None:
            writer.add_string("nirvana.plan_fingerprint", plan.fingerprint())
            writer.add_float32("nirvana.realised_sparsity", float(plan.realised_sparsity))
        _add_tokenizer(writer, tokenizer, family.n_vocab, tokenizer_pre)
        tensors = _tensors(model, arch)
        if rope_type == "llama3":
            tensors.append(("rope_freqs.weight", torch.from_numpy(_llama3_rope_factors(rope_params, head_dim, theta))))
        head = "output.weight" if any(n == "output.weight" for n, _ in tensors) else "token_embd.weight"
        encoded = [(n, *_encode(n, t, dtype, fallback, is_head=n == head)) for n, t in tensors]
        if fallback:
            writer.add_array("nirvana.f16_fallback", fallback)
            warnings.warn(f"save_gguf({dtype}): {len(fallback)} tensors have rows that are not a multiple of "
                          f"{QUANT_BLOCK} values and are stored in F16: {', '.join(fallback[:6])}"
                          f"{' ...' if len(fallback) > 6 else ''} (align the plan with round_to=32)", stacklevel=2)
        for n, array, raw_shape, raw_dtype in encoded:
            writer.add_tensor(n, array, raw_shape=raw_shape, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if modelfile:
        write_modelfile(path, tokenizer)
    return path


def write_modelfile(gguf_path: Path, tokenizer) -> Path:
    """An Ollama ``Modelfile`` beside the GGUF: ``ollama create NAME -f <stem>.Modelfile``.

    Ollama reads the chat template from the GGUF's ``tokenizer.chat_template``; the stop token is the
    tokenizer's end-of-sequence token (and ChatML's end-of-turn when the template uses it).
    """
    from ..io import write_text_atomic

    lines = [f"FROM ./{gguf_path.name}"]
    stops = []
    if tokenizer.eos_token:
        stops.append(tokenizer.eos_token)
    template = getattr(tokenizer, "chat_template", None) or ""
    if "<|im_end|>" in template and "<|im_end|>" not in stops:
        stops.append("<|im_end|>")
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return write_text_atomic(gguf_path.with_suffix(".Modelfile"), "\n".join(lines) + "\n")


__all__ = ["GGUF_DTYPES", "check_gguf_support", "gguf_architecture", "detect_tokenizer_pre", "save_gguf", "write_modelfile"]

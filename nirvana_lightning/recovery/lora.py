"""LoRA merged into a plain model for export, without copying the model.

``copy.deepcopy(peft_model).merge_and_unload()`` doubles the model's memory (every weight, embeddings
and head included) and cannot run on a sharded model (FSDP2 forbids ``deepcopy``). Here the plain
model is built on the meta device (the pruned widths come from its config) and its parameters are
*assigned*: the weights LoRA did not touch are the very tensors of the trained model (no copy), and
each adapted weight becomes ``W + scaling * B @ A`` computed in float32 (float64 for a float64
model) and cast to ``W``'s dtype, as
peft's merge does. The extra memory is one merged copy of the adapted weights; the trained model is
left as it was (still wrapped, still trainable).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..adapters import remote_modeling, unwrap_model


def _scalings(model: nn.Module) -> dict[str, float]:
    scalings = {}
    for name, config in model.peft_config.items():
        if getattr(config, "fan_in_fan_out", False):
            raise NotImplementedError("LoRA with fan_in_fan_out (Conv1D layers) is not merged here")
        scalings[name] = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
    return scalings


def merged_state_dict(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The plain model's state (transformers names) with every LoRA adapter merged.

    Args:
        model: a peft-wrapped model (the wrapper gives the names and the scalings), or a plain one
            (then nothing is merged: a sharded model's gathered state becomes a plain model).
        state: its state dict if already gathered (a sharded model's full state on rank 0);
            default ``model.state_dict()`` (references, no copy).
    """
    scalings = _scalings(model) if hasattr(model, "peft_config") else {}
    state = model.state_dict() if state is None else state
    prefix = "base_model.model."
    out: dict[str, torch.Tensor] = {}
    lora: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for key, tensor in state.items():
        name = key[len(prefix):] if key.startswith(prefix) else key
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in name:
                module, rest = name.split(marker)
                adapter = rest.split(".")[0]
                lora.setdefault(module, {}).setdefault(adapter, {})[part] = tensor
                break
        else:
            out[name.replace(".base_layer.", ".")] = tensor
    for module, adapters in lora.items():
        key = f"{module}.weight"
        weight = out[key]
        dtype = torch.promote_types(weight.dtype, torch.float32)  # float32, or float64 for a float64 model
        merged = weight.to(dtype)
        for adapter, ab in adapters.items():
            merged = merged + scalings[adapter] * (ab["lora_B"].to(dtype) @ ab["lora_A"].to(dtype))
        out[key] = merged.to(weight.dtype)
    return out


def merged_model(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A plain (unwrapped) pruned model with the LoRA adapters merged; ``model`` is not modified.

    See :func:`merged_state_dict` for ``state``. Buffers (RoPE ``inv_freq``) are shared with ``model``.
    """
    base = unwrap_model(model)
    config = base.config
    cls = remote_modeling.PRUNED_CLASSES[config.model_type]
    with torch.device("meta"):
        plain = cls(config)
    weights = merged_state_dict(model, state)
    missing, unexpected = plain.load_state_dict(weights, strict=False, assign=True)
    tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"merged state does not match the pruned model: missing {sorted(set(missing) - tied)}, "
                           f"unexpected {sorted(unexpected)}")
    if tied:
        plain.tie_weights()
    for name, buffer in base.named_buffers():
        owner, _, leaf = name.rpartition(".")
        module = plain.get_submodule(owner.replace(".base_layer", "")) if owner else plain
        if leaf in module._buffers:
            module._buffers[leaf] = buffer
    left = [n for n, t in [*plain.named_parameters(), *plain.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on the meta device after merging: {left}")
    plain.eval()
    return plain

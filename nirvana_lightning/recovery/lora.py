"""LoRA's one home: attach, merge, strip, count and load adapters (every peft call of the package is here).

Merging for export builds a plain model without copying the model (:func:`merged_model`):

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

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..families import get_family, remote_modeling, unwrap_model


def attach_lora(model: nn.Module, *, r: int, alpha: int, dropout: float, roles: Sequence[str]) -> nn.Module:
    """Wrap ``model`` with LoRA adapters on the projections of ``roles`` (``q k v o gate up down``, resolved to
    module names by the model family); B = 0, so the function is unchanged."""
    from peft import LoraConfig, get_peft_model

    targets = get_family(model).lora_target_modules(list(roles))
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def merge_into_base(model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights in place and return the plain model (no-op without peft)."""
    return model.merge_and_unload() if unwrap_model(model) is not model else model


def adapter_parameter_count(model: nn.Module) -> int:
    """Trainable adapter parameters of a peft model (0 for a plain model)."""
    count = getattr(model, "get_nb_trainable_parameters", None)
    return int(count()[0]) if callable(count) and unwrap_model(model) is not model else 0


def load_adapter(base_model: nn.Module, path: str | Path) -> nn.Module:
    """A saved adapter (``save_pretrained`` of a peft model) loaded onto ``base_model``."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model, str(path))


@contextmanager
def without_adapter_layers(model: nn.Module) -> Iterator[nn.Module]:
    """The base model with every peft adapter layer swapped for the linear it wraps, then restored.

    The merged, exported model has exactly the base shapes and no adapter code in its forward;
    ``disable_adapter()`` would still run each wrapper's Python. The base weights lack the
    unmerged LoRA deltas, which does not change the speed of the same shapes.
    """
    base = unwrap_model(model)
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # no peft: nothing can be wrapped
        yield base
        return
    swapped = []
    for name, module in list(base.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent_name, _, child = name.rpartition(".")
            parent = base.get_submodule(parent_name) if parent_name else base
            swapped.append((parent, child, module))
    for parent, child, module in swapped:
        setattr(parent, child, module.get_base_layer())
    try:
        yield base
    finally:
        for parent, child, module in swapped:
            setattr(parent, child, module)


def _scalings(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per adapted module (transformers name): ``{adapter: scaling}`` of its active adapters, read from the
    LoRA layers themselves (so ``rank_pattern`` / ``alpha_pattern`` / rslora are as peft applies them)."""
    scalings: dict[str, dict[str, float]] = {}
    prefix = "base_model.model."
    for name, module in model.named_modules():
        if not (hasattr(module, "lora_A") and hasattr(module, "scaling")):
            continue
        for adapter in module.active_adapters:
            if adapter not in module.lora_A:
                continue
            if getattr(module, "use_dora", {}).get(adapter) or getattr(module, "lora_bias", {}).get(adapter):
                raise NotImplementedError(f"{name}: DoRA / LoRA biases are not merged here (merge with peft)")
            if getattr(module, "fan_in_fan_out", False):
                raise NotImplementedError(f"{name}: LoRA with fan_in_fan_out (Conv1D layers) is not merged here")
            key = name[len(prefix):] if name.startswith(prefix) else name
            scalings.setdefault(key, {})[adapter] = float(module.scaling[adapter])
    return scalings


def merged_state_dict(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The plain model's state (transformers names) with every LoRA adapter merged.

    Args:
        model: a peft-wrapped model (its LoRA layers give the scalings of their active adapters), or a plain one
            (then nothing is merged: a sharded model's gathered state becomes a plain model).
        state: its state dict if already gathered (a sharded model's full state on rank 0);
            default ``model.state_dict()`` (references, no copy).
    """
    scalings = _scalings(model) if hasattr(model, "peft_config") else {}
    state = model.state_dict() if state is None else state
    if any("modules_to_save" in k for k in state):
        raise NotImplementedError("peft modules_to_save are not merged here (merge with peft)")
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
        for adapter, scaling in scalings.get(module, {}).items():  # active adapters only, as peft merges
            ab = adapters[adapter]
            merged = merged + scaling * (ab["lora_B"].to(dtype) @ ab["lora_A"].to(dtype))
        out[key] = merged.to(weight.dtype)
    return out


def merged_model(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A plain (unwrapped) pruned model with the LoRA adapters merged; ``model`` is not modified.

    See :func:`merged_state_dict` for ``state``. Buffers (RoPE ``inv_freq``) are shared with ``model``.
    """
    base = unwrap_model(model)
    config = base.config
    cls = remote_modeling.pruned_class(config.model_type)
    with torch.device("meta"):
        plain = cls(config)
    weights = merged_state_dict(model, state)
    family = get_family(base)
    tied, head = family.ties_head_to_embeddings, family.head_weight_name()
    if tied:  # one tensor for both names: assigned once, then tied (two Parameters would untie them)
        weights.pop(head, None)
    missing, unexpected = plain.load_state_dict(weights, strict=False, assign=True)
    if set(missing) - ({head} if tied else set()) or unexpected:
        raise RuntimeError(f"merged state does not match the pruned model: missing {sorted(missing)}, "
                           f"unexpected {sorted(unexpected)}")
    if tied:
        plain.tie_weights()
        if plain.get_output_embeddings().weight is not plain.get_input_embeddings().weight:
            raise RuntimeError("the config ties the LM head to the input embedding, but the merged model's head "
                               "was not tied")
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

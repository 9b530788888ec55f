"""Precision rules of recovery that Lightning's precision plugins do not keep on their own.

* RoPE's float32 buffers: ``bf16-true`` runs ``module.to(bfloat16)``, which rounds ``inv_freq`` to bf16:
  the rotation angle at position 8192 is then off by up to ~15 rad for Llama-3 frequencies, so recovery
  would train a model with other position encodings than the one exported (transformers recomputes the
  buffer in float32 at load) and served. The buffers are put back as loaded, bit for bit.
* LoRA adapters and their AdamW state stay float32: ``bf16-true`` converts every parameter, and bf16
  adapters lose updates smaller than 2^-8 of the weight (at lr 1e-5 most ``lora_A`` entries never change).
  Adapters are a fraction of a percent of the model, so keeping them in float32 costs nothing; peft casts
  the layer input to the adapter's dtype and the result back, and merging casts the delta to the base
  dtype. Full fine-tuning is left in the dtype the user chose (float32 master weights would double its
  memory).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError


def float32_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the model's float32 buffers, as loaded (before any precision plugin runs)."""
    return {n: b.detach().clone() for n, b in model.named_buffers() if b.dtype == torch.float32}


def restore_buffers(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Put back every saved float32 buffer that a conversion changed to another dtype."""
    for name, tensor in saved.items():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        current = module._buffers.get(leaf)
        if current is not None and current.dtype != torch.float32:
            module._buffers[leaf] = tensor.to(current.device)


def adapters_in_float32(params: list[nn.Parameter], *, strict: bool, precision: str = "") -> None:
    """Trainable (LoRA) parameters back to float32. A sharded (DTensor) adapter cannot be converted in place:
    skipped after a conversion, an error naming ``trainer.precision`` when the optimizer is built (``strict``)."""
    for p in params:
        if p.dtype == torch.float32:
            continue
        if isinstance(p, torch.distributed.tensor.DTensor):
            if not strict:
                continue
            raise ConfigError("trainer.precision", precision, "32-true or bf16-mixed under a sharded strategy "
                              "(float32 storage sharded across ranks, bf16 compute): a *-true precision would leave "
                              f"the LoRA adapters in {p.dtype}")
        p.data = p.data.float()
